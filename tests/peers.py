"""Peers that stand in for FreeSWITCH in tests, byte for byte (PROTOCOLS.md §1.6, §1.7, §7).

:class:`AudioStreamPeer` is FreeSWITCH's mod_audio_stream as a WebSocket *client* on a
raw TCP socket, not a WebSocket library with FreeSWITCH-like defaults: the upgrade
request is written exactly as the chosen generation writes it (header names, order,
spacing, CRLF), the 101 answer and its ``Sec-WebSocket-Accept`` are checked the way
the module checks them, and every frame it sends is masked per RFC 6455. It answers
pings, collects what the server sends back, and ends with Close 1000 "Normal
closure" like ``uuid_audio_stream stop`` and hang-up do (§1.7, §7).

Two generations are modelled (§1.6, §1.11, headers as recorded in ../captures):

* ``amigniter`` (libwsc, current): ``Host:h:p`` with no space after the colon,
  ``Connection:upgrade``, ``Origin:http://h:p``, optionally the permessage-deflate
  offer of TV-MAS-2.
* ``sptmru`` (IXWebSocket 11.4.3, also AMS-IX): ``Host: h:p``, ``Connection: Upgrade``,
  ``User-Agent: ixwebsocket/…``, ``Origin: ws://h:p``, key from 16 alphanumerics.

:class:`Capture` reads a recording (``conn*.jsonl`` + ``conn*.raw``) and
:meth:`AudioStreamPeer.replay` sends it again: the text frames verbatim and the
binary frames with their recorded sizes at their recorded times, the audio taken
sequentially from the ``.raw`` file.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import random
import string
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from websockets.extensions.base import Extension
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory
from websockets.frames import Frame, Opcode
from websockets.headers import parse_extension


__all__ = ["AudioStreamPeer", "Capture", "Step", "HandshakeRefused", "DEFLATE_OFFER", "IX_USER_AGENT", "HEARTBEAT"]

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
# libwsc's offer, as in TV-MAS-2 (absent when STREAM_MESSAGE_DEFLATE=true).
DEFLATE_OFFER = "permessage-deflate; client_no_context_takeover; server_no_context_takeover; client_max_window_bits=9"
IX_USER_AGENT = "ixwebsocket/11.4.3 linux ssl/OpenSSL OpenSSL 3.0.22 25 Aug 2026 zlib 1.2.13"
# Heart-beat ping payloads with STREAM_HEART_BEAT set (§1.6): libwsc, IXWebSocket (N s, count).
HEARTBEAT = {"amigniter": b"ping", "sptmru": b"ixwebsocket::heartbeat::30s::0"}


class HandshakeRefused(Exception):
    """The server did not answer 101 (or answered it wrongly): what FreeSWITCH logs as ::error."""

    def __init__(self, status: int, headers: dict[str, str], body: bytes, why: str) -> None:
        super().__init__(f"{why}: HTTP {status}")
        self.status = status
        self.headers = headers
        self.body = body


def upgrade_request(flavor: str, host: str, port: int, path: str, key: str, *, deflate: bool = False) -> bytes:
    """The HTTP upgrade request of one mod_audio_stream generation, byte for byte."""
    if flavor == "amigniter":
        lines = [
            f"GET {path} HTTP/1.1",
            f"Host:{host}:{port}",
            "Upgrade:websocket",
            "Connection:upgrade",
            f"Sec-WebSocket-Key:{key}",
            "Sec-WebSocket-Version:13",
        ]
        if deflate:
            lines.append(f"Sec-WebSocket-Extensions:{DEFLATE_OFFER}")
        lines.append(f"Origin:http://{host}:{port}")
    elif flavor == "sptmru":
        if deflate:
            raise ValueError("the sptmru build never offers permessage-deflate (§1.6, §7)")
        lines = [
            f"GET {path} HTTP/1.1",
            f"Host: {host}:{port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            "Sec-WebSocket-Version: 13",
            f"Sec-WebSocket-Key: {key}",
            f"User-Agent: {IX_USER_AGENT}",
            f"Origin: ws://{host}:{port}",
        ]
    else:
        raise ValueError(f"unknown mod_audio_stream generation {flavor!r}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


def new_key(flavor: str) -> str:
    if flavor == "sptmru":
        # IXWebSocket: base64 of 16 random alphanumerics (the capture's key decodes so).
        alnum = string.ascii_letters + string.digits
        return base64.b64encode("".join(random.choice(alnum) for _ in range(16)).encode()).decode()
    return base64.b64encode(os.urandom(16)).decode()


def accept_for(key: str) -> str:
    return base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()


# -- captures ----------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One thing the peer sends during a replay, ``at`` seconds after the handshake."""

    at: float
    kind: str  # "text" | "binary" | "close"
    text: str = ""
    size: int = 0
    code: int = 0
    logged: bool = True  # False: time reconstructed (the recorder logs frames 1-15, then every 50th)


