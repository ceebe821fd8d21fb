"""``POST /transcribe``: a recorded file over plain HTTP/1.1, answered with its events.

websockets' server parses GET only, so this is a small listener of its own on
``--http-port`` (0: off). The body is a 16-bit WAV file, or raw int16 PCM with
``?rate=8000&channels=1``; ``Content-Length`` is required and capped
(``--transcribe-max-bytes``). The file takes the path of a live call marked as a file
(``source: file``, farm/transcribe.py): a call in the registry, its audio written into the
ring no faster than the worker reads it, its events collected until ``call_end``. The
answer is 200 with the events as JSON lines (finals with words, intents, errors,
``call_end``; ``amd``, ``beep``, ``tone`` with ``?amd=1``), or 400 / 404 / 405 / 411 / 413 /
503 with a one-line reason.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
import uuid
from typing import Any
from urllib.parse import parse_qs, urlsplit

from farm.auth import UNAUTHORIZED, Tokens, once_per_peer
from farm.config import Config
from farm.ingress.calls import CallIdTaken, CallRegistry
from farm.ingress.site import start_optional
from farm.protocol.events import Event
from farm.transcribe import AMD_SHOWN, CHUNK_MS, SHOWN, parse_audio


__all__ = ["TranscribeSite"]

log = logging.getLogger("farm.ingress.http")

HEADER_LIMIT = 16 * 1024
BODY_TIMEOUT_S = 60.0
ROOM_POLL_S = 0.02
_TRUE = ("1", "true", "yes", "on")


class HttpError(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


_STATUS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed"}
_STATUS |= {411: "Length Required"}
_STATUS |= {413: "Content Too Large", 503: "Service Unavailable"}


class TranscribeSite:
    def __init__(self, config: Config, registry: CallRegistry) -> None:
        self.config = config
        self.registry = registry
        self.server: asyncio.Server | None = None
        self.draining = False
        self.tokens = Tokens.from_spec(config.auth_tokens)
        self.tls: ssl.SSLContext | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(
            self._serve, self.config.ws_host, self.config.http_port, limit=HEADER_LIMIT, ssl=self.tls
        )

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    def close(self) -> None:
        if self.server is not None:
            self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                body = await self._handle(reader, writer)
                status = 200
            except HttpError as exc:
                status, body = exc.status, f"farm: {exc}\n".encode()
                log.info("POST /transcribe refused: %d %s", status, exc)
            ctype = "application/x-ndjson" if status == 200 else "text/plain; charset=utf-8"
            head = f"HTTP/1.1 {status} {_STATUS[status]}\r\nContent-Type: {ctype}\r\n"
            head += f"Content-Length: {len(body)}\r\nConnection: close\r\nServer: farm\r\n\r\n"
            writer.write(head.encode() + body)
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
        try:
            raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.config.first_message_timeout)
        except (asyncio.LimitOverrunError, ValueError):
            raise HttpError(400, "request head too large") from None
        except (TimeoutError, asyncio.IncompleteReadError):
            raise HttpError(400, "incomplete request") from None
        lines = raw.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3:
            raise HttpError(400, "bad request line")
        method, target = parts[0], parts[1]
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        url = urlsplit(target)
        if not self.tokens.allows(target, headers.get("authorization")):
            once_per_peer(str(writer.get_extra_info("peername", ("?",))[0]), "no valid token on the HTTP port")
            raise HttpError(401, UNAUTHORIZED.removeprefix("farm: ").strip())
        if url.path != "/transcribe":
            raise HttpError(404, "this port answers POST /transcribe")
        if method != "POST":
            raise HttpError(405, "POST the audio to /transcribe")
        if "content-length" not in headers:
            raise HttpError(411, "Content-Length required")
        try:
            length = int(headers["content-length"])
        except ValueError:
            raise HttpError(400, "bad Content-Length") from None
        if length > self.config.transcribe_max_bytes:
            raise HttpError(413, f"body of {length} bytes, more than {self.config.transcribe_max_bytes}")
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        if self.draining:
            raise HttpError(503, "farm is draining")
        why = self.registry.admission()
        if why:
            raise HttpError(503, f"farm cannot take the call: {why}")
        if headers.get("expect", "").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        try:
            data = await asyncio.wait_for(reader.readexactly(length), BODY_TIMEOUT_S)
        except (TimeoutError, asyncio.IncompleteReadError):
            raise HttpError(400, f"body shorter than its Content-Length {length}") from None
        try:
            rate = int(query["rate"]) if "rate" in query else None
            pcm, rate, channels = parse_audio(data, rate, int(query.get("channels", "1")))
        except ValueError as exc:
            raise HttpError(400, str(exc)) from None
        return await self._transcribe(pcm, rate, channels, query)

    async def _transcribe(self, pcm: bytes, rate: int, channels: int, query: dict[str, str]) -> bytes:
        call_id = query.get("call_id") or f"file-{uuid.uuid4()}"
        meta: dict[str, Any] = {"call_id": call_id, "rate": rate, "channels": channels, "source": "file"}
        meta |= {k: query[k] for k in ("amd", "intents", "tones") if k in query}
        shown = SHOWN | AMD_SHOWN if query.get("amd", "").lower() in _TRUE else SHOWN
        events: asyncio.Queue[Event] = asyncio.Queue()
        try:
            call = await self.registry.open(
                call_id,
                rate=rate,
                channels=channels,
                protocol="http",
                info={"protocol": "http", "metadata": meta},
                on_event=events.put_nowait,
                background=True,
            )
        except CallIdTaken as exc:
            raise HttpError(400, str(exc)) from None
        ring = call.ring
        try:
            size = rate * CHUNK_MS // 1000 * 2 * channels
            for start in range(0, len(pcm), size):
                # As for a file on the WebSocket: no more while the ring is half full unread.
                while ring.write_cursor - ring.read_cursor > ring.capacity // 2:
                    await asyncio.sleep(ROOM_POLL_S)
                call.write(pcm[start : start + size], time.monotonic_ns())
        finally:
            self.registry.close(call, "hangup", "end of the file")
        out = bytearray()
        while True:
            event = await events.get()
            if event.call_id != call.call_id:
                continue
            if event.type in shown:
                out += event.to_json() + b"\n"
            if event.type == "call_end":
                return bytes(out)


async def start_site(
    config: Config, registry: CallRegistry, tls: ssl.SSLContext | None = None
) -> TranscribeSite | None:
    """Start the site if ``http_port`` is set; a port in use is logged, not fatal (:func:`start_optional`)."""
    if not config.http_port:
        return None
    site = TranscribeSite(config, registry)
    site.tls = tls
    if not await start_optional(site.start, "POST /transcribe", f"{config.ws_host}:{config.http_port}"):
        return None
    log.info("POST /transcribe on %s://%s:%d/transcribe", "https" if tls else "http", config.ws_host, site.port)
    return site
