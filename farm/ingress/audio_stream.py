"""The mod_audio_stream site: a WebSocket server, one connection per call (PROTOCOLS.md §1).

Thin adapter: the ``websockets`` library speaks RFC 6455 (any path, headers with or
without a space after the colon, permessage-deflate on or off, pings), and
:mod:`farm.protocol.audio_stream` says what the messages mean. The same port
answers plain HTTP for health checks and Prometheus metrics
(:mod:`farm.ingress.exposition` renders them).
"""

from __future__ import annotations

import asyncio
import base64
import http
import json
import logging
import re
import ssl
import time
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from farm.auth import UNAUTHORIZED, Tokens, once_per_peer, without_token
from farm.config import Config
from farm.ingress.calls import Call, CallIdTaken, CallRegistry
from farm.ingress.esl_inbound import InboundEsl
from farm.ingress.exposition import CONTENT_TYPE, Exposition
from farm.ingress.metrics import DROP_WS_BACKLOG, Metrics
from farm.ingress.playback import OUT_RATE, Clip, Player
from farm.ingress.site import CallSite
from farm.logs import call_logger, quote
from farm.protocol.audio_stream import (
    AudioStreamSession,
    Close,
    Note,
    OpenCall,
    PublishError,
    WriteAudio,
    is_background,
)
from farm.protocol.events import ERROR_ENDS, Event
from farm.protocol.exceptions import CLOSE_GOING_AWAY, CLOSE_POLICY


__all__ = ["AudioStreamSite"]

log = logging.getLogger("farm.ingress.ws")


ROOM_POLL_S = 0.02  # how often a paused file call looks for room in its ring
_LABEL_DETAILS = re.compile(r"\(.*|'.*'|\".*\"")  # client text, lists of what is allowed
_LABEL_NUMBERS = re.compile(r"\d+")


class StreamAudioPlayer(Player):
    """Plays a clip as one ``streamAudio`` message: FreeSWITCH writes it to a file and
    fires ``mod_audio_stream::play``; the dialer (or ``uuid_broadcast``) plays it
    (PROTOCOLS.md §1.8). A barge-in stops it with ``uuid_break`` when farm has an
    inbound Event Socket (``--esl``); the ``barge_in`` event goes out either way."""

    def __init__(self, conn: _Connection, call: Call, fs_uuid: str) -> None:
        super().__init__(
            call.call_id,
            call.ring,
            conn.site.registry.publish,
            lead_ms=0,
            chunk_bytes=None,
            max_queued_ms=int(conn.config.playback_max_queued_s * 1000),
        )
        self.conn = conn
        self.fs_uuid = fs_uuid

    def _write(self, clip: Clip, data: bytes) -> bool:
        message = {
            "type": "streamAudio",
            "data": {
                "audioDataType": "raw",
                "sampleRate": OUT_RATE,
                "farm_play_id": clip.play_id,
                "audioData": base64.b64encode(data).decode("ascii"),
            },
        }
        try:
            self.conn.outbox.put_nowait(json.dumps(message, separators=(",", ":")))
        except asyncio.QueueFull:
            return False
        return True

    def _flush_remote(self) -> int:
        esl = self.conn.site.inbound_esl
        return esl.api("uuid_break", self.fs_uuid, "all") if esl is not None else 0


