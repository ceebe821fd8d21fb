"""The supervisor's view of its workers' loops: one heartbeat stamp per worker.

A worker whose loop stops (a Vosk call that never returns, a deadlock) still answers
nothing, so a socket heartbeat would not tell the supervisor which one to kill. Each
worker's loop writes ``time.monotonic()`` into its slot of a shared table instead; the
supervisor (``murder_workers``) aborts a worker whose stamp is older than
``--worker-timeout``, as gunicorn's arbiter does with its workers' temp files.
"""

from __future__ import annotations

import mmap
import struct
import time


__all__ = ["HeartbeatTable"]


class HeartbeatTable:
    """Per-worker ``time.monotonic()`` stamps in anonymous shared memory, shared by fork.

    A worker is forked after its slot exists and writes only that slot. The table grows a
    page at a time as the supervisor adds workers (a host with many CPUs, TTIN): a page
    made later is shared with the workers forked after it, the only ones it has slots for.
    """

    PAGE_SLOTS = mmap.PAGESIZE // 8

    def __init__(self) -> None:
        self._pages: list[mmap.mmap] = []

    def _at(self, index: int) -> tuple[mmap.mmap, int]:
        page, slot = divmod(index, self.PAGE_SLOTS)
        while len(self._pages) <= page:
            self._pages.append(mmap.mmap(-1, mmap.PAGESIZE))  # MAP_SHARED: seen across fork
        return self._pages[page], 8 * slot

    @property
    def slots(self) -> int:
        return len(self._pages) * self.PAGE_SLOTS

    def beat(self, index: int) -> None:
        struct.pack_into("<d", *self._at(index), time.monotonic())

    def age(self, index: int) -> float:
        (t,) = struct.unpack_from("<d", *self._at(index))
        return time.monotonic() - t if t else 0.0

    def clear(self, index: int) -> None:
        struct.pack_into("<d", *self._at(index), 0.0)
