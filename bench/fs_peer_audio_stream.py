"""mod_audio_stream on one channel, played by the FreeSWITCH peer: ``uuid_audio_stream`` and its stream.

Not FreeSWITCH: the amigniter (libwsc) build of mod_audio_stream as the peer standing in for
FreeSWITCH runs it, following PROTOCOLS.md §1.2 (the API command), §1.8-§1.10 and §7:

* ``uuid_audio_stream <uuid> start <ws-url> <mix> [<rate>] [<metadata…>]`` answers
  ``+OK Success`` before the connection is made (a server not listening gives
  ``mod_audio_stream::error`` code 6 afterwards, §7); connected, it fires ``::connect``, sends
  the metadata as one text frame, then one binary frame of the caller's audio per 20 ms
  at the requested rate (silence when the caller says nothing);
* a server text frame is ``mod_audio_stream::json`` with the text as its body, or, a valid
  ``streamAudio``, a file ``<dir>/<uuid>_<n>.tmp.<ext>`` and ``mod_audio_stream::play``
  whose body is ``data`` without ``audioData`` and with ``file``; the module never plays it
  (the controller does, ``uuid_broadcast``);
* a server Close gives ``::disconnect`` and no reconnect (the bug stays attached);
* ``stop`` and the hang-up close with 1000 "Normal closure", no event, and delete the files.

The WebSocket itself is the ``websockets`` client's, as farm/sender.py's: tests/peers.py is
the peer that writes libwsc's handshake byte for byte; here what matters is the control
around the stream.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import soxr
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from bench.fs_peer_channel import PTIME_MS, Channel
from bench.fs_peer_wire import FiredEvent


__all__ = ["AudioStreamBug", "USAGE"]

# mod_audio_stream.c's STREAM_API_SYNTAX (amigniter), as its -USAGE reply writes it (§1.2).
USAGE = (
    "<uuid> [start | stop | send_text | pause | resume | graceful-shutdown ] [wss-url | path] "
    "[mono | mixed | stereo] [8000 | 16000] [metadata]"
)
# streamAudio's raw sample rates and the extension of the file each is written to (§1.8).
RAW_EXT = {8000: "r8", 16000: "r16", 24000: "r24", 32000: "r32", 48000: "r48", 64000: "r64"}
CONNECT_TIMEOUT_S = 2.0  # libwsc's (§1.11)

Fire = Callable[..., FiredEvent]


def _rate(token: str) -> int | None:
    """``16k`` -> 16000, ``8k`` -> 8000, else an integer that must be a multiple of 8000 (§1.2)."""
    value = {"16k": 16000, "8k": 8000}.get(token)
    if value is None:
        value = int(token) if token.isdigit() else 0
    return value if value > 0 and value % 8000 == 0 else None


class AudioStreamBug:
    """mod_audio_stream's media bug on one channel (the amigniter build), as the peer runs it.

    Not FreeSWITCH: a peer following PROTOCOLS.md §1. Records: ``texts`` (server text
    frames), ``files`` (streamAudio files written), ``sent_bytes`` (caller audio sent),
    ``close_code`` (the server's Close, if it closed), ``urls`` (each ``start``'s URL).
    """

    def __init__(self, channel: Channel, fire: Fire, errors: list[str], files_dir: Path | None = None) -> None:
        self.channel = channel
        self.fire = fire
        self.errors = errors
        self.files_dir = files_dir or Path(tempfile.gettempdir())
        self.active = False  # the bug is attached (a second start fails until stop)
        self.rate = 8000
        self.ws: ClientConnection | None = None
        self.connected = asyncio.Event()
        self.texts: list[str] = []
        self.files: list[Path] = []
        self.urls: list[str] = []
        self.sent_bytes = 0
        self.close_code: int | None = None
        self._pending = bytearray()
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._queued = 0
        self._written = 0
        self._task: asyncio.Task[None] | None = None

    # -- the API command (§1.2) ---------------------------------------------------

    def api(self, arg: str) -> str:
        """``uuid_audio_stream <arg>``: the reply body; a ``start`` runs on in a task."""
        # switch_separate_string into at most 6 tokens: the metadata keeps its spaces.
        argv = arg.split(" ", 5)
        if len(argv) < 2:
            return f"-USAGE: {USAGE}\n"
        command = argv[1].lower()
        if command == "start":
            if len(argv) < 4:
                return f"-USAGE: {USAGE}\n"
            url, rate = argv[2], _rate(argv[4]) if len(argv) > 4 else 8000
            if self.active or rate is None or not url.startswith(("ws://", "wss://")):
                return "-ERR Operation Failed\n"
            self.active, self.rate = True, rate
            self.urls.append(url)
            metadata = argv[5] if len(argv) > 5 else None
            self._task = asyncio.get_running_loop().create_task(self._run(url, metadata))
            return "+OK Success\n"
        if command == "stop":
            if not self.active:
                return "-ERR Operation Failed\n"
            self.stop()
            return "+OK Success\n"
        return "-ERR Operation Failed\n"  # send_text, pause, resume: not modelled

    # -- the caller --------------------------------------------------------------

    async def speak(self, pcm16k: bytes, timeout: float = 10.0) -> None:
        """Queue the caller's speech (16 kHz int16 mono) for the next frames; return once sent."""
        await asyncio.wait_for(self.connected.wait(), timeout)
        pcm = pcm16k
        if self.rate != 16000:
            pcm = soxr.resample(np.frombuffer(pcm16k, dtype="<i2"), 16000, self.rate).astype("<i2").tobytes()
        self._pending += pcm
        self._queued += len(pcm)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((self._queued, fut))
        await fut

    # -- the stream --------------------------------------------------------------

    def _event(self, subclass: str, body: dict[str, Any] | str) -> None:
        text = body if isinstance(body, str) else json.dumps(body, separators=(",", ":"))
        self.fire("CUSTOM", subclass=f"mod_audio_stream::{subclass}", body=text)

    async def _run(self, url: str, metadata: str | None) -> None:
        try:
            await self._stream(url, metadata)
        except Exception as exc:  # a peer bug must show up in the test, not stop the stream silently
            self.errors.append(f"mod_audio_stream: {exc!r}")
            raise

    async def _stream(self, url: str, metadata: str | None) -> None:
        try:
            ws = await connect(
                url,
                compression=None,  # libwsc offered no permessage-deflate on a live FreeSWITCH (§7)
                ping_interval=None,
                max_size=None,
                open_timeout=CONNECT_TIMEOUT_S,
                user_agent_header=None,
            )
        except Exception as exc:  # refused, timed out, 4xx: ::error, and the bug is closed (§1.10)
            self.errors.append(f"mod_audio_stream: connect to {url} failed: {exc!r}")
            self._event("error", {"status": "error", "message": {"code": 6, "error": str(exc)}})
            self.active = False
            self._fail_waiters("the stream did not connect")
            return
        self.ws = ws
        self._event("connect", {"status": "connected"})
        self.connected.set()
        if metadata:
            await ws.send(metadata)
        reader = asyncio.create_task(self._receive(ws))
        try:
            await self._frames(ws)
        except ConnectionClosed:
            pass
        finally:
            reader.cancel()
            self._fail_waiters("the stream closed before the speech went out")

    async def _frames(self, ws: ClientConnection) -> None:
        size = self.rate // 1000 * PTIME_MS * 2
        period = PTIME_MS * 1_000_000
        t0 = time.monotonic_ns()
        k = 0
        while self.active and not self.channel.hung_up and ws.close_code is None:
            k += 1
            delay = t0 + k * period - time.monotonic_ns()
            if delay > 0:
                await asyncio.sleep(delay / 1e9)
            data = bytes(self._pending[:size])
            del self._pending[:size]
            self._written += len(data)
            await ws.send(data + bytes(size - len(data)))
            self.sent_bytes += size
            while self._waiters and self._waiters[0][0] <= self._written:
                _, fut = self._waiters.pop(0)
                if not fut.done():
                    fut.set_result(None)

    async def _receive(self, ws: ClientConnection) -> None:
        try:
            async for message in ws:
                if isinstance(message, str):
                    self.texts.append(message)
                    self._text(message)
        except ConnectionClosed:
            pass
        close = ws.protocol.close_rcvd
        if self.active and close is not None:
            # The server closed: ::disconnect, no reconnect, the bug stays attached (§1.10).
            self.close_code = close.code
            reason = {"code": close.code, "reason": close.reason}
            self._event("disconnect", {"status": "disconnected", "message": reason})

    def _text(self, text: str) -> None:
        """processMessage: a valid streamAudio becomes a file and ``::play``, the rest ``::json``."""
        with contextlib.suppress(ValueError, TypeError, KeyError):
            message = json.loads(text)
            data = message["data"] if message.get("type") == "streamAudio" else None
            if isinstance(data, dict) and data.get("audioDataType") == "raw":
                ext = RAW_EXT.get(data.get("sampleRate"))  # type: ignore[arg-type]
                audio = base64.b64decode(data["audioData"], validate=True)
                if ext is not None:
                    path = self.files_dir / f"{self.channel.uuid}_{len(self.files)}.tmp.{ext}"
                    path.write_bytes(audio)
                    self.files.append(path)
                    body = {k: v for k, v in data.items() if k != "audioData"}
                    self._event("play", {**body, "file": str(path)})
                    return
        self._event("json", text)

    # -- the end -----------------------------------------------------------------

    def stop(self) -> None:
        """``stop`` or the hang-up: Close 1000 "Normal closure", no event, files deleted (§1.8, §7)."""
        self.active = False
        ws = self.ws
        if ws is not None and ws.close_code is None:
            asyncio.get_running_loop().create_task(ws.close(1000, "Normal closure"))
        for path in self.files:
            path.unlink(missing_ok=True)
        self._fail_waiters("the stream was stopped")

    def _fail_waiters(self, why: str) -> None:
        for _, fut in self._waiters:
            if not fut.done():
                fut.set_exception(ConnectionError(why))
        self._waiters.clear()

    async def aclose(self) -> None:
        """Tear down without protocol (test cleanup)."""
        self.active = False
        if self.ws is not None:
            self.ws.transport.abort()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