class _Connection:
    """One mod_audio_stream connection: feeds its session, performs the session's actions."""

    def __init__(self, site: AudioStreamSite, ws: ServerConnection) -> None:
        self.site = site
        self.ws = ws
        self.config = site.config
        self.session = AudioStreamSession(
            default_rate=self.config.default_rate,
            default_channels=self.config.default_channels,
            metadata_wait_ms=self.config.metadata_wait_ms,
            first_message_timeout=self.config.first_message_timeout,
            idle_timeout=self.config.idle_timeout,
        )
        self.call: Call | None = None
        self.outbox: asyncio.Queue[str] = asyncio.Queue(maxsize=10_000)
        self.peer = "%s:%s" % (ws.remote_address[:2] if ws.remote_address else ("?", "?"))
        self.log: logging.LoggerAdapter[logging.Logger] = logging.LoggerAdapter(log, {})
        self.end: tuple[str, str] | None = None  # why the call ended: (END_REASONS member, detail); first wins
        self.taken = False  # its call id is another token's: nothing is said under that id

    async def run(self) -> None:
        sender = asyncio.create_task(self._send_events())
        try:
            await self._receive()
        except ConnectionClosed as exc:
            rcvd, sent = exc.rcvd, exc.sent
            if self.end is not None:
                pass  # we closed it (drain) and said why
            elif sent is not None and sent.code not in (1000, 1001) and not exc.rcvd_then_sent:
                # We failed the connection (1009 message too big, 1002, 1007): say why.
                self._log(logging.WARNING, "closed with %d %s", sent.code, sent.reason)
                self.end = ("error", f"closed with {sent.code} {sent.reason}")
            else:
                if rcvd is None or rcvd.code not in (1000, 1001):
                    how = f"close {rcvd.code} {rcvd.reason!r}" if rcvd else "no close frame"
                    self._log(logging.WARNING, "connection lost (%s)", how)
                self.end = ("hangup", f"close {rcvd.code} {rcvd.reason}".strip() if rcvd else "no close frame")
        finally:
            sender.cancel()
            self._ended()

    def _ended(self) -> None:
        # Anything else that ended the connection is a bug of ours: it ends the call as an error.
        reason, detail = self.end or ("error", "internal error")
        if self.call is not None:
            self.site.registry.close(self.call, reason, detail)
            self.site.live.discard(self)
            return
        call_id = self.session.call_id  # a call that never opened ends too, if it was named
        if call_id is not None and not self.taken:
            self.site.registry.end_unopened(call_id, reason, detail)

    def _log(self, level: int, message: str, *args: object) -> None:
        """Log about this connection: its call (the call id field) or, before it has one, its peer."""
        if self.call is None:
            log.log(level, "connection from %s: " + message, self.peer, *args)
        else:
            self.log.log(level, message, *args)

    async def refuse(self, close: Close) -> None:
        self._log(logging.WARNING, "closing: %s", close.reason)
        if self.end is None:
            self.end = (close.end, close.reason)
        # An open call ending with an error: its worker publishes the error (ERROR_ENDS).
        said_by_worker = self.end == (close.end, close.reason) and close.end in ERROR_ENDS
        # The metrics label: what kind of refusal, without the client's own text (it may
        # hold quotes or newlines, which break the exposition format) or numbers (one
        # label per rate tried).
        label = _LABEL_NUMBERS.sub("N", _LABEL_DETAILS.sub(" ", close.reason))
        self.site.metrics.reject(" ".join(label.split())[:40])
        if self.call is not None and not said_by_worker:
            self.site.registry.error(self.call.call_id, close.reason)
        await self.ws.close(close.code, close.wire_reason)

    async def _receive(self) -> None:
        """Feed the session until it closes the connection or the peer does."""
        path = self.ws.request.path if self.ws.request else "/"
        actions = self.session.receive_open(path, time.monotonic_ns())
        while True:
            for action in actions:
                if isinstance(action, WriteAudio):
                    self._write(action)  # the hot path: no await
                elif not await self._perform(action):
                    return
            if self.call is not None and self.call.background:
                await self._wait_for_room()
            deadline = self.session.next_deadline()
            timeout = None if deadline is None else max((deadline - time.monotonic_ns()) / 1e9, 0.001)
            try:
                message = await asyncio.wait_for(self.ws.recv(), timeout)
            except TimeoutError:
                actions = self.session.timeout(time.monotonic_ns())
                continue
            now = time.monotonic_ns()
            if isinstance(message, str):
                actions = self.session.receive_text(message, now)
            else:
                actions = self.session.receive_binary(message, now)

    async def _wait_for_room(self) -> None:
        """A recorded file (``source: file``) comes faster than real time: take no more of it
        while its ring holds half its capacity unread. The sender then waits on TCP, and
        the worker, which reads a file no further ahead of its recognition than a few
        seconds (workers/call.py), sets the pace: nothing is overwritten, nothing lost."""
        assert self.call is not None
        ring = self.call.ring
        while self.end is None and ring.write_cursor - ring.read_cursor > ring.capacity // 2:
            await asyncio.sleep(ROOM_POLL_S)

    async def _perform(self, action: OpenCall | PublishError | Note | Close) -> bool:
        """Do what the session asks (audio aside); False once the connection is closing."""
        if isinstance(action, OpenCall):
            if self.site.draining:
                await self.refuse(Close(CLOSE_GOING_AWAY, "farm is shutting down", "refused"))
                return False
            return await self._open(action)
        elif isinstance(action, PublishError):
            self._log(logging.WARNING, "%s", action.reason)
            assert self.call is not None
            self.site.registry.error(self.call.call_id, action.reason)
        elif isinstance(action, Note):
            self._log(logging.INFO, "%s", action.message)
        else:
            await self.refuse(action)
            return False
        return True

    async def _open(self, p: OpenCall) -> bool:
        request = self.ws.request
        info: dict[str, Any] = {
            "protocol": "audio_stream",
            "metadata": p.metadata,
            "path": without_token(request.path) if request else "",
            "peer": self.peer,
        }
        if p.transcribe:
            info["transcribe"] = p.transcribe
        credential = self.site.tokens.credential(request.path, request.headers.get("Authorization")) if request else ""
        try:
            self.call = await self.site.registry.open(
                p.call_id,
                rate=p.rate,
                channels=p.channels,
                protocol="audio_stream",
                info=info,
                on_event=self._queue_event if self.config.ws_events else None,
                background=is_background(p.metadata),
                credential=credential or "",
            )
        except CallIdTaken as exc:
            self.taken = True
            await self.refuse(Close(CLOSE_POLICY, str(exc), "refused"))
            return False
        self.log = call_logger(log, self.call.call_id)
        self.call.player = StreamAudioPlayer(self, self.call, str(p.metadata.get("uuid") or p.call_id))
        self.call.player.start()
        self.site.live.add(self)
        self.log.info(
            "mod_audio_stream from %s, %d Hz, %d ch%s",
            self.peer,
            p.rate,
            p.channels,
            "" if p.metadata_seen else ", no metadata",
        )
        return True

    def _write(self, audio: WriteAudio) -> None:
        assert self.call is not None
        self.site.received(self.call, audio.pcm, audio.size, audio.received)

    async def end_for_drain(self) -> None:
        self.end = ("drain", "farm is shutting down")
        await self.ws.close(CLOSE_GOING_AWAY, "farm is shutting down")

    # -- events back to FreeSWITCH (mod_audio_stream::json) -------------------------

    def _queue_event(self, event: Event) -> None:
        try:
            self.outbox.put_nowait(json.dumps(event.to_dict(), ensure_ascii=False, separators=(",", ":")))
        except asyncio.QueueFull:  # FreeSWITCH stopped reading; the ZeroMQ stream still has every event
            self.site.metrics.drop(DROP_WS_BACKLOG)

    async def _send_events(self) -> None:
        while True:
            text = await self.outbox.get()
            try:
                await self.ws.send(text)
            except ConnectionClosed:
                return


