"""mod_socket_audio's playback side, played by the FreeSWITCH peer in tests: sidecar -> channel.

Not FreeSWITCH: ``socket_audio_thread`` of mod_socket_audio.c (10d9959) as the peer standing
in for it runs it, following PROTOCOLS.md §2.4-§2.6: a blocking ``recv`` of up to 8192 bytes,
the flush and 50 ms discard checks, the queue, and a playback loop that plays one 20 ms frame
per ptime (sleep-paced: real time, never faster), with ``playback_start``/``playback_stop``
and the non-blocking look that coalesces consecutive chunks into one turn. A read-ahead
buffer stands in for the kernel's socket buffer, so farm's writes are timed as they arrive
while TCP backpressure still reaches farm. The module's start, stop and mic side are
bench/fs_peer_socket_audio.py's.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable, Iterable
from typing import Protocol

from bench.fs_peer_channel import PTIME_MS


__all__ = ["DISCARD_NS", "OUTPUT_RATE", "PLAY_FRAME", "ModuleEvent", "Playback"]

# mod_socket_audio.c constants (§2.2, §2.4, §2.5).
OUTPUT_RATE = 24000
RECV_SIZE = 8192
DISCARD_NS = 50_000_000
PLAY_FRAME = OUTPUT_RATE // 1000 * PTIME_MS * 2  # 960 B: the peer plays the 24 kHz bytes it got
QUEUE_MAX = 48000 * 2 * 90


class ModuleEvent(Protocol):
    """Fires one of the module's CUSTOM events with the channel's data (§2.7)."""

    def __call__(
        self,
        name: str,
        extra: Iterable[tuple[str, str]] = (),
        *,
        subclass: str | None = None,
        calling: str | None = None,
    ) -> object: ...


class Playback:
    """The module's thread for one channel: reception, flush, queue and paced playback.

    Args:
        rate: the session rate (at 24 kHz the module does not resample, so an odd byte stays).
        read_ahead: bytes of farm's playback held before TCP backpressure (see ``playback_recv``).
        fire: fires ``socket_audio::playback_start`` / ``playback_stop`` for the channel.

    Records (all times ``time.monotonic_ns()``):
        playback_recv: ``(t_ns, nbytes)`` per read of farm's playback bytes off the socket, as
            they arrive (read eagerly into a ``read_ahead`` buffer that stands in for the kernel
            socket buffer): when farm's audio got here, to see how far ahead of real time it writes.
        module_recv: ``(t_ns, nbytes)`` per ``recv`` the module's thread makes from that buffer
            (≤ 8192 B, only when its queue is nearly empty, §2.4).
        played: ``(t_ns, frame)`` per 20 ms frame written to the channel (24 kHz bytes).
        discarded: ``(t_ns, nbytes)`` per chunk dropped by a flush or its 50 ms window (for the
            window, ``t_ns`` is the time the module compared with the window's end).
        flushes: ``(t_ns, consumer, queued_bytes_cleared, was_playing)`` per flush consumed.
        violations: odd recv lengths / odd totals from farm (they byte-shift the stream, §2.4).
        eof_ns: when farm closed (or reset) the socket.
    """

    def __init__(self, rate: int, read_ahead: int, fire: ModuleEvent) -> None:
        self.rate = rate
        self.read_ahead = read_ahead
        self.fire = fire
        self.flush_flag = False
        self.discard_until_ns = 0
        self.playing = False
        self.queue = bytearray()
        self._recv_total = 0
        self._kbuf = bytearray()  # the kernel's receive buffer, as far as the module can tell
        self._kdata = asyncio.Event()
        self._kroom = asyncio.Event()
        self._keof = False
        self.eof_ns: int | None = None
        self.playback_recv: list[tuple[int, int]] = []
        self.module_recv: list[tuple[int, int]] = []
        self.played: list[tuple[int, bytes]] = []
        self.discarded: list[tuple[int, int]] = []
        self.flushes: list[tuple[int, str, int, bool]] = []
        self.violations: list[str] = []

    async def read_socket(self, sock: socket.socket) -> None:
        """Read farm's bytes as they arrive (timing on the wire), holding at most ``read_ahead``
        of them so TCP backpressure still reaches farm when the module stops reading."""
        loop = asyncio.get_running_loop()
        self._kroom.set()
        try:
            while True:
                while len(self._kbuf) >= self.read_ahead:
                    self._kroom.clear()
                    await self._kroom.wait()
                try:
                    chunk = await loop.sock_recv(sock, 65536)
                except OSError:
                    chunk = b""
                if not chunk:
                    self.eof_ns = time.monotonic_ns()
                    return
                self.playback_recv.append((time.monotonic_ns(), len(chunk)))
                self._kbuf += chunk
                self._kdata.set()
        finally:
            self._keof = True
            self._kdata.set()

    def _recv_nowait(self) -> bytes:
        """recv(8192) on the module's socket: what is buffered, b"" when nothing (or EOF)."""
        data = bytes(self._kbuf[:RECV_SIZE])
        del self._kbuf[:RECV_SIZE]
        self._kroom.set()
        return data

    async def _recv(self) -> bytes:
        """The blocking recv: b"" only at EOF."""
        while not self._kbuf and not self._keof:
            self._kdata.clear()
            await self._kdata.wait()
        return self._recv_nowait()

    def _take(self, chunk: bytes) -> bytes:
        """Record one module recv and return what the resampler uses (odd last byte dropped)."""
        now = time.monotonic_ns()
        self.module_recv.append((now, len(chunk)))
        self._recv_total += len(chunk)
        if len(chunk) % 2:
            self.violations.append(
                f"recv {len(self.module_recv)} of {len(chunk)} bytes is odd (total {self._recv_total}):"
                " the module drops the last byte and the stream is byte-shifted"
            )
        if self.rate != OUTPUT_RATE:
            chunk = chunk[: len(chunk) - len(chunk) % 2]
        return chunk

    def _consume_flush(self, consumer: str, calling: str) -> None:
        cleared = len(self.queue)
        self.queue.clear()
        self.flush_flag = False
        self.discard_until_ns = time.monotonic_ns() + DISCARD_NS
        self.flushes.append((time.monotonic_ns(), consumer, cleared, self.playing))
        if self.playing:
            self.playing = False
            self.fire(
                "CUSTOM", [("Playback-Stop-Reason", "flush")], subclass="socket_audio::playback_stop", calling=calling
            )

    def _discarding(self, chunk: bytes) -> bool:
        now = time.monotonic_ns()
        if self.discard_until_ns and now < self.discard_until_ns:
            self.discarded.append((now, len(chunk)))
            return True
        return False

    def _enqueue(self, data: bytes) -> None:
        self.queue += data
        if len(self.queue) > QUEUE_MAX:
            del self.queue[: len(self.queue) - QUEUE_MAX]

    def _play(self, frame: bytes) -> None:
        self.played.append((time.monotonic_ns(), frame))

    async def run(self, active: Callable[[], bool]) -> None:
        """socket_audio_thread: blocking recv, flush/discard checks, queue, paced playback loop."""
        period = PTIME_MS * 1_000_000
        try:
            while active():
                chunk = await self._recv()
                if not chunk:
                    break
                data = self._take(chunk)
                if self.flush_flag:
                    self.discarded.append((time.monotonic_ns(), len(chunk)))
                    self._consume_flush("socket_thread", "playback_stop_recv")
                    continue
                if self._discarding(chunk):
                    continue
                self.discard_until_ns = 0
                self._enqueue(data)
                next_ns = time.monotonic_ns()
                while active():
                    if not self.playing and len(self.queue) >= PLAY_FRAME:
                        self.playing = True
                        self.fire("CUSTOM", subclass="socket_audio::playback_start", calling="playback_start")
                    if self.flush_flag:
                        self._consume_flush("playback_loop", "playback_stop_flush")
                        break
                    if len(self.queue) < PLAY_FRAME:
                        more = self._recv_nowait()  # the non-blocking look (10d9959)
                        if more:
                            data = self._take(more)
                            if self.flush_flag or self._discarding(more):
                                if self.flush_flag:
                                    self.discarded.append((time.monotonic_ns(), len(more)))
                                continue
                            self._enqueue(data)
                            continue
                        if self.playing:
                            if self.queue:
                                self._play(bytes(self.queue) + bytes(PLAY_FRAME - len(self.queue)))
                                self.queue.clear()
                                next_ns += period
                                await _sleep_until(next_ns)
                            self.playing = False
                            self.fire(
                                "CUSTOM",
                                [("Playback-Stop-Reason", "complete")],
                                subclass="socket_audio::playback_stop",
                                calling="playback_stop_complete",
                            )
                        break
                    self._play(bytes(self.queue[:PLAY_FRAME]))
                    del self.queue[:PLAY_FRAME]
                    # Real time with no catch-up burst: the module sleeps one ptime per frame.
                    next_ns = max(next_ns + period, time.monotonic_ns() - period)
                    await _sleep_until(next_ns)
        finally:
            if self._recv_total % 2:
                self.violations.append(f"farm sent {self._recv_total} bytes in all: not whole 16-bit samples")


async def _sleep_until(deadline_ns: int) -> None:
    delay = deadline_ns - time.monotonic_ns()
    if delay > 0:
        await asyncio.sleep(delay / 1e9)
