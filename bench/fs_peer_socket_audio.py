"""mod_socket_audio on one channel, played by the FreeSWITCH peer in tests: start, stop, the mic.

Not FreeSWITCH: mod_socket_audio.c (10d9959) as the peer standing in for it runs it,
following PROTOCOLS.md §2.1-§2.6 and §7. :class:`SocketAudio` is the module's per-channel
context: ``socket_audio <host> <port>`` connects to farm's sidecar port as a TCP client (a
failure is only logged), ``uuid_socket_audio_flush`` sets the flush flag, and
``uuid_socket_audio_stop`` or the hang-up close the socket without an event.
:class:`MicStream` is FreeSWITCH -> sidecar: the caller's 16 kHz audio, one 640-byte write
per 20 ms on a fixed grid, as switch_socket_send_nonblock writes it. The other direction
(reception, flush, paced playback) is bench/fs_peer_playback.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections.abc import Callable

from bench.fs_peer_channel import PTIME_MS, Channel
from bench.fs_peer_playback import ModuleEvent, Playback


__all__ = ["INPUT_RATE", "MIC_FRAME", "MicStream", "SocketAudio"]

# mod_socket_audio.c constants (§2.2, §2.3).
INPUT_RATE = 16000
MIC_FRAME = INPUT_RATE // 1000 * PTIME_MS * 2  # 640 B


class MicStream:
    """FreeSWITCH -> sidecar (§2.3): the caller's speech, else silence, one write per ptime.

    Args:
        idle_silence: send 640 B of zeros every 20 ms when no speech is queued, as a
            real channel sends its (silent) caller audio.

    Records (all times ``time.monotonic_ns()``):
        mic_sent: ``(t_ns, nbytes, is_speech)`` per mic write; ``speech_sent`` the speech ones.
        mic_due: per mic write (same index as ``mic_sent``), the time its 20 ms slot began on the
            stream's fixed grid (``start + k * 20 ms``): when it was due, however late it went out.
        mic_dropped: bytes FreeSWITCH would have lost (kernel buffer full, §7).
    """

    def __init__(self, idle_silence: bool) -> None:
        self.idle_silence = idle_silence
        self._pending = bytearray()
        self._speech_queued = 0
        self._speech_written = 0
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._odd_splits = False
        self._index = 0
        self._total = 0
        self._short_next = False
        self.mic_sent: list[tuple[int, int, bool]] = []
        self.mic_due: list[int] = []
        self.speech_sent: list[tuple[int, int]] = []
        self.mic_dropped = 0

    async def speak(self, pcm16k: bytes, odd_splits: bool) -> list[tuple[int, int]]:
        """Queue the caller's speech for the next frames; returns the writes that carried it."""
        self._odd_splits = odd_splits
        start = len(self.speech_sent)
        self._pending += pcm16k
        self._speech_queued += len(pcm16k)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((self._speech_queued, fut))
        await fut
        return self.speech_sent[start:]

    @property
    def first_speech_ns(self) -> int | None:
        return self.speech_sent[0][0] if self.speech_sent else None

    def fail_waiters(self, why: str) -> None:
        """Speech queued by :meth:`speak` will not go out: its callers get an error, not a hang."""
        for _, fut in self._waiters:
            if not fut.done():
                fut.set_exception(ConnectionError(why))
        self._waiters.clear()

    def _size(self) -> int:
        """640, or a 641 + 639 pair now and then with ``odd_splits`` (the totals stay on the grid)."""
        if self._short_next:
            self._short_next = False
            return MIC_FRAME - 1
        if self._odd_splits and len(self._pending) >= 2 * MIC_FRAME and self._index % 3 == 1:
            self._short_next = True
            return MIC_FRAME + 1
        return MIC_FRAME

    async def run(self, sock: socket.socket, running: Callable[[], bool]) -> None:
        """One write per 20 ms against the monotonic clock (no drift); a full kernel buffer drops
        the frame and a partial write loses its remainder, as switch_socket_send_nonblock does."""
        try:
            await self._frames(sock, running)
        finally:
            # The media bug stopped (module thread ended, socket gone): what was queued is lost.
            self.fail_waiters("the mic stream stopped before the speech went out")

    async def _frames(self, sock: socket.socket, running: Callable[[], bool]) -> None:
        period = PTIME_MS * 1_000_000
        t0 = time.monotonic_ns()
        k = 0
        while running():
            k += 1
            due = t0 + k * period
            delay = due - time.monotonic_ns()
            if delay > 0:
                await asyncio.sleep(delay / 1e9)
            if not running():
                return
            size = self._size()
            speech = bool(self._pending)
            if speech:
                data = bytes(self._pending[:size])
                del self._pending[:size]
                if len(data) < size:
                    # Silence completes the last frame so the stream is back on the 640 B grid:
                    # FreeSWITCH's frames are whole, only a TCP split moves the boundaries.
                    data += bytes((-(self._total + len(data))) % MIC_FRAME)
                    self._odd_splits = False
            elif self.idle_silence:
                data = bytes(MIC_FRAME)
            else:
                continue
            self._index += 1
            self._total += len(data)
            now = time.monotonic_ns()
            try:
                sent = sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                return
            self.mic_dropped += len(data) - sent
            self.mic_sent.append((now, sent, speech))
            self.mic_due.append(due)
            if speech:
                self.speech_sent.append((now, sent))
                self._speech_written += min(len(data), self._speech_queued - self._speech_written)
                while self._waiters and self._waiters[0][0] <= self._speech_written:
                    _, fut = self._waiters.pop(0)
                    if not fut.done():
                        fut.set_result(None)