class AudioStreamSite(CallSite["_Connection"]):
    def __init__(
        self,
        config: Config,
        registry: CallRegistry,
        metrics: Metrics,
        inbound_esl: InboundEsl | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(config, registry, metrics)
        self.inbound_esl = inbound_esl
        self.tls = tls
        self.exposition = Exposition(registry, metrics)
        self.tokens = Tokens.from_spec(config.auth_tokens)

    async def start(self) -> Server:
        self.server = server = await serve(
            self._handler,
            self.config.ws_host,
            self.config.ws_port,
            process_request=self._process_request,
            max_size=self.config.max_message_bytes,
            max_queue=64,
            compression="deflate",
            ping_interval=None,  # FreeSWITCH does not expect our pings; we answer its own
            open_timeout=self.config.first_message_timeout,
            close_timeout=2,
            server_header="farm",
            ssl=self.tls,
        )
        return server

    async def _handler(self, ws: ServerConnection) -> None:
        await _Connection(self, ws).run()

    def _process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        upgrade = request.headers.get("Upgrade", "").lower() == "websocket"
        if not upgrade:
            if path in ("/healthz", "/livez"):
                return _text(conn, http.HTTPStatus.OK, "ok\n")
            if path == "/readyz":
                if self.draining:
                    return _text(conn, http.HTTPStatus.SERVICE_UNAVAILABLE, "draining\n")
                why = self.registry.recognition_ready
                if not why and self.registry.link.overloaded:
                    why = f"at capacity: recognition {self.registry.link.status.lag_ms} ms behind"
                full = self.registry.full
                if not why and full:
                    why = f"at capacity: {full}"
                if why:
                    return _text(conn, http.HTTPStatus.SERVICE_UNAVAILABLE, f"{why}\n")
                return _text(conn, http.HTTPStatus.OK, f"ready: {self.registry.link.status.workers} workers\n")
            if path == "/metrics":
                return _text(conn, http.HTTPStatus.OK, self.exposition.render(), CONTENT_TYPE)
            self.metrics.reject("not a websocket request")
            log.info("refused a plain HTTP request for %s: not a WebSocket upgrade", quote(path[:80]))
            return _text(
                conn,
                http.HTTPStatus.UPGRADE_REQUIRED,
                "farm: this port takes mod_audio_stream WebSocket connections "
                "(ws://host:port/<call-id>); /healthz, /readyz and /metrics answer plain HTTP\n",
            )
        if not self.tokens.allows(request.path, request.headers.get("Authorization")):
            self.metrics.reject("unauthorized")
            once_per_peer(str(conn.remote_address[0]), "no valid token on the mod_audio_stream port")
            response = _text(conn, http.HTTPStatus.UNAUTHORIZED, UNAUTHORIZED)
            response.headers["WWW-Authenticate"] = "Bearer"
            return response
        why = self.refusal()
        if why:
            return _text(conn, http.HTTPStatus.SERVICE_UNAVAILABLE, f"{why}\n")
        return None


def _text(
    conn: ServerConnection, status: http.HTTPStatus, body: str, ctype: str = "text/plain; charset=utf-8"
) -> Response:
    response = conn.respond(status, body)
    del response.headers["Content-Type"]  # respond() set text/plain; one header only
    response.headers["Content-Type"] = ctype
    return response
