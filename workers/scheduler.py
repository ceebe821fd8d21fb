"""A worker's recognition threads and the order in which they serve its calls.

Every call channel with recognition work queued (an :class:`~workers.asr.AsrStream`)
waits in one priority queue. A turn is a slice of that stream's work (a few hundred ms
of audio at most), after which it queues again, so a call with a backlog cannot hold a
thread that other calls' finals wait for. The order:

1. streams whose final is awaited: the utterance ended, paused (its final is prepared
   while the hangover runs) or was ended by a reset. A dialer waits on these;
2. streams with only audio to decode, first come first served;
3. background streams (a recorded file, ``source: file``), awaited finals first, then
   audio: a thread takes one only when no live call has work queued. A background slice
   already running finishes (200 ms of audio at most), so live work waits behind a file
   for one slice at worst, never for the file's backlog.

Vosk releases the GIL inside its calls, so the threads decode in parallel; the main
loop never runs Vosk and never waits for these threads.
"""

from __future__ import annotations

import heapq
import itertools
import threading
from typing import Protocol


__all__ = ["Slice", "AsrScheduler"]

URGENT = 0
NORMAL = 1
BACKGROUND_URGENT = 2
BACKGROUND = 3


class Slice(Protocol):
    """What the scheduler runs: a stream's next slice of work."""

    def run_slice(self) -> None:
        """Do one slice of work; queue again (``AsrScheduler.submit``) if more is left."""


class AsrScheduler:
    """``threads`` recognition threads serving a priority queue of streams (see the module docstring)."""

    def __init__(self, threads: int, name: str = "asr") -> None:
        self._cv = threading.Condition()
        self._heap: list[tuple[int, int, int, Slice]] = []  # (priority, ticket, id, stream)
        self._queued: dict[int, tuple[int, int]] = {}  # id(stream) -> (priority, ticket) of its live entry
        self._tickets = itertools.count()
        self._stopping = False
        self.turns = [0, 0, 0, 0]  # slices run per priority (urgent, normal, background ...): what the order did
        self._threads = [
            threading.Thread(target=self._serve, name=f"{name}-{i}", daemon=True) for i in range(max(1, threads))
        ]
        for t in self._threads:
            t.start()

    def submit(self, stream: Slice, urgent: bool, background: bool = False) -> None:
        """Queue ``stream`` for its next slice (it must not be queued already); a
        ``background`` stream goes after every live one."""
        with self._cv:
            self._push(stream, (URGENT if urgent else NORMAL) + (BACKGROUND_URGENT if background else 0))
            self._cv.notify()

    def promote(self, stream: Slice) -> None:
        """A queued stream's final became awaited: move it ahead of audio-only work of its
        class (a background stream stays behind every live one).

        Does nothing if the stream is running a slice now: it queues again, urgent, after it.
        """
        with self._cv:
            entry = self._queued.get(id(stream))
            if entry is not None and entry[0] in (NORMAL, BACKGROUND):
                self._push(stream, entry[0] - 1)  # the old entry goes stale (its ticket no longer matches)
                self._cv.notify()

    def _push(self, stream: Slice, priority: int) -> None:
        ticket = next(self._tickets)
        self._queued[id(stream)] = (priority, ticket)
        heapq.heappush(self._heap, (priority, ticket, id(stream), stream))

    @property
    def waiting(self) -> int:
        """Streams queued for a slice now."""
        with self._cv:
            return len(self._queued)

    def _serve(self) -> None:
        while True:
            with self._cv:
                stream = None
                while stream is None:
                    while not self._heap and not self._stopping:
                        self._cv.wait()
                    if self._stopping:
                        return
                    priority, ticket, key, candidate = heapq.heappop(self._heap)
                    if self._queued.get(key) == (priority, ticket):
                        del self._queued[key]
                        stream = candidate
                        self.turns[priority] += 1
            stream.run_slice()

    def shutdown(self) -> None:
        """Stop the threads after the slices they are running; drop what is queued."""
        with self._cv:
            self._stopping = True
            self._heap.clear()
            self._queued.clear()
            self._cv.notify_all()
        for t in self._threads:
            t.join()