class SocketAudio:
    """mod_socket_audio's context on one channel (socket_audio_ctx_t): the pipe's life.

    Args:
        channel: the channel it runs on (its rate; a hung-up channel stops the module's thread).
        errors: where to put what the real module would only log (failed connect, bad arguments).
        fire: fires the module's CUSTOM events for the channel (:class:`Playback`).
        never_connect: ``socket_audio`` answers as usual but never connects.
        idle_silence: see :class:`MicStream`.
        connect_timeout: how long the TCP connect may take.
        rcvbuf: SO_RCVBUF of the module's socket (None: the system's).
        read_ahead: see :class:`Playback`.

    ``mic`` and ``playback`` live as long as the channel, so their records span every pipe.
    """

    def __init__(
        self,
        channel: Channel,
        errors: list[str],
        fire: ModuleEvent,
        *,
        never_connect: bool,
        idle_silence: bool,
        connect_timeout: float,
        rcvbuf: int | None,
        read_ahead: int,
    ) -> None:
        self.channel = channel
        self.errors = errors
        self.never_connect = never_connect
        self.connect_timeout = connect_timeout
        self.rcvbuf = rcvbuf
        self.mic = MicStream(idle_silence)
        self.playback = Playback(channel.rate, read_ahead, fire)
        self.active = False  # the channel private exists (flush/stop answer +OK)
        self.sock: socket.socket | None = None
        self.connected = asyncio.Event()
        self.closed = asyncio.Event()
        self.connected_ns: int | None = None
        self.running = False
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self, arg: str) -> list[asyncio.Task[None]]:
        """socket_audio_start: parse, connect (blocking in FreeSWITCH), start the pipe; on any
        failure only log (``errors``): no event, no variable (§2.1). Returns the pipe's tasks."""
        parts = arg.split(" ")
        if len(parts) != 2 or not parts[1].isdigit() or not 0 < int(parts[1]) <= 65535:
            self.errors.append(f"socket_audio: usage/invalid port in {arg!r}")
            return []
        if self.never_connect:
            self.errors.append("socket_audio: never_connect_audio set, not connecting")
            return []
        host, port = parts[0], int(parts[1])
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            family, _, _, _, address = infos[0]
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setblocking(False)
            if self.rcvbuf:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
            try:
                await asyncio.wait_for(loop.sock_connect(sock, address), self.connect_timeout)
            except BaseException:
                sock.close()
                raise
        except (TimeoutError, OSError) as exc:
            self.errors.append(f"socket_audio: failed to connect to {host}:{port}: {exc!r}")
            return []
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.connected_ns = time.monotonic_ns()
        self.running = True
        self.active = True
        self.closed.clear()
        self.connected.set()
        self._tasks = [
            asyncio.create_task(self.mic.run(sock, lambda: self.running)),
            asyncio.create_task(self.playback.read_socket(sock)),
            asyncio.create_task(self._thread()),
        ]
        return self._tasks

    async def stream(self, pcm16k: bytes, odd_splits: bool, timeout: float) -> list[tuple[int, int]]:
        """Wait for the socket, then send the caller's speech on the next mic frames."""
        await asyncio.wait_for(self.connected.wait(), timeout)
        if not self.running:
            raise ConnectionError("the audio socket is closed")
        return await self.mic.speak(pcm16k, odd_splits)

    def request_flush(self) -> None:
        """uuid_socket_audio_flush: only sets the flag (§2.5)."""
        self.playback.flush_flag = True

    def stop_now(self) -> None:
        """Media bug removed (uuid_socket_audio_stop, hang-up): shutdown(RDWR) + close, no event."""
        self.active = False
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
            self._cleanup()

    def reset(self) -> None:
        """A crashed FreeSWITCH: the socket is reset (SO_LINGER 0 + close)."""
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self._cleanup()

    async def _thread(self) -> None:
        try:
            await self.playback.run(lambda: self.running and not self.channel.hung_up)
        finally:
            self.running = False  # the media bug stops sending mic audio (§2.3)

    def _cleanup(self) -> None:
        self.running = False
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
        sock, self.sock = self.sock, None
        if sock is not None:
            # Unhook the fd from the loop before closing it: a task may be parked in sock_recv.
            with contextlib.suppress(Exception):
                loop = asyncio.get_running_loop()
                loop.remove_reader(sock.fileno())
                loop.remove_writer(sock.fileno())
            sock.close()
        self.closed.set()
        self.mic.fail_waiters("audio socket closed")
