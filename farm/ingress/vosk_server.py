"""The vosk-server site: alphacep/vosk-server's WebSocket protocol on its own port.

Existing Vosk clients (vosk-asterisk, EAGI scripts, vosk-server's test clients) and
benchmarks written for vosk-server use farm unchanged. Each connection is one farm
call (``protocol: "vosk"``, mono, the rate of its config message or 8000): audio goes
into the call's ring like any other call's, farm's workers recognize it, and
:mod:`farm.protocol.vosk_server` turns the call's partial and final events into
vosk-server's replies, one per audio message.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
import uuid

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from farm.auth import UNAUTHORIZED, Tokens, once_per_peer, without_token
from farm.config import Config
from farm.ingress.calls import Call, CallRegistry
from farm.ingress.metrics import Metrics
from farm.ingress.site import CallSite, start_optional
from farm.logs import call_logger, quote
from farm.protocol.events import ERROR_ENDS, Event
from farm.protocol.exceptions import CLOSE_GOING_AWAY, CLOSE_POLICY
from farm.protocol.pcm import SampleCarry
from farm.protocol.vosk_server import CLOSE_INVALID, CONFIG, RESET, VoskServerError, VoskSession


__all__ = ["VoskServerSite"]

log = logging.getLogger("farm.ingress.vosk")

# After eof, how long the client waits for the worker to finish the call's audio
# (a fast client may be many seconds of audio ahead of recognition).
EOF_WAIT_S = 60.0
# After reset, likewise for the final of the utterance the reset ended.
RESET_WAIT_S = 60.0


class _Connection:
    """One vosk-server client: config, audio into the call's ring, one reply per message."""

    def __init__(self, site: VoskServerSite, ws: ServerConnection) -> None:
        self.site = site
        self.ws = ws
        self.config = site.config
        self.session = VoskSession()
        self.call_id = f"vosk-{uuid.uuid4()}"
        self.call: Call | None = None
        self.carry = SampleCarry(2)
        self.ended = asyncio.Event()  # the worker's call_end for this call
        self.reset_final = asyncio.Event()  # the final of the utterance a reset ended
        self.peer = "%s:%s" % (ws.remote_address[:2] if ws.remote_address else ("?", "?"))
        self.log = call_logger(log, self.call_id)
        self.end: tuple[str, str] | None = None  # why the call ended: (END_REASONS member, detail)

    async def run(self) -> None:
        try:
            await self._receive()
        except VoskServerError as exc:
            await self._refuse(exc)
        except ConnectionClosed as exc:
            rcvd = exc.rcvd
            if rcvd is None or rcvd.code not in (1000, 1001):
                reason = f"close {rcvd.code} {rcvd.reason!r}" if rcvd else "no close frame"
                self.log.info("client went away (%s)", reason)
            if self.end is None:
                self.end = ("hangup", f"close {rcvd.code} {rcvd.reason}".strip() if rcvd else "no close frame")
        finally:
            # Anything else that ended the connection is a bug of ours: an error for the call.
            reason, detail = self.end or ("error", "internal error")
            if self.call is not None:
                self.site.registry.close(self.call, reason, detail)
            else:
                self.site.registry.end_unopened(self.call_id, reason, detail)
            self.site.live.discard(self)

    async def _refuse(self, exc: VoskServerError) -> None:
        self.log.warning("closing: %s", exc)
        if exc.code == CLOSE_POLICY:  # no message in time
            self.end = ("idle", str(exc))
        else:
            self.end = ("refused" if self.call is None and exc.code == CLOSE_GOING_AWAY else "error", str(exc))
        self.site.metrics.reject("vosk: " + ("bad json" if exc.code == CLOSE_INVALID else "bad message"))
        if self.call is None or self.end[0] not in ERROR_ENDS:
            self.site.registry.error(self.call_id, str(exc))  # else the call's worker says it (ERROR_ENDS)
        await self.ws.close(exc.code, str(exc)[:120])

    async def _receive(self) -> None:
        loop = asyncio.get_running_loop()
        idle = self.config.idle_timeout
        deadline = loop.time() + self.config.first_message_timeout
        silent = f"no message in {self.config.first_message_timeout:g} s"
        spoke = False
        while True:
            try:
                message = await asyncio.wait_for(self.ws.recv(), max(deadline - loop.time(), 0.001))
            except TimeoutError:
                raise VoskServerError(silent, CLOSE_POLICY) from None
            recv_ns = time.monotonic_ns()
            if isinstance(message, bytes) or not spoke:
                # Only audio keeps a connection alive once it spoke: a client that sends
                # a config, or text now and then, and no audio holds a slot for nothing.
                spoke = True
                deadline = loop.time() + idle
                silent = f"no audio in {idle:g} s"
            if isinstance(message, bytes):
                if self.call is None:
                    await self._open()
                self._write(message, recv_ns)
                self.session.receive_audio()
                await self.ws.send(self.session.audio_reply())
                continue
            audio_seen = self.session.audio_seen
            command = self.session.receive_text(message)
            if command is CONFIG:
                self._note_config(message, audio_seen)
            elif command is RESET:
                waited = loop.time()
                await self._reset()
                deadline += loop.time() - waited  # waiting for our own worker is not the client's silence
            else:
                await self._eof()
                return

    def _note_config(self, text: str, late: bool) -> None:
        cfg = self.session.config
        if late:
            # vosk-server reads the config when it makes the recognizer, at the first audio.
            self.log.info("config after audio ignored, as vosk-server does")
            return
        self.log.debug("config %r", text[:200])
        if cfg.phrase_list:
            self.log.info("phrase_list of %d phrases not supported; decoding with the full model", len(cfg.phrase_list))
        if cfg.ignored:
            self.log.info("config members not supported, ignored: %s", ", ".join(quote(k) for k in cfg.ignored))
            cfg.ignored.clear()

    async def _open(self) -> None:
        if self.site.draining:
            raise VoskServerError("farm is shutting down", CLOSE_GOING_AWAY)
        rate = self.session.config.sample_rate
        path = without_token(self.ws.request.path) if self.ws.request else ""  # events show no token
        self.call = await self.site.registry.open(
            self.call_id,
            rate=rate,
            channels=1,
            protocol="vosk",
            info={"protocol": "vosk", "metadata": {}, "path": path},
            on_event=self._on_event,
        )
        self.site.live.add(self)
        self.log.info("vosk-server client %s, %d Hz", self.peer, rate)

    def _write(self, chunk: bytes, recv_ns: int) -> None:
        assert self.call is not None
        self.site.received(self.call, self.carry.feed(chunk), len(chunk), recv_ns)

    async def end_for_drain(self) -> None:
        self.end = ("drain", "farm is shutting down")
        await self.ws.close(CLOSE_GOING_AWAY, "farm is shutting down")

    def _on_event(self, event: Event) -> None:
        if event.channel != 0:
            return
        self.session.receive_event(event.type, event.data)
        if event.type == "call_end":
            self.ended.set()
        elif event.type == "final" and event.get("reason") == "reset":
            self.reset_final.set()

    async def _reset(self) -> None:
        """vosk-server's FinalResult(): end the utterance in progress and answer with its
        final (and any other not yet sent), not with what was final before the reset."""
        if self.call is not None:
            self.reset_final.clear()
            self.call.ring.request_finalize()
            try:
                await asyncio.wait_for(self.reset_final.wait(), RESET_WAIT_S)
            except TimeoutError:
                self.log.warning("no final %.0f s after reset, replying", RESET_WAIT_S)
        await self.ws.send(self.session.final_reply())

    async def _eof(self) -> None:
        """No more audio: wait for the worker to finish the call, reply, close normally."""
        self.end = ("stop", "eof")
        if self.call is not None:
            self.site.registry.close(self.call, *self.end)
            try:
                await asyncio.wait_for(self.ended.wait(), EOF_WAIT_S)
            except TimeoutError:
                self.log.warning("no call_end %.0f s after eof, replying", EOF_WAIT_S)
        await self.ws.send(self.session.final_reply())
        await self.ws.close()