@dataclass
class Capture:
    """One recorded mod_audio_stream connection from ../captures/…/conn*.jsonl and .raw."""

    jsonl: Path
    records: list[dict[str, Any]]
    raw: bytes

    @classmethod
    def load(cls, jsonl: Path | str) -> Capture:
        jsonl = Path(jsonl)
        records = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
        return cls(jsonl, records, jsonl.with_suffix(".raw").read_bytes())

    def _first(self, ev: str) -> dict[str, Any]:
        return next(r for r in self.records if r["ev"] == ev)

    @property
    def request_line(self) -> str:
        return str(self._first("handshake_request")["request_line"])

    @property
    def path(self) -> str:
        return self.request_line.split(" ")[1]

    @property
    def headers(self) -> dict[str, str]:
        return dict(self._first("handshake_request")["headers"])

    @property
    def flavor(self) -> str:
        return "sptmru" if self.headers.get("User-Agent", "").startswith("ixwebsocket/") else "amigniter"

    @property
    def call_id(self) -> str:
        return self.path.split("?")[0].rstrip("/").rsplit("/", 1)[-1]

    @property
    def summary(self) -> dict[str, Any]:
        return self._first("summary")

    @property
    def texts(self) -> list[str]:
        return [r["text"] for r in self.records if r["ev"] == "text"]

    def schedule(self) -> list[Step]:
        """Everything to send, in order, with times relative to the end of the handshake.

        The recorder logged binary frames 1-15 and then every 50th, plus the summary
        (frame count, sizes, median gap). Frames in between are spread evenly, except
        where the logged span is much longer than the median gap allows (a
        ``pause``/``resume`` gap, §1.2): then they are placed at the median pace
        just before the later logged frame, leaving the gap where it was.
        """
        summary = self.summary
        sizes = summary["frame_sizes"]
        if len(sizes) != 1:
            raise ValueError(f"{self.jsonl}: frames of several sizes {sizes}: cannot reconstruct unlogged ones")
        size = int(next(iter(sizes)))
        count = int(summary["bin_frames"])
        period = float(summary["gap_ms_p50"]) / 1000
        steps: list[Step] = []
        last: dict[str, Any] | None = None  # last logged binary frame
        tail: list[Step] = []  # text/close steps after the last logged binary frame

        def fill(a: dict[str, Any], n_b: int, t_b: float) -> None:
            missing = n_b - a["n"] - 1
            if missing <= 0:
                return
            span = t_b - a["rel_s"]
            if span <= (missing + 1) * period * 1.5:
                steps.extend(
                    Step(a["rel_s"] + k * span / (missing + 1), "binary", size=size, logged=False)
                    for k in range(1, missing + 1)
                )
            else:
                steps.extend(Step(t_b - k * period, "binary", size=size, logged=False) for k in range(missing, 0, -1))

        for r in self.records:
            if r["ev"] == "binary":
                if r["len"] != size:
                    raise ValueError(f"{self.jsonl}: frame {r['n']} has {r['len']} B, summary says {size}")
                if last is not None:
                    fill(last, r["n"], r["rel_s"])
                elif r["n"] != 1:
                    raise ValueError(f"{self.jsonl}: first logged frame is {r['n']}")
                steps.extend(tail)
                tail = []
                steps.append(Step(r["rel_s"], "binary", size=size))
                last = r
            elif r["ev"] == "text":
                (tail if last is not None else steps).append(Step(r["rel_s"], "text", text=r["text"]))
            elif r["ev"] == "close_frame":
                tail.append(Step(r["rel_s"], "close", text=r["reason"], code=r["code"]))
        # Frames after the last logged one: at the median pace, but before whatever
        # followed them in the log (a text frame, the Close).
        if last is not None and count > last["n"]:
            end = min((s.at for s in tail), default=float("inf"))
            extra = count - last["n"]
            for k in range(1, extra + 1):
                at = min(last["rel_s"] + k * period, end - (extra - k + 1) * 1e-4)
                steps.append(Step(at, "binary", size=size, logged=False))
        steps.extend(tail)
        n_bin = sum(1 for s in steps if s.kind == "binary")
        if n_bin != count or n_bin * size != len(self.raw):
            raise ValueError(
                f"{self.jsonl}: rebuilt {n_bin} frames of {size} B, summary says {count}, raw has {len(self.raw)} B"
            )
        return sorted(steps, key=lambda s: s.at)  # stable: recorded order kept on ties


