"""A peer that stands in for FreeSWITCH in tests: Event Socket + mod_socket_audio, byte for byte.

This is **not FreeSWITCH**. It is a test double that writes the bytes FreeSWITCH 1.10.12
writes and answers the way it answers, following PROTOCOLS.md §2 (mod_socket_audio), §3
(Event Socket) and §7 (what a live FreeSWITCH did), with mes.c, switch_event.c and
mod_socket_audio.c (10d9959) read for the details the document leaves open. It plays
FreeSWITCH, so it *parses* client commands (§3.1: a command line, header lines, an empty
line, an optional ``Content-Length`` body) and *serializes* FreeSWITCH's replies and events.

* :class:`SocketAudioCall` is one channel that ran ``socket <host>:<port> async full``
  against farm's outbound Event Socket server (§3.6, TV-ESL-7). It answers commands,
  runs ``sendmsg`` applications (``socket_audio``, ``answer``, ``hangup`` …), emits the
  channel's events in the subscribed format (§3.4), and once ``socket_audio`` ran it is the
  module's TCP client (§2.2-§2.6): a paced 16 kHz mic stream out, the 24 kHz reply in,
  queued and played at real time with ``playback_start``/``playback_stop`` and flush.
* :class:`InboundEslServer` is FreeSWITCH's inbound Event Socket (port 8021 style, §3.3,
  TV-ESL-1) on an ephemeral port. It and the Event Socket wire format live in
  bench/fs_peer_esl.py and are re-exported here.

Everything observable is recorded with ``time.monotonic_ns()`` so tests can assert on
timing (commands received, mic bytes sent, playback received and played, events fired).
The channel headers come from a real event recorded on FreeSWITCH 1.10.12
(captures/freeswitch-1.10.12/socket_audio_sip_pcmu/events.jsonl) with the uuid replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import struct
import time
import uuid as uuidlib
from collections.abc import Iterable, Mapping
from pathlib import Path

from bench.fs_peer_esl import (
    GOODBYE,
    MYEVENTS,
    Command,
    EslListener,
    FiredEvent,
    InboundEslServer,
    api_response,
    build_event,
    command_reply,
    disconnect_notice,
    event_message,
    linger_notice,
    read_command,
    serialize_json,
    serialize_plain,
)


__all__ = [
    "GOODBYE",
    "Command",
    "FiredEvent",
    "SocketAudioCall",
    "InboundEslServer",
    "serialize_plain",
    "serialize_json",
    "event_message",
    "command_reply",
    "api_response",
    "disconnect_notice",
    "linger_notice",
    "channel_template",
]

log = logging.getLogger("bench.fs_peer")

# mod_socket_audio.c constants (§2.2, §2.4, §2.5).
INPUT_RATE = 16000
OUTPUT_RATE = 24000
RECV_SIZE = 8192
DISCARD_NS = 50_000_000
PTIME_MS = 20
MIC_FRAME = INPUT_RATE // 1000 * PTIME_MS * 2  # 640 B
PLAY_FRAME = OUTPUT_RATE // 1000 * PTIME_MS * 2  # 960 B: the peer plays the 24 kHz bytes it got
QUEUE_MAX = 48000 * 2 * 90
# The recorded playback_start event of captures/freeswitch-1.10.12/socket_audio_sip_pcmu
# (copied in tests/captures/), kept beside the peer so the bench runs without the tests.
_TEMPLATE_PATH = Path(__file__).parent / "fs_channel.json"


def channel_template() -> tuple[str, list[tuple[str, str]]]:
    """(uuid, channel headers) of a real SIP PCMU channel recorded on FreeSWITCH 1.10.12.

    The headers are those ``switch_channel_event_set_data`` adds (``Channel-State`` through
    the last ``variable_*``), taken from the recorded ``playback_start`` event.
    """
    event = json.loads(_TEMPLATE_PATH.read_text())
    names = list(event)
    start = names.index("Channel-State")
    return event["Unique-ID"], [(n, str(event[n])) for n in names[start:]]


# -- mod_socket_audio + the outbound session ---------------------------------------


class SocketAudioCall(EslListener):
    """One FreeSWITCH channel under outbound Event Socket control, with mod_socket_audio.

    Not FreeSWITCH: a peer standing in for it, following PROTOCOLS.md §2, §3.6 and §7.
    Connect with :meth:`connect`; the peer then answers every command in order (§3.2) and
    runs ``sendmsg`` applications from a park loop (async mode: ``+OK`` first).

    Args:
        uuid: the channel's Unique-ID (default: a random uuid4).
        rate: the session codec rate (8000: PCMU; others: L16); mod_socket_audio's rates
            do not change (16 kHz out, 24 kHz in).
        variables: extra channel variables (``variable_<name>`` headers).
        answered: start answered (else ringing until an ``answer`` application).
        never_connect_audio: ``socket_audio`` answers as usual but never connects.
        idle_silence: send 640 B of zeros every 20 ms when no speech is queued, as a
            real channel sends its (silent) caller audio.
        linger_scale: multiply the ``linger`` time (tests wait less than 5 s).
        read_ahead: bytes of farm's playback held before TCP backpressure (see playback_recv).
        hangup_on_esl_close: the channel hangs up when the client closes or sends ``exit``
            (without ``resume``): the dialplan ends after the ``socket`` application.
        first_command_timeout: how long to wait for ``connect`` (FreeSWITCH: 25 s).
        peers: other calls that ``api`` commands on this connection can reach by uuid.

    Records (all times ``time.monotonic_ns()``):
        commands: every :class:`Command` received, in order.
        events: every :class:`FiredEvent`, delivered or not (``delivered`` says which).
        mic_sent: ``(t_ns, nbytes, is_speech)`` per mic write; ``speech_sent`` the speech ones.
        mic_due: per mic write (same index as ``mic_sent``), the time its 20 ms slot began on the
            stream's fixed grid (``start + k * 20 ms``): when it was due, however late it went out.
        mic_dropped: bytes FreeSWITCH would have lost (kernel buffer full, §7).
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
        errors: what the real module would only log (failed connect, bad arguments …).
    """

    def __init__(
        self,
        uuid: str | None = None,
        *,
        rate: int = 8000,
        variables: Mapping[str, str] | None = None,
        answered: bool = False,
        never_connect_audio: bool = False,
        idle_silence: bool = True,
        linger_scale: float = 1.0,
        audio_connect_timeout: float = 5.0,
        rcvbuf: int | None = None,
        read_ahead: int = 256 * 1024,
        hangup_on_esl_close: bool = True,
        first_command_timeout: float = 25.0,
        peers: Mapping[str, SocketAudioCall] | None = None,
    ) -> None:
        super().__init__()
        self.uuid = uuid or str(uuidlib.uuid4())
        self.session_uuid = self.uuid
        self.rate = rate
        self.answered = answered
        self.never_connect_audio = never_connect_audio
        self.idle_silence = idle_silence
        self.linger_scale = linger_scale
        self.audio_connect_timeout = audio_connect_timeout
        self.rcvbuf = rcvbuf
        self.read_ahead = read_ahead
        self.hangup_on_esl_close = hangup_on_esl_close
        self.first_command_timeout = first_command_timeout
        self.peers = peers if peers is not None else {}
        self.switch: InboundEslServer | None = None
        self.socket_arg = ""
        self.connected = False
        self.hung_up = False
        self.hangup_cause: str | None = None
        self._channel_state = "CS_EXECUTE"
        self._call_state = "ACTIVE" if answered else "RINGING"
        self._answered_us = time.time_ns() // 1000 if answered else 0
        self._hangup_us = 0
        template_uuid, template = channel_template()
        self._fixed = [(n, v.replace(template_uuid, self.uuid)) for n, v in template if not n.startswith("variable_")]
        self.variables: dict[str, str] = {
            n[len("variable_") :]: v.replace(template_uuid, self.uuid) for n, v in template if n.startswith("variable_")
        }
        for name in ("current_application", "current_application_data"):
            self.variables.pop(name, None)
        codec, bits = ("PCMU", "64000") if rate == 8000 else ("L16", str(rate * 16))
        for name, value in (("read_codec", codec), ("original_read_codec", codec), ("write_codec", codec)):
            self.variables[name] = value
        for name in ("read_rate", "original_read_rate", "write_rate", "rtp_use_codec_rate"):
            self.variables[name] = str(rate)
        self._codec = (codec, str(rate), bits)
        for name, value in (variables or {}).items():
            self.set_variable(name, value)
        # Event Socket / park loop
        self._apps: asyncio.Queue[Command] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._audio_tasks: list[asyncio.Task[None]] = []
        self._hangup_task: asyncio.Task[None] | None = None
        # mod_socket_audio state (socket_audio_ctx_t)
        self.socket_audio_active = False  # the channel private exists (flush/stop answer +OK)
        self.audio_sock: socket.socket | None = None
        self.audio_connected = asyncio.Event()
        self.audio_closed = asyncio.Event()
        self.audio_connected_ns: int | None = None
        self.audio_eof_ns: int | None = None
        self.running = False
        self.flush_flag = False
        self.discard_until_ns = 0
        self.playing = False
        self.queue = bytearray()
        self._recv_total = 0
        self._mic_pending = bytearray()
        self._mic_speech_queued = 0
        self._mic_speech_sent = 0
        self._mic_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._odd_splits = False
        self._mic_index = 0
        self._mic_total = 0
        self._short_next = False
        self.mic_sent: list[tuple[int, int, bool]] = []
        self.mic_due: list[int] = []
        self.speech_sent: list[tuple[int, int]] = []
        self.mic_dropped = 0
        self.playback_recv: list[tuple[int, int]] = []
        self.module_recv: list[tuple[int, int]] = []
        self._kbuf = bytearray()  # the kernel's receive buffer, as far as the module can tell
        self._kdata = asyncio.Event()
        self._kroom = asyncio.Event()
        self._keof = False
        self.played: list[tuple[int, bytes]] = []
        self.discarded: list[tuple[int, int]] = []
        self.flushes: list[tuple[int, str, int, bool]] = []
        self.violations: list[str] = []

    # -- channel data -------------------------------------------------------------

    def set_variable(self, name: str, value: str) -> None:
        """switch_channel_set_variable: a (re)set variable moves to the end of the list."""
        self.variables.pop(name, None)
        self.variables[name] = value

    @property
    def channel_name(self) -> str:
        return dict(self._fixed).get("Channel-Name", "")

    def channel_data(self) -> list[tuple[str, str]]:
        """switch_channel_event_set_data: basic data, Caller-* profile, then variable_*."""
        answer_state = "hangup" if self.hung_up else "answered" if self.answered else "ringing"
        state_number = {"CS_EXECUTE": "4", "CS_HANGUP": "10", "CS_REPORTING": "11"}[self._channel_state]
        codec, rate, bits = self._codec
        out: list[tuple[str, str]] = []
        for name, value in self._fixed:
            if name == "Channel-State":
                value = self._channel_state
            elif name == "Channel-Call-State":
                value = self._call_state
            elif name == "Channel-State-Number":
                value = state_number
            elif name in ("Channel-Read-Codec-Name", "Channel-Write-Codec-Name"):
                value = codec
            elif name in ("Channel-Read-Codec-Rate", "Channel-Write-Codec-Rate"):
                value = rate
            elif name in ("Channel-Read-Codec-Bit-Rate", "Channel-Write-Codec-Bit-Rate"):
                value = bits
            elif name == "Caller-Channel-Answered-Time":
                value = str(self._answered_us)
            elif name == "Caller-Channel-Hangup-Time":
                value = str(self._hangup_us)
            out.append((name, value))
            if name == "Answer-State":
                out[-1] = (name, answer_state)
                if self.hangup_cause and self._channel_state != "CS_REPORTING":
                    out.append(("Hangup-Cause", self.hangup_cause))
        out += [(f"variable_{n}", v) for n, v in self.variables.items()]
        return out

    def fire_channel(self, name: str, extra: Iterable[tuple[str, str]] = (), **kw: object) -> FiredEvent:
        return self.fire(name, extra, channel=self.channel_data(), **kw)  # type: ignore[arg-type]

    def connect_reply(self) -> bytes:
        """The outbound ``connect`` reply: a serialized CHANNEL_DATA event (§3.6, TV-ESL-7).

        caller profile with the ``Channel`` prefix, then the channel data, then the reply
        headers, URL-encoded, one empty line, no outer Content-Length.
        """
        data = self.channel_data()
        profile = [("Channel-" + n[len("Caller-") :], v) for n, v in data if n.startswith("Caller-")]
        reply = [
            ("Content-Type", "command/reply"),
            ("Reply-Text", "+OK\n"),
            ("Socket-Mode", "async"),
            ("Control", "full"),
        ]
        headers = build_event("CHANNEL_DATA", reply, channel=profile + data)
        return serialize_plain(headers)

    # -- Event Socket -------------------------------------------------------------

    async def connect(self, host: str, port: int, timeout: float = 10.0) -> SocketAudioCall:
        """Connect as ``socket host:port async full`` does; send nothing; answer ``connect``.

        Returns once the first command was answered (or, if it was not ``connect``,
        swallowed without a reply as mes.c does); the session keeps serving commands.
        """
        self.socket_arg = f"{host}:{port} async full"
        self.set_variable("current_application_data", self.socket_arg)
        self.set_variable("current_application", "socket")
        self.set_variable("socket_host", host)
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port, limit=1 << 20), timeout)
        self.reader, self.writer = reader, writer
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        # FreeSWITCH gives the application 25 s for its first command (§3.6), then sends the
        # disconnect notice and closes (read_packet timeout -> listener_run end).
        try:
            first = await asyncio.wait_for(read_command(reader), self.first_command_timeout)
        except TimeoutError:
            self.close_esl()
            raise
        if first is None:
            self.close_esl()
            raise ConnectionError("the client closed before sending connect")
        self.commands.append(first)
        if first.name == "connect":
            self.connected = True
            self.send(self.connect_reply())
        else:
            await self.handle(first)  # processed, but its reply is never sent
        await writer.drain()
        self._tasks.append(asyncio.create_task(self.serve()))
        self._tasks.append(asyncio.create_task(self._park_loop()))
        return self

    def _locate(self, uuid: str) -> SocketAudioCall | None:
        call = self if uuid == self.uuid else self.peers.get(uuid)
        if call is None and self.switch is not None:
            call = self.switch.calls.get(uuid)
        return None if call is None or call.hung_up else call

    def listeners(self) -> list[EslListener]:
        return [self, *(self.switch.connections if self.switch is not None else [])]

    def session_command(self, cmd: Command, low: str) -> str | None:
        if low.startswith("connect"):
            self.connected = True
            self.send(self.connect_reply())
            return ""  # reply already written
        if low.startswith("getvar"):
            name = cmd.line[7:].strip() if " " in cmd.line else ""
            return self.variables.get(name, "") or "-ERR command not found"
        if low.startswith("myevents"):
            if self.myevents:
                return "-ERR aready enabled."
            self.event_names |= MYEVENTS
            self.myevents = self.events_enabled = True
            if "xml" in cmd.line or "XML" in cmd.line:
                self.format = "xml"
            if "json" in cmd.line or "JSON" in cmd.line:
                self.format = "json"
            return "+OK Events Enabled"
        return None

    def queue_message(self, cmd: Command) -> None:
        """switch_core_session_queue_private_event: the park loop runs it (async mode)."""
        self._apps.put_nowait(cmd)

    async def _park_loop(self) -> None:
        while not self.hung_up:
            msg = await self._apps.get()
            try:
                await self._run_message(msg)
            except Exception as exc:  # a peer bug must show up in the test, not kill the call silently
                self.errors.append(f"park loop: {exc!r}")
                log.exception("fs_peer park loop")

    async def _run_message(self, msg: Command) -> None:
        """switch_ivr_parse_event: execute / hangup call commands (§3.6)."""
        call_command = (msg.header("call-command") or "").lower()
        if call_command == "hangup":
            await self._hangup(msg.header("hangup-cause") or "NORMAL_CLEARING")
            return
        if call_command != "execute":
            return
        app = msg.header("execute-app-name") or ""
        arg = msg.header("execute-app-arg")
        if arg is None and msg.body is not None:
            arg = msg.body
        arg = arg or ""
        loops = int(msg.header("loops") or "1")
        for _ in range(max(loops, 1)):
            if self.hung_up:
                return
            await self._execute(app, arg, msg.header("Event-UUID"))

    async def _execute(self, app: str, arg: str, app_uuid: str | None) -> None:
        """switch_core_session_exec: CHANNEL_EXECUTE, the application, CHANNEL_EXECUTE_COMPLETE."""
        tail = [("Application-UUID", app_uuid)] if app_uuid else []
        self.set_variable("current_application_data", arg)
        self.set_variable("current_application", app)
        self.fire_channel("CHANNEL_EXECUTE", [("Application", app), ("Application-Data", arg), *tail])
        if app == "socket_audio":
            await self._socket_audio_app(arg)
        elif app == "answer":
            self._answer()
        elif app == "hangup":
            await self._hangup(arg or "NORMAL_CLEARING", after=(app, arg, tail))
            return
        elif app == "sleep":
            await asyncio.sleep(int(arg or "0") / 1000)
        done = [("Application", app), ("Application-Data", arg), ("Application-Response", "_none_"), *tail]
        self.fire_channel("CHANNEL_EXECUTE_COMPLETE", done)

    def _answer(self) -> None:
        if self.answered:
            return
        self.answered = True
        self._call_state = "ACTIVE"
        self._answered_us = time.time_ns() // 1000
        self.fire_channel("CHANNEL_ANSWER")

    # -- hang-up (§3.6, §2.6) -------------------------------------------------------

    async def hangup(self, cause: str = "NORMAL_CLEARING") -> None:
        """Hang the channel up as FreeSWITCH does, and return when the Event Socket is closed.

        CHANNEL_HANGUP, the ``socket`` application's EXECUTE_COMPLETE, audio socket
        shutdown+close; with ``linger``: the linger notice, CHANNEL_HANGUP_COMPLETE, then the
        final notice after the linger time (scaled by ``linger_scale``) or when the client
        sends ``exit``/closes; without: the final notice and close at once.
        """
        await self._hangup(cause)
        await self.closed.wait()

    async def _hangup(self, cause: str, after: tuple[str, str, list[tuple[str, str]]] | None = None) -> None:
        if self.hung_up:
            return
        self.hung_up = True
        self.hangup_cause = cause
        self._call_state = "HANGUP"
        self._hangup_us = time.time_ns() // 1000
        self.fire_channel("CHANNEL_HANGUP")
        self.set_variable("hangup_cause", cause)
        if after is not None:
            app, arg, tail = after
            done = [("Application", app), ("Application-Data", arg), ("Application-Response", "_none_"), *tail]
            self.fire_channel("CHANNEL_EXECUTE_COMPLETE", done)
        if self.socket_arg:
            self.set_variable("current_application_data", self.socket_arg)
            self.set_variable("current_application", "socket")
            done = [
                ("Application", "socket"),
                ("Application-Data", self.socket_arg),
                ("Application-Response", "_none_"),
            ]
            self.fire_channel("CHANNEL_EXECUTE_COMPLETE", done)
        self._channel_state = "CS_HANGUP"
        self.stop_audio_now()  # media bug CLOSE: shutdown + close, no event
        self._channel_state = "CS_REPORTING"
        if self.linger is not None and not self.closed.is_set():
            self.send(linger_notice(self.uuid, self.channel_name, self.linger))
            self.fire_channel("CHANNEL_HANGUP_COMPLETE", pre=[("Hangup-Cause", cause)])
            wait = None if self.linger == -1 else self.linger * self.linger_scale
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.closed.wait(), wait)
            self.close_esl()
        else:
            # Without linger the listener closes as soon as it sees the channel down;
            # HANGUP_COMPLETE comes later and is lost for this connection (§3.6).
            self.close_esl()
            self.fire_channel("CHANNEL_HANGUP_COMPLETE", pre=[("Hangup-Cause", cause)])
        for task in self._tasks:
            if task is not asyncio.current_task():
                task.cancel()

    async def on_client_gone(self) -> None:
        self.close_esl()
        # The listener ends -> CF_CONTROLLED cleared -> park returns -> dialplan ends -> hang-up.
        if self.hangup_on_esl_close and not self.hung_up and not self.resume:
            self._hangup_task = asyncio.create_task(self._hangup("NORMAL_CLEARING"))

    def abort(self) -> None:
        """Reset both sockets at once (SO_LINGER 0 + close): a crashed or killed FreeSWITCH."""
        for task in self._tasks:
            task.cancel()
        if self.audio_sock is not None:
            _rst(self.audio_sock)
            self._audio_cleanup()
        if self.writer is not None:
            sock = self.writer.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.writer.transport.abort()
        self.hung_up = True
        self.closed.set()

    async def aclose(self) -> None:
        """Tear everything down without protocol (test cleanup); idempotent."""
        self.abort()
        tasks = [t for t in self._tasks + [self._hangup_task] if t is not None]
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- mod_socket_audio (§2) ------------------------------------------------------

    async def _socket_audio_app(self, arg: str) -> None:
        """socket_audio_start: parse, connect (blocking in FreeSWITCH), start the pipe; on any
        failure only log (``errors``): no event, no variable (§2.1)."""
        parts = arg.split(" ")
        if len(parts) != 2 or not parts[1].isdigit() or not 0 < int(parts[1]) <= 65535:
            self.errors.append(f"socket_audio: usage/invalid port in {arg!r}")
            return
        if self.never_connect_audio:
            self.errors.append("socket_audio: never_connect_audio set, not connecting")
            return
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
                await asyncio.wait_for(loop.sock_connect(sock, address), self.audio_connect_timeout)
            except BaseException:
                sock.close()
                raise
        except (TimeoutError, OSError) as exc:
            self.errors.append(f"socket_audio: failed to connect to {host}:{port}: {exc!r}")
            return
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.audio_sock = sock
        self.audio_connected_ns = time.monotonic_ns()
        self.running = True
        self.socket_audio_active = True
        self.audio_closed.clear()
        self.audio_connected.set()
        self._audio_tasks = [
            asyncio.create_task(self._mic_loop(sock)),
            asyncio.create_task(self._kernel_reader(sock)),
            asyncio.create_task(self._socket_thread()),
        ]
        self._tasks += self._audio_tasks

    def request_flush(self) -> None:
        """uuid_socket_audio_flush: only sets the flag (§2.5)."""
        self.flush_flag = True

    def stop_audio_now(self) -> None:
        """Media bug removed (uuid_socket_audio_stop, hang-up): shutdown(RDWR) + close, no event."""
        self.socket_audio_active = False
        if self.audio_sock is not None:
            with contextlib.suppress(OSError):
                self.audio_sock.shutdown(socket.SHUT_RDWR)
            self._audio_cleanup()

    async def stop_audio(self) -> None:
        """As ``uuid_socket_audio_stop`` run by someone else: immediate EOF at the sidecar, no events."""
        self.stop_audio_now()
        await asyncio.sleep(0)

    def _audio_cleanup(self) -> None:
        self.running = False
        current = asyncio.current_task()
        for task in self._audio_tasks:
            if task is not current:
                task.cancel()
        sock, self.audio_sock = self.audio_sock, None
        if sock is not None:
            # Unhook the fd from the loop before closing it: a task may be parked in sock_recv.
            with contextlib.suppress(Exception):
                loop = asyncio.get_running_loop()
                loop.remove_reader(sock.fileno())
                loop.remove_writer(sock.fileno())
            sock.close()
        self.audio_closed.set()
        self._fail_mic_waiters("audio socket closed")

    def _fail_mic_waiters(self, why: str) -> None:
        """Speech queued by :meth:`stream` will not go out: its callers get an error, not a hang."""
        for _, fut in self._mic_waiters:
            if not fut.done():
                fut.set_exception(ConnectionError(why))
        self._mic_waiters.clear()

    # mic: FreeSWITCH -> sidecar (§2.3)

    async def stream(self, pcm16k: bytes, odd_splits: bool = False, timeout: float = 10.0) -> list[tuple[int, int]]:
        """Send the caller's speech (16 kHz int16 LE mono) on the next mic frames.

        Waits for the audio socket first; returns the ``(t_ns, nbytes)`` of the writes that
        carried this speech. With ``odd_splits`` some frames go out as 641 + 639 bytes, as a
        TCP split could deliver them.
        """
        await asyncio.wait_for(self.audio_connected.wait(), timeout)
        if not self.running:
            raise ConnectionError("the audio socket is closed")
        self._odd_splits = odd_splits
        start = len(self.speech_sent)
        self._mic_pending += pcm16k
        self._mic_speech_queued += len(pcm16k)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._mic_waiters.append((self._mic_speech_queued, fut))
        await fut
        return self.speech_sent[start:]

    @property
    def first_speech_ns(self) -> int | None:
        return self.speech_sent[0][0] if self.speech_sent else None

    def _mic_size(self) -> int:
        """640, or a 641 + 639 pair now and then with ``odd_splits`` (the totals stay on the grid)."""
        if self._short_next:
            self._short_next = False
            return MIC_FRAME - 1
        if self._odd_splits and len(self._mic_pending) >= 2 * MIC_FRAME and self._mic_index % 3 == 1:
            self._short_next = True
            return MIC_FRAME + 1
        return MIC_FRAME

    async def _mic_loop(self, sock: socket.socket) -> None:
        """One write per 20 ms against the monotonic clock (no drift); a full kernel buffer drops
        the frame and a partial write loses its remainder, as switch_socket_send_nonblock does."""
        try:
            await self._mic_frames(sock)
        finally:
            # The media bug stopped (module thread ended, socket gone): what was queued is lost.
            self._fail_mic_waiters("the mic stream stopped before the speech went out")

    async def _mic_frames(self, sock: socket.socket) -> None:
        period = PTIME_MS * 1_000_000
        t0 = time.monotonic_ns()
        k = 0
        while self.running:
            k += 1
            due = t0 + k * period
            delay = due - time.monotonic_ns()
            if delay > 0:
                await asyncio.sleep(delay / 1e9)
            if not self.running:
                return
            size = self._mic_size()
            speech = bool(self._mic_pending)
            if speech:
                data = bytes(self._mic_pending[:size])
                del self._mic_pending[:size]
                if len(data) < size:
                    # Silence completes the last frame so the stream is back on the 640 B grid:
                    # FreeSWITCH's frames are whole, only a TCP split moves the boundaries.
                    data += bytes((-(self._mic_total + len(data))) % MIC_FRAME)
                    self._odd_splits = False
            elif self.idle_silence:
                data = bytes(MIC_FRAME)
            else:
                continue
            self._mic_index += 1
            self._mic_total += len(data)
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
                self._mic_speech_sent += min(len(data), self._mic_speech_queued - self._mic_speech_sent)
                while self._mic_waiters and self._mic_waiters[0][0] <= self._mic_speech_sent:
                    _, fut = self._mic_waiters.pop(0)
                    if not fut.done():
                        fut.set_result(None)

    # speaker: sidecar -> FreeSWITCH (§2.4, §2.5)

    async def _kernel_reader(self, sock: socket.socket) -> None:
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
                    self.audio_eof_ns = time.monotonic_ns()
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
            self.fire_channel(
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

    async def _socket_thread(self) -> None:
        """socket_audio_thread: blocking recv, flush/discard checks, queue, paced playback loop."""
        period = PTIME_MS * 1_000_000
        try:
            while self.running and not self.hung_up:
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
                while self.running and not self.hung_up:
                    if not self.playing and len(self.queue) >= PLAY_FRAME:
                        self.playing = True
                        self.fire_channel("CUSTOM", subclass="socket_audio::playback_start", calling="playback_start")
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
                            self.fire_channel(
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
            self.running = False  # the media bug stops sending mic audio (§2.3)


async def _sleep_until(deadline_ns: int) -> None:
    delay = deadline_ns - time.monotonic_ns()
    if delay > 0:
        await asyncio.sleep(delay / 1e9)


def _rst(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
