"""The mod_socket_audio site: FreeSWITCH's outbound Event Socket in, raw PCM both ways.

A dialplan runs ``socket <farm>:8084 async full`` (PROTOCOLS.md §3.6). For each call
FreeSWITCH connects here and farm:

1. sends ``connect`` and reads the channel (its ``Unique-ID`` is the call id);
2. subscribes: ``myevents json``, ``linger``, and the CUSTOM ``socket_audio::playback_*``
   events (§3.5), which only an ``async full`` socket may do;
3. opens a TCP listener for this call alone (the audio stream carries no call id,
   §2.1) and runs ``socket_audio <host> <port>`` with ``sendmsg``;
4. waits for FreeSWITCH to connect there. The module reports no failure (§2.1), so a
   timeout is the only signal: then an ``error`` event, and the call is hung up or
   handed back to the dialplan (``socket_audio_fallback``); so is a call whose audio
   stops for ``idle_timeout``;
5. writes the caller's 16 kHz PCM into the call's ring, odd byte counts carried
   (§2.3), and plays clips back at 24 kHz through a :class:`SocketAudioPlayer`;
6. ends the call on hang-up, ``uuid_socket_audio_stop`` (EOF on the audio socket),
   a FreeSWITCH restart or a reset: the ring is closed, the listener gone.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import socket
import time
import uuid
from typing import Any

from farm.auth import AllowList, once_per_peer
from farm.config import Config
from farm.ingress.calls import Call, CallIdTaken, CallRegistry
from farm.ingress.esl_link import EslClosed, EslLink
from farm.ingress.metrics import Metrics
from farm.ingress.playback import Clip, Player
from farm.ingress.site import CallSite
from farm.logs import call_logger, quote
from farm.protocol import esl
from farm.protocol.events import ERROR_ENDS
from farm.protocol.pcm import SampleCarry


__all__ = ["SocketAudioSite", "SocketAudioPlayer", "MIC_RATE"]

log = logging.getLogger("farm.ingress.socket_audio")

MIC_RATE = 16000  # what the module sends, whatever the call's codec (§2.2)
READ_BYTES = 65536
REPLY_TIMEOUT_S = 5.0
# A hang-up also ends the audio stream, and FreeSWITCH's CHANNEL_HANGUP may come a moment
# after the audio's end: wait this long for it before calling the end a stop.
HANGUP_GRACE_S = 0.5
# Playback bytes FreeSWITCH has not read yet beyond which we stop writing: it reads
# only when its own queue is nearly empty (§2.4), so this is kernel buffers, not lead.
MAX_UNSENT_BYTES = 256 * 1024
# Channel headers copied into call_start's metadata.
_CHANNEL_FIELDS = (
    "Caller-Caller-ID-Number",
    "Caller-Caller-ID-Name",
    "Caller-Destination-Number",
    "Call-Direction",
    "Channel-Name",
    "Channel-Read-Codec-Name",
    "Channel-Read-Codec-Rate",
)


class SocketAudioPlayer(Player):
    """Plays into the call's audio socket; FreeSWITCH is flushed on its Event Socket."""

    def __init__(self, session: _Session, call: Call, registry: CallRegistry, config: Config) -> None:
        super().__init__(
            call.call_id,
            call.ring,
            registry.publish,
            lead_ms=config.playback_lead_ms,
            max_queued_ms=int(config.playback_max_queued_s * 1000),
        )
        self.session = session

    def _write(self, clip: Clip, data: bytes) -> bool:
        writer = self.session.audio_writer
        if writer is None or writer.transport.is_closing():
            return False
        if writer.transport.get_write_buffer_size() > MAX_UNSENT_BYTES:
            return False  # FreeSWITCH is not reading; never block the loop on it
        writer.transport.write(data)
        return True

    def _flush_remote(self) -> int:
        return self.session.api("uuid_socket_audio_flush", self.session.uuid)