# -- the peer ----------------------------------------------------------------------


@dataclass
class AudioStreamPeer:
    """FreeSWITCH's mod_audio_stream connecting to ``host:port`` with request target ``path``."""

    host: str
    port: int
    path: str
    flavor: str = "amigniter"
    deflate: bool = False
    key: str = ""
    # What happened:
    status: int = 0
    response_headers: dict[str, str] = field(default_factory=dict)
    extensions: list[Extension] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)  # text messages from the server
    binaries: list[bytes] = field(default_factory=list)
    pings: int = 0
    pongs: list[bytes] = field(default_factory=list)
    close_code: int | None = None  # the server's Close frame (its own or its echo of ours)
    close_reason: str = ""
    sent_frames: int = 0
    sent_audio_bytes: int = 0
    protocol_errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.key = self.key or new_key(self.flavor)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.request = b""
        self._recv_task: asyncio.Task[None] | None = None
        self.closed = asyncio.Event()  # the server sent Close or the TCP connection ended
        self.eof = asyncio.Event()
        self._close_sent = False
        self._pong_waiters: list[asyncio.Future[bytes]] = []

    # -- connection ----------------------------------------------------------------

    async def connect(self, timeout: float = 10.0) -> AudioStreamPeer:
        """TCP connect, upgrade, check the answer as the module does; raises HandshakeRefused."""
        reader, writer = await asyncio.wait_for(asyncio.open_connection(self.host, self.port), timeout)
        self.reader, self.writer = reader, writer
        self.request = upgrade_request(self.flavor, self.host, self.port, self.path, self.key, deflate=self.deflate)
        writer.write(self.request)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        parts = status_line.split(" ", 2)
        self.status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
        for line in header_lines:
            if ":" in line:
                name, value = line.split(":", 1)
                self.response_headers[name.strip().lower()] = value.strip()
        if self.status != 101 or not status_line.startswith("HTTP/1.1 101"):
            length = int(self.response_headers.get("content-length", "0") or 0)
            body = await asyncio.wait_for(reader.readexactly(length), timeout) if length else b""
            writer.close()
            raise HandshakeRefused(self.status, self.response_headers, body, "upgrade refused")
        if self.response_headers.get("sec-websocket-accept") != accept_for(self.key):
            writer.close()
            raise HandshakeRefused(self.status, self.response_headers, b"", "wrong Sec-WebSocket-Accept")
        offered = self.response_headers.get("sec-websocket-extensions")
        if offered:
            if not self.deflate:
                writer.close()
                raise HandshakeRefused(self.status, self.response_headers, b"", f"extension {offered!r} not offered")
            factory = ClientPerMessageDeflateFactory(
                server_no_context_takeover=True, client_no_context_takeover=True, client_max_window_bits=9
            )
            for name, params in parse_extension(offered):
                if name != factory.name:
                    raise HandshakeRefused(self.status, self.response_headers, b"", f"unknown extension {name}")
                self.extensions.append(factory.process_response_params(params, self.extensions))
        self._recv_task = asyncio.create_task(self._receive())
        return self

    @property
    def deflate_negotiated(self) -> bool:
        return bool(self.extensions)

    # -- sending -------------------------------------------------------------------

    def _send_frame(self, opcode: Opcode, data: bytes) -> None:
        assert self.writer is not None
        self.writer.write(Frame(opcode, data).serialize(mask=True, extensions=self.extensions))
        self.sent_frames += 1

    async def send_text(self, text: str) -> None:
        self._send_frame(Opcode.TEXT, text.encode("utf-8"))
        await self._drain()

    async def send_binary(self, data: bytes) -> None:
        self._send_frame(Opcode.BINARY, data)
        self.sent_audio_bytes += len(data)
        await self._drain()

    async def _drain(self) -> None:
        assert self.writer is not None
        await self.writer.drain()

    async def send_pcm(self, pcm: bytes, sizes: list[int], period: float, *, realtime: bool = True) -> None:
        """Send ``pcm`` in binary frames of ``sizes`` (cycled), one every ``period`` seconds."""
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        pos = i = 0
        while pos < len(pcm):
            if realtime:
                delay = t0 + i * period - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            n = sizes[i % len(sizes)]
            await self.send_binary(pcm[pos : pos + n])
            pos += n
            i += 1

    async def ping(self, payload: bytes | None = None, timeout: float = 5.0) -> bytes:
        """Send a heart-beat Ping (§1.6); return the payload of the Pong that answers it."""
        waiter: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._pong_waiters.append(waiter)
        self._send_frame(Opcode.PING, HEARTBEAT[self.flavor] if payload is None else payload)
        await self._drain()
        return await asyncio.wait_for(waiter, timeout)

    async def close(self, code: int = 1000, reason: str = "Normal closure", timeout: float = 10.0) -> None:
        """Close as FreeSWITCH does (stop, hang-up): Close frame, then wait for the server's."""
        if not self._close_sent and not self.eof.is_set():
            self._close_sent = True
            self._send_frame(Opcode.CLOSE, struct.pack("!H", code) + reason.encode("utf-8"))
            try:
                await self._drain()
            except ConnectionError:
                pass
        try:
            await asyncio.wait_for(self.eof.wait(), timeout)
        finally:
            self.abort()

    def abort(self) -> None:
        """Vanish: drop the TCP connection without a Close frame (process killed, network gone)."""
        if self.writer is not None:
            self.writer.transport.abort()

    # -- receiving -----------------------------------------------------------------

    async def _read_frame(self) -> Frame:
        assert self.reader is not None
        head1, head2 = await self.reader.readexactly(2)
        if head2 & 0x80:
            self.protocol_errors.append("server frame is masked")  # libwsc: SERVER_MASKED error
        length = head2 & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", await self.reader.readexactly(2))
        elif length == 127:
            (length,) = struct.unpack("!Q", await self.reader.readexactly(8))
        mask = await self.reader.readexactly(4) if head2 & 0x80 else b""
        data = await self.reader.readexactly(length)
        if mask:
            data = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
        return Frame(
            Opcode(head1 & 0x0F), data, bool(head1 & 0x80), bool(head1 & 0x40), bool(head1 & 0x20), bool(head1 & 0x10)
        )

    async def _receive(self) -> None:
        message: list[bytes] = []
        message_type: Opcode | None = None
        try:
            while True:
                frame = await self._read_frame()
                for ext in reversed(self.extensions):
                    frame = ext.decode(frame, max_size=None)
                if frame.opcode is Opcode.PING:
                    self.pings += 1
                    if not self._close_sent:
                        self._send_frame(Opcode.PONG, bytes(frame.data))
                elif frame.opcode is Opcode.PONG:
                    self.pongs.append(bytes(frame.data))
                    if self._pong_waiters:
                        self._pong_waiters.pop(0).set_result(bytes(frame.data))
                elif frame.opcode is Opcode.CLOSE:
                    data = bytes(frame.data)
                    self.close_code = struct.unpack("!H", data[:2])[0] if len(data) >= 2 else 1005
                    self.close_reason = data[2:].decode("utf-8", "replace")
                    self.closed.set()
                    if not self._close_sent:
                        # Echo the server's close, as libwsc and IXWebSocket do.
                        self._close_sent = True
                        self._send_frame(Opcode.CLOSE, data[:2])
                else:
                    if frame.opcode is not Opcode.CONT:
                        message_type, message = frame.opcode, []
                    message.append(bytes(frame.data))
                    if frame.fin:
                        payload = b"".join(message)
                        if message_type is Opcode.TEXT:
                            self.texts.append(payload.decode("utf-8"))
                        else:
                            self.binaries.append(payload)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.closed.set()
            self.eof.set()

    # -- replay --------------------------------------------------------------------

    async def replay(self, capture: Capture, *, speed: float = 1.0, close: bool = True) -> None:
        """Send a capture's frames again at their recorded times (``speed`` x faster).

        Stops early if the server closes. Without ``close`` the final Close frame is
        not sent (the caller decides how the connection ends).
        """
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        pos = 0
        for step in capture.schedule():
            if self.closed.is_set():
                return
            delay = t0 + step.at / speed - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if step.kind == "text":
                await self.send_text(step.text)
            elif step.kind == "binary":
                await self.send_binary(capture.raw[pos : pos + step.size])
                pos += step.size
            elif close:
                await self.close(step.code, step.text)