class VoskServerSite(CallSite[_Connection]):
    """Listens for vosk-server clients; see the module docstring."""

    def __init__(self, config: Config, registry: CallRegistry, metrics: Metrics) -> None:
        super().__init__(config, registry, metrics)
        self.tokens = Tokens.from_spec(config.auth_tokens)
        self.tls: ssl.SSLContext | None = None

    @property
    def host(self) -> str:
        return self.config.vosk_host or self.config.ws_host

    async def start(self) -> Server:
        self.server = server = await serve(
            self._handler,
            self.host,
            self.config.vosk_port,
            process_request=self._process_request,
            max_size=self.config.max_message_bytes,
            max_queue=64,
            ping_interval=None,  # blocking clients (EAGI scripts) read only after they write
            open_timeout=self.config.first_message_timeout,
            close_timeout=2,
            server_header="farm",
            ssl=self.tls,
        )
        return server

    async def _handler(self, ws: ServerConnection) -> None:
        await _Connection(self, ws).run()

    def _process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        if not self.tokens.allows(request.path, request.headers.get("Authorization")):
            self.metrics.reject("unauthorized")
            once_per_peer(str(conn.remote_address[0]), "no valid token on the vosk port")
            response = conn.respond(401, UNAUTHORIZED)
            response.headers["WWW-Authenticate"] = "Bearer"
            return response
        why = self.refusal()
        return conn.respond(503, f"{why}\n") if why else None


async def start_site(
    config: Config, registry: CallRegistry, metrics: Metrics, tls: ssl.SSLContext | None = None
) -> VoskServerSite | None:
    """Start the site if ``vosk_port`` is set: an extra door with a fixed default (2700,
    vosk-server's), so a port in use is logged, not fatal (:func:`start_optional`)."""
    if not config.vosk_port:
        return None
    site = VoskServerSite(config, registry, metrics)
    site.tls = tls
    if not await start_optional(site.start, "vosk-server protocol", f"{site.host}:{config.vosk_port}"):
        return None
    log.info("vosk-server protocol on %s://%s:%d/", "wss" if tls else "ws", site.host, site.port)
    return site