class _Session:
    """One FreeSWITCH channel under our control: its Event Socket and its audio socket."""

    def __init__(self, site: SocketAudioSite, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.site = site
        self.config = site.config
        peer = writer.get_extra_info("peername") or ("?", 0)
        self.peer = f"{peer[0]}:{peer[1]}"
        self.local_host = (writer.get_extra_info("sockname") or ("127.0.0.1", 0))[0]
        self.link = EslLink(
            reader, writer, self._on_message, f"socket from {self.peer}", self.config.esl_max_body_bytes
        )
        self.uuid = ""
        self.channel: esl.Headers = esl.Headers()
        self.call: Call | None = None
        self.player: SocketAudioPlayer | None = None
        self.audio_writer: asyncio.StreamWriter | None = None
        self.accepted: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] | None = None
        self.hangup = asyncio.Event()
        self.hangup_cause = ""
        self.end: tuple[str, str] | None = None  # why the call ended: (END_REASONS member, detail)
        self.stalled = False  # the audio stopped coming: the call is given up (socket_audio_fallback)

    def _log(self, level: int, message: str, *args: object) -> None:
        """Log about this session: its call (the call id field) or, before it has one, its peer."""
        if self.uuid:
            call_logger(log, self.uuid).log(level, message, *args)
        else:
            log.log(level, "Event Socket from %s: " + message, self.peer, *args)

    # -- the call's life ---------------------------------------------------------

    async def run(self) -> None:
        self.link.start()
        try:
            if not await self._take_control():
                return
            why = self.site.registry.admission()
            if why:
                self._fail(f"farm cannot take the call: {why}", refused=False, end="refused")  # counted by admission()
                await self._fall_back()
                return
            audio = await self._start_audio()
            if audio is None:
                return
            await self._serve(*audio)
        except CallIdTaken as exc:  # a channel uuid no FreeSWITCH makes: the canary's
            self._fail(str(exc), end="refused")
        except EslClosed as exc:
            self._fail(f"Event Socket closed before the call started: {exc}", end="hangup")
        except TimeoutError:
            self._fail("FreeSWITCH did not answer a command in time")
        finally:
            await self._end()

    async def _take_control(self) -> bool:
        try:
            reply = await self.link.request(esl.command("connect"), self.config.first_message_timeout)
        except TimeoutError:
            self._log(logging.WARNING, "no answer to connect in %.0f s; closing", self.config.first_message_timeout)
            self.site.metrics.reject("no answer to connect")
            return False
        if not isinstance(reply, esl.ChannelData) or not reply.unique_id:
            self._log(logging.WARNING, "the answer to connect is not a channel (%s); closing", type(reply).__name__)
            self.site.metrics.reject("not an outbound Event Socket")
            return False
        self.uuid = reply.unique_id
        self.channel = reply.headers
        replies = await asyncio.wait_for(
            asyncio.gather(
                self.link.send(esl.command("myevents", "json"))[0],
                self.link.send(esl.command("linger", str(self.config.esl_linger_s)))[0],
                self.link.send(
                    esl.command(
                        "event", "json", "CUSTOM", "socket_audio::playback_start", "socket_audio::playback_stop"
                    )
                )[0],
            ),
            REPLY_TIMEOUT_S,
        )
        refused = [r for r in replies if not (isinstance(r, esl.Reply) and r.ok)]
        if refused:
            text = refused[0].reply_text if isinstance(refused[0], esl.Reply) else type(refused[0]).__name__
            self._fail(
                f"FreeSWITCH refused a subscription ({text.strip()!r}): the dialplan must run "
                f"'socket <host>:<port> async full'"
            )
            return False
        return True

    async def _start_audio(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        host = self.config.socket_audio_host or self.local_host
        loop = asyncio.get_running_loop()
        self.accepted = loop.create_future()
        server, port = await self.site.listen(host, self._accept)
        try:
            app_uuid = str(uuid.uuid4())
            reply = await self.link.request(
                esl.sendmsg(app="socket_audio", arg=f"{host} {port}", event_uuid=app_uuid), REPLY_TIMEOUT_S
            )
            if not (isinstance(reply, esl.Reply) and reply.ok):
                text = reply.reply_text if isinstance(reply, esl.Reply) else type(reply).__name__
                self._fail(f"FreeSWITCH refused to run socket_audio: {text.strip()!r}")
                return None
            try:
                return await asyncio.wait_for(asyncio.shield(self.accepted), self.config.socket_audio_timeout)
            except TimeoutError:
                self._fail(
                    f"FreeSWITCH did not connect to the audio port {host}:{port} in "
                    f"{self.config.socket_audio_timeout:.0f} s (is mod_socket_audio loaded?)"
                )
                await self._fall_back()
                return None
        finally:
            server.close()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.accepted is None or self.accepted.done():
            writer.close()  # one audio connection per call; a second one is not ours
            return
        self.accepted.set_result((reader, writer))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.audio_writer = writer
        info: dict[str, Any] = {
            "protocol": "socket_audio",
            "peer": self.peer,
            "metadata": {k: self.channel[k] for k in _CHANNEL_FIELDS if k in self.channel}
            | {k[len("variable_") :]: v for k, v in self.channel.items() if k.startswith("variable_farm_")},
        }
        self.call = await self.site.registry.open(
            self.uuid, rate=MIC_RATE, channels=1, protocol="socket_audio", info=info, on_event=None
        )
        self.player = SocketAudioPlayer(self, self.call, self.site.registry, self.config)
        self.call.player = self.player
        self.player.start()
        self.site.live.add(self)
        self._log(
            logging.INFO,
            "mod_socket_audio from %s, channel %s (%s)",
            self.peer,
            quote(self.channel.get("Channel-Name", "?")),
            quote(self.channel.get("Channel-Read-Codec-Name", "?")),
        )
        receiving = asyncio.create_task(self._receive(reader))
        hangup = asyncio.create_task(self.hangup.wait())
        closed = asyncio.create_task(self.link.closed.wait())
        try:
            await asyncio.wait({receiving, hangup, closed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (receiving, hangup, closed):
                task.cancel()
        stopped = self.end is not None and self.end[0] == "stop"
        if stopped and not self.hangup.is_set() and not self.link.closed.is_set():
            # The audio ended: uuid_socket_audio_stop, unless a hang-up is on its way.
            await self._hangup_or_close(HANGUP_GRACE_S)
        if self.end is None or self.end[0] == "stop":
            if self.hangup.is_set():
                self.end = ("hangup", self.hangup_cause)
            elif self.link.closed.is_set():
                if self.link.close_reason.startswith(("bad", "connection closed inside")):
                    self._fail(f"Event Socket: {self.link.close_reason}", refused=False)
                else:
                    self.end = ("hangup", f"Event Socket closed ({self.link.close_reason})")

    async def _hangup_or_close(self, timeout: float | None = None) -> None:
        """Until FreeSWITCH hangs up or the Event Socket closes (or ``timeout`` s pass)."""
        hangup = asyncio.create_task(self.hangup.wait())
        closed = asyncio.create_task(self.link.closed.wait())
        try:
            await asyncio.wait({hangup, closed}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (hangup, closed):
                task.cancel()

    async def _receive(self, reader: asyncio.StreamReader) -> None:
        assert self.call is not None
        carry = SampleCarry(2)
        try:
            while True:
                chunk = await asyncio.wait_for(reader.read(READ_BYTES), self.config.idle_timeout)
                if not chunk:
                    self.end = ("stop", "audio stream ended")  # or a hang-up: see _serve
                    return
                self.site.received(self.call, carry.feed(chunk), len(chunk), time.monotonic_ns())
        except TimeoutError:
            # The module writes a frame every 20 ms while the channel lives (§2.3): a silent
            # audio socket is a stalled call, and it holds a slot of --max-connections.
            self._fail(f"no audio in {self.config.idle_timeout:g} s", refused=False, end="idle")
            self.stalled = True
        except ConnectionError as exc:
            # A hang-up while FreeSWITCH still held our playback surfaces as a reset (§2.6).
            self.end = ("hangup", f"audio stream reset ({exc.__class__.__name__})")

    async def end_for_drain(self) -> None:
        """Hand the call back to its dialplan instead of hanging it up."""
        self.end = ("drain", "farm is shutting down")
        try:
            self.link.send(esl.command("resume"))
            self.link.send(esl.command("exit"))
        except EslClosed:
            pass
        self.hangup.set()

    async def _end(self) -> None:
        self.site.live.discard(self)
        if self.player is not None:
            self.player.close("hangup" if self.hangup.is_set() else "call_end")
        if self.audio_writer is not None:
            self.audio_writer.close()
        # Anything else that ended the session is a bug of ours: an error for the call.
        reason, detail = self.end or ("error", "internal error")
        if self.call is not None:
            self._log(logging.INFO, "ended (%s): %s", reason, quote(detail))
            self.site.registry.close(self.call, reason, detail)
        elif self.uuid:
            self.site.registry.end_unopened(self.uuid, reason, detail)
        if self.stalled and not self.link.closed.is_set():
            await self._fall_back()
        if self.link.closed.is_set():
            return
        if self.call is not None and not self.hangup.is_set() and not self.site.draining and not self.stalled:
            # socket_audio stopped but the channel lives on: it is still ours until
            # FreeSWITCH hangs up or closes (the dialer may start it again elsewhere).
            await self._hangup_or_close()
            if self.link.close_reason.startswith("bad"):
                self._log(logging.WARNING, "Event Socket closed: %s", self.link.close_reason)
        # At the hang-up, close at once: after its linger notice FreeSWITCH keeps the channel
        # (a slot of its max-sessions) until we do, or until the linger time runs out.
        self.link.close("done")

    # -- Event Socket ------------------------------------------------------------

    def api(self, *args: str) -> int:
        """Send an ``api`` command without waiting; return when it was written (ns), 0 if not."""
        try:
            future, written = self.link.send(esl.command("api", *args))
        except EslClosed:
            return 0
        future.add_done_callback(functools.partial(self._api_done, args[0]))
        return written

    def _api_done(self, what: str, future: asyncio.Future[esl.Message]) -> None:
        if future.cancelled() or future.exception() is not None:
            return
        reply = future.result()
        if isinstance(reply, esl.ApiResponse) and not reply.ok:
            self._log(logging.WARNING, "%s answered %r", what, reply.body.strip()[:200])

    def _on_message(self, message: esl.Message) -> None:
        if isinstance(message, esl.EslEvent):
            if message.subclass == "socket_audio::playback_start" and self.player is not None:
                self.player.on_remote_playback(True)
            elif message.subclass == "socket_audio::playback_stop" and self.player is not None:
                self.player.on_remote_playback(False)
            elif message.name in ("CHANNEL_HANGUP", "CHANNEL_HANGUP_COMPLETE"):
                self.hangup_cause = message.headers.get("Hangup-Cause", "")
                self.hangup.set()
        elif isinstance(message, esl.DisconnectNotice):
            self.hangup.set()  # linger notice at hang-up, or the final notice
            if not message.linger:
                self.link.close("FreeSWITCH said goodbye")

    def _fail(self, reason: str, refused: bool = True, end: str = "error") -> None:
        """Log, publish an ``error`` event on the call id and count a refusal (before the call
        ran); the call ends with ``end`` (one of END_REASONS)."""
        self._log(logging.WARNING, "%s", reason)
        self.end = (end, reason)
        if refused:
            self.site.metrics.reject(reason.split(":")[0].split("(")[0].strip()[:40])
        if self.uuid and (self.call is None or end not in ERROR_ENDS):
            self.site.registry.error(self.uuid, reason)  # else the call's worker says it (ERROR_ENDS)

    async def _fall_back(self) -> None:
        """The audio never came: hang up, or give the call back to the dialplan."""
        try:
            if self.config.socket_audio_fallback == "dialplan":
                await self.link.request(esl.command("resume"), REPLY_TIMEOUT_S)
            else:
                await self.link.request(
                    esl.sendmsg(call_command="hangup", headers={"hangup-cause": "SERVICE_UNAVAILABLE"}),
                    REPLY_TIMEOUT_S,
                )
            await self.link.request(esl.command("exit"), REPLY_TIMEOUT_S)
        except (EslClosed, TimeoutError):
            pass


class SocketAudioSite(CallSite[_Session]):
    """The outbound Event Socket server (default port 8084) and its per-call audio ports."""

    listen_while_draining = False  # FreeSWITCH tries the dialplan's next socket target

    def __init__(self, config: Config, registry: CallRegistry, metrics: Metrics) -> None:
        super().__init__(config, registry, metrics)
        self.sessions: set[asyncio.Task[None]] = set()
        self.allowed = AllowList.from_spec(config.esl_allow)
        self._ports = _port_cycle(config.socket_audio_ports)

    async def start(self) -> asyncio.Server:
        self.server = server = await asyncio.start_server(self._handle, self.config.esl_host, self.config.esl_port)
        return server

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        host = str((writer.get_extra_info("peername") or ("?",))[0])
        if not self.allowed.allows(host):
            self.metrics.reject("not allowed")
            once_per_peer(host, "not in --esl-allow, on the Event Socket port")
            writer.close()
            return
        if len(self.live) >= self.config.max_connections:
            self.metrics.reject("too many calls")
            writer.close()
            return
        task = asyncio.current_task()
        assert task is not None
        self.sessions.add(task)
        try:
            await _Session(self, reader, writer).run()
        finally:
            self.sessions.discard(task)

    async def listen(self, host: str, on_accept: Any) -> tuple[asyncio.Server, int]:
        """A listener for one call's audio: an ephemeral port, or the next free one of the range."""
        if self._ports is None:
            server = await asyncio.start_server(on_accept, host, 0, backlog=1)
            return server, int(server.sockets[0].getsockname()[1])
        for _ in range(self._ports[1]):
            port = next(self._ports[0])
            try:
                server = await asyncio.start_server(on_accept, host, port, backlog=1)
            except OSError:
                continue
            return server, port
        raise OSError(f"no free port in {self.config.socket_audio_ports}")

    async def drain(self, timeout: float) -> None:
        await super().drain(timeout)
        for task in list(self.sessions):
            task.cancel()


def _port_cycle(spec: str) -> tuple[itertools.cycle[int], int] | None:
    """``"40000-40999"`` -> an endless cycle over the range and its size; ``""`` -> None."""
    if not spec:
        return None
    low, _, high = spec.partition("-")  # validated by Config.check() at start
    first, last = int(low), int(high or low)
    return itertools.cycle(range(first, last + 1)), last - first + 1
