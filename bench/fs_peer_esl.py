"""FreeSWITCH's Event Socket, played by a peer in tests: not FreeSWITCH itself.

A test double that writes the bytes FreeSWITCH 1.10.12's mod_event_socket writes and answers
commands in the order and with the texts of mes.c ``parse_command``, following PROTOCOLS.md
§3 (and §7). It *parses* what the client sends (§3.1: a command line, header lines, an empty
line, an optional ``Content-Length`` body) and *serializes* replies, api responses,
disconnect notices and events (§3.4: ``text/event-plain`` with URL-encoded values, or
``text/event-json``).

* :class:`EslListener` is one Event Socket connection (shared by both modes);
  bench/fs_peer.py builds the outbound channel with mod_socket_audio on it.
* :class:`InboundEslServer` is the inbound Event Socket (port 8021 style, §3.3, TV-ESL-1).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import itertools
import json
import re
import time
import uuid as uuidlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from farm.protocol.esl import url_encode


if TYPE_CHECKING:
    from bench.fs_peer import SocketAudioCall

__all__ = [
    "GOODBYE",
    "Command",
    "FiredEvent",
    "EslListener",
    "InboundEslServer",
    "build_event",
    "read_command",
    "serialize_plain",
    "serialize_json",
    "event_message",
    "command_reply",
    "api_response",
    "disconnect_notice",
    "linger_notice",
]


# mes.c send_disconnect(): the 67-byte goodbye of every closing Event Socket (§3.6).
GOODBYE = "Disconnected, goodbye.\nSee you at ClueCon! http://www.cluecon.com/\n"
# mes.c MAX_CONTENT_LENGTH: a bigger client body makes FreeSWITCH drop the connection (§3.1).
MAX_CONTENT_LENGTH = 16 * 1024 * 1024
# The channels myevents subscribes to (mes.c myevents branch, §3.6).
MYEVENTS = frozenset(
    "CHANNEL_ANSWER CHANNEL_APPLICATION CHANNEL_BRIDGE CHANNEL_CREATE CHANNEL_DATA CHANNEL_DESTROY "
    "CHANNEL_EXECUTE CHANNEL_EXECUTE_COMPLETE CHANNEL_HANGUP CHANNEL_HANGUP_COMPLETE CHANNEL_ORIGINATE "
    "CHANNEL_UUID CHANNEL_OUTGOING CHANNEL_PARK CHANNEL_PROGRESS CHANNEL_PROGRESS_MEDIA CHANNEL_STATE "
    "CHANNEL_UNBRIDGE CHANNEL_UNPARK DETECTED_SPEECH DTMF NOTALK TALK".split()
)
# switch_event.c EVENT_NAMES: the words `event` accepts (case-insensitively); others are ignored.
EVENT_NAMES = frozenset(
    "CUSTOM CLONE CHANNEL_CREATE CHANNEL_DESTROY CHANNEL_STATE CHANNEL_CALLSTATE CHANNEL_ANSWER CHANNEL_HANGUP "
    "CHANNEL_HANGUP_COMPLETE CHANNEL_EXECUTE CHANNEL_EXECUTE_COMPLETE CHANNEL_HOLD CHANNEL_UNHOLD CHANNEL_BRIDGE "
    "CHANNEL_UNBRIDGE CHANNEL_PROGRESS CHANNEL_PROGRESS_MEDIA CHANNEL_OUTGOING CHANNEL_PARK CHANNEL_UNPARK "
    "CHANNEL_APPLICATION CHANNEL_ORIGINATE CHANNEL_UUID API LOG INBOUND_CHAN OUTBOUND_CHAN STARTUP SHUTDOWN PUBLISH "
    "UNPUBLISH TALK NOTALK SESSION_CRASH MODULE_LOAD MODULE_UNLOAD DTMF MESSAGE PRESENCE_IN NOTIFY_IN PRESENCE_OUT "
    "PRESENCE_PROBE MESSAGE_WAITING MESSAGE_QUERY ROSTER CODEC BACKGROUND_JOB DETECTED_SPEECH DETECTED_TONE "
    "PRIVATE_COMMAND HEARTBEAT TRAP ADD_SCHEDULE DEL_SCHEDULE EXE_SCHEDULE RE_SCHEDULE RELOADXML NOTIFY PHONE_FEATURE "
    "PHONE_FEATURE_SUBSCRIBE SEND_MESSAGE RECV_MESSAGE REQUEST_PARAMS CHANNEL_DATA GENERAL COMMAND SESSION_HEARTBEAT "
    "CLIENT_DISCONNECTED SERVER_DISCONNECTED SEND_INFO RECV_INFO RECV_RTCP_MESSAGE SEND_RTCP_MESSAGE CALL_SECURE NAT "
    "RECORD_START RECORD_STOP PLAYBACK_START PLAYBACK_STOP CALL_UPDATE FAILURE SOCKET_DATA MEDIA_BUG_START "
    "MEDIA_BUG_STOP CONFERENCE_DATA_QUERY CONFERENCE_DATA CALL_SETUP_REQ CALL_SETUP_RESULT CALL_DETAIL DEVICE_STATE "
    "TEXT SHUTDOWN_REQUESTED CERT_RELOAD ALL".split()
)

# Where FreeSWITCH 1.10.12 creates each event: Event-Calling-File/-Function/-Line-Number.
CALLING = {
    "CHANNEL_DATA": ("mod_event_socket.c", "parse_command", 2021),
    "CHANNEL_ANSWER": ("switch_channel.c", "switch_channel_perform_mark_answered", 3846),
    "CHANNEL_EXECUTE": ("switch_core_session.c", "switch_core_session_exec", 2944),
    "CHANNEL_EXECUTE_COMPLETE": ("switch_core_session.c", "switch_core_session_exec", 2967),
    "CHANNEL_HANGUP": ("switch_channel.c", "switch_channel_perform_hangup", 3445),
    "CHANNEL_HANGUP_COMPLETE": ("switch_core_state_machine.c", "switch_core_session_reporting_state", 943),
    "BACKGROUND_JOB": ("mod_event_socket.c", "api_exec", 1572),
    # mod_socket_audio.c @ 10d9959 (the capture shows 188 / 211 / 310).
    "playback_start": ("mod_socket_audio.c", "socket_audio_thread", 188),
    "playback_stop_recv": ("mod_socket_audio.c", "socket_audio_thread", 139),
    "playback_stop_flush": ("mod_socket_audio.c", "socket_audio_thread", 211),
    "playback_stop_complete": ("mod_socket_audio.c", "socket_audio_thread", 310),
}

_SEQUENCE = itertools.count(1000)  # Event-Sequence is switch-wide
CORE_UUID = "d4bb85a6-deff-4d9a-8567-2dc9a836c2b3"
HOSTNAME = "fs-peer"

# -- serialization (FreeSWITCH -> client), §3.1, §3.4, §3.6 -------------------------


def serialize_plain(headers: Iterable[tuple[str, str]], body: str | None = None) -> bytes:
    """switch_event_serialize(encode=TRUE): URL-encoded values, ``_undef_`` for empty ones (§3.4)."""
    lines = [f"{name}: {url_encode(value) or '_undef_'}\n" for name, value in headers]
    data = "".join(lines).encode("utf-8")
    raw = (body or "").encode("utf-8")
    # A body of 0 bytes is written like no body at all (switch_event.c).
    return data + (b"Content-Length: %d\n\n" % len(raw) + raw if raw else b"\n")


def serialize_json(headers: Iterable[tuple[str, str]], body: str | None = None) -> bytes:
    """switch_event_serialize_json: cJSON_PrintUnformatted of one flat object (§3.4).

    cJSON escapes ``"``, ``\\``, and control characters (``\\uXXXX`` in lowercase hex) and
    leaves non-ASCII as UTF-8, as ``json.dumps(ensure_ascii=False)`` does.
    """
    obj: dict[str, str] = dict(headers)
    if body is not None:
        obj["Content-Length"] = str(len(body.encode("utf-8")))
        obj["_body"] = body
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def event_message(headers: Iterable[tuple[str, str]], body: str | None = None, fmt: str = "plain") -> bytes:
    """One delivered event: outer ``Content-Length`` then ``Content-Type`` (mes.c read_packet, §3.4)."""
    payload = serialize_json(headers, body) if fmt == "json" else serialize_plain(headers, body)
    return b"Content-Length: %d\nContent-Type: text/event-%s\n\n" % (len(payload), fmt.encode()) + payload


def command_reply(text: str, *extra: tuple[str, str]) -> bytes:
    """``command/reply`` with ``Reply-Text`` (and e.g. ``Job-UUID`` for bgapi), §3.2."""
    lines = ["Content-Type: command/reply", f"Reply-Text: {text}", *(f"{n}: {v}" for n, v in extra)]
    return ("\n".join(lines) + "\n\n").encode("utf-8")


def api_response(body: str) -> bytes:
    """``api/response`` (mes.c api_exec): empty output becomes ``-ERR no reply`` (§3.2)."""
    raw = (body or "-ERR no reply\n").encode("utf-8")
    return b"Content-Type: api/response\nContent-Length: %d\n\n" % len(raw) + raw


def disconnect_notice(session_uuid: str | None) -> bytes:
    """The final notice (mes.c send_disconnect, §3.6); inbound sessions lack the two middle headers."""
    raw = GOODBYE.encode()
    if session_uuid is None:
        head = f"Content-Type: text/disconnect-notice\nContent-Length: {len(raw)}\n\n"
    else:
        head = (
            "Content-Type: text/disconnect-notice\n"
            f"Controlled-Session-UUID: {session_uuid}\n"
            "Content-Disposition: disconnect\n"
            f"Content-Length: {len(raw)}\n\n"
        )
    return head.encode() + raw


def linger_notice(session_uuid: str, channel_name: str, linger_time: int) -> bytes:
    """The notice at linger start (mes.c read_packet); ``linger_time`` -1 = until exit (§3.6)."""
    return (
        "Content-Type: text/disconnect-notice\n"
        f"Controlled-Session-UUID: {session_uuid}\n"
        "Content-Disposition: linger\n"
        f"Channel-Name: {channel_name}\n"
        f"Linger-Time: {linger_time}\n"
        "Content-Length: 0\n\n"
    ).encode()


# -- parsing client -> FreeSWITCH (mes.c read_packet, §3.1) -------------------------


@dataclass(frozen=True)
class Command:
    """One command the client sent, as the peer standing in for FreeSWITCH parsed it (§3.1).

    ``line`` is the command line (``api uuid_break …``), ``headers`` the header lines in
    order (values taken literally, §3.1), ``body`` the ``Content-Length`` body, ``t_ns``
    the ``time.monotonic_ns()`` at which the whole command had arrived.
    """

    line: str
    headers: tuple[tuple[str, str], ...] = ()
    body: str | None = None
    t_ns: int = 0

    @property
    def name(self) -> str:
        return self.line.split(" ", 1)[0].lower()

    @property
    def args(self) -> str:
        return self.line.split(" ", 1)[1] if " " in self.line else ""

    def header(self, name: str, default: str | None = None) -> str | None:
        for n, v in self.headers:
            if n.lower() == name.lower():
                return v
        return default


class BadCommand(Exception):
    """What makes FreeSWITCH drop the connection while reading a command (out-of-range length)."""


async def read_command(reader: asyncio.StreamReader) -> Command | None:
    """Read one command like read_packet: leading blank lines skipped, ``\\r`` ignored,
    lines without ``:`` ignored, ``Content-Length`` body read by count. None at EOF."""
    lines: list[str] = []
    while True:
        raw = await reader.readline()
        if not raw:
            return None
        text = raw.rstrip(b"\r\n").replace(b"\r", b"").decode("utf-8", "replace")
        if not text:
            if lines:
                break
            continue
        lines.append(text)
    headers: list[tuple[str, str]] = []
    body: str | None = None
    for text in lines[1:]:
        name, sep, value = text.partition(":")
        if not sep:
            continue
        headers.append((name, value.lstrip(" ")))
        if name.lower() == "content-length":
            match = re.match(r"\s*([+-]?\d+)", value)
            length = int(match.group(1)) if match else 0
            if length < 0 or length > MAX_CONTENT_LENGTH:
                raise BadCommand(f"content-length {value.strip()[:20]} out of range")
            if length:
                try:
                    body = (await reader.readexactly(length)).decode("utf-8", "replace")
                except asyncio.IncompleteReadError:
                    return None
    return Command(lines[0], tuple(headers), body, time.monotonic_ns())


@dataclass(frozen=True)
class FiredEvent:
    """An event the peer (standing in for FreeSWITCH) fired: when, what, and whether it was delivered."""

    t_ns: int
    name: str
    subclass: str | None
    headers: tuple[tuple[str, str], ...]
    body: str | None
    delivered: bool

    def header(self, name: str) -> str | None:
        return dict(self.headers).get(name)


# -- the Event Socket listener, shared by both modes --------------------------------


def _date_headers() -> list[tuple[str, str]]:
    now_us = time.time_ns() // 1000
    seconds = now_us / 1e6
    return [
        ("Event-Date-Local", time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))),
        ("Event-Date-GMT", email.utils.formatdate(seconds, usegmt=True)),
        ("Event-Date-Timestamp", str(now_us)),
    ]


def build_event(
    name: str,
    extra: Iterable[tuple[str, str]] = (),
    *,
    subclass: str | None = None,
    calling: str | None = None,
    pre: Iterable[tuple[str, str]] = (),
    channel: Iterable[tuple[str, str]] | None = None,
) -> list[tuple[str, str]]:
    """Headers in delivery order (§3.4): Event-Subclass, the core block, ``pre`` (e.g. the
    Hangup-Cause of HANGUP_COMPLETE), the channel data, then the event's own headers."""
    file, func, line = CALLING.get(calling or name, ("switch_event.c", "switch_event_fire_detailed", 0))
    headers: list[tuple[str, str]] = [("Event-Subclass", subclass)] if subclass else []
    headers += [
        ("Event-Name", name),
        ("Core-UUID", CORE_UUID),
        ("FreeSWITCH-Hostname", HOSTNAME),
        ("FreeSWITCH-Switchname", HOSTNAME),
        ("FreeSWITCH-IPv4", "127.0.0.1"),
        ("FreeSWITCH-IPv6", "::1"),
        *_date_headers(),
        ("Event-Calling-File", file),
        ("Event-Calling-Function", func),
        ("Event-Calling-Line-Number", str(line)),
        ("Event-Sequence", str(next(_SEQUENCE))),
        *pre,
        *(channel or ()),
        *extra,
    ]
    return headers


class EslListener:
    """One Event Socket connection as mes.c serves it: parse_command's order and reply texts.

    Not FreeSWITCH: a peer following PROTOCOLS.md §3. Subclasses add the session (outbound)
    or authentication (inbound).
    """

    def __init__(self) -> None:
        self.commands: list[Command] = []
        self.events: list[FiredEvent] = []
        self.errors: list[str] = []
        self.format = "plain"
        self.events_enabled = False
        self.myevents = False
        self.event_names: set[str] = set()
        self.custom: set[str] = set()
        self.filters: list[tuple[str, str]] = []
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.closed = asyncio.Event()
        self.api_handlers: dict[str, Callable[[str | None], str]] = {}

    # what each subclass supplies
    session_uuid: str | None = None

    def _locate(self, uuid: str) -> SocketAudioCall | None:
        return None

    def _lenient(self, uuid: str) -> bool:
        return False

    # -- writing --------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        if self.writer is not None and not self.writer.is_closing():
            self.writer.write(data)

    async def send_raw(self, data: bytes) -> None:
        """Write arbitrary bytes on the Event Socket (misbehaviour for bad-input tests)."""
        self.send(data)
        if self.writer is not None and not self.writer.is_closing():
            await self.writer.drain()

    def close_esl(self, notice: bool = True) -> None:
        """send_disconnect + close_socket (mes.c listener_run end)."""
        if self.writer is not None and not self.writer.is_closing():
            if notice:
                self.writer.write(disconnect_notice(self.session_uuid))
            with contextlib.suppress(OSError):
                if self.writer.can_write_eof():
                    self.writer.write_eof()
            self.writer.close()
        self.closed.set()

    # -- events ---------------------------------------------------------------------

    def wants(self, name: str, subclass: str | None, headers: Mapping[str, str]) -> bool:
        """mes.c event_handler: event list, CUSTOM subclasses, filters, myevents."""
        if not self.events_enabled or self.closed.is_set():
            return False
        send = "ALL" in self.event_names or (
            name in self.event_names and (name != "CUSTOM" or subclass is None or subclass in self.custom)
        )
        if send and self.filters:
            send = False
            for fname, fvalue in self.filters:
                value = next((v for k, v in headers.items() if k.lower() == fname.lower()), None)
                if value is None:
                    continue
                positive = not fvalue.startswith("-")
                target = fvalue.lstrip("+- ")
                if send and positive:
                    continue
                hit = bool(re.search(target[1:], value)) if fvalue.startswith("/") else value.lower() == target.lower()
                if hit:
                    if positive:
                        send = True
                    else:
                        send = False
                        break
        if send and self.myevents:
            send = headers.get("Unique-ID") == self.session_uuid
            if self.session_uuid is not None and headers.get("Job-Owner-UUID") == self.session_uuid:
                send = True
        return send

    def deliver(self, name: str, subclass: str | None, headers: list[tuple[str, str]], body: str | None) -> bool:
        """Write one event on this connection if it is subscribed (in its format)."""
        if not self.wants(name, subclass, dict(headers)):
            return False
        if self.format not in ("plain", "json"):
            self.errors.append(f"event {name} not delivered: format {self.format} is not modelled")
            return False
        self.send(event_message(headers, body, self.format))
        return True

    def fire(
        self,
        name: str,
        extra: Iterable[tuple[str, str]] = (),
        *,
        subclass: str | None = None,
        calling: str | None = None,
        body: str | None = None,
        pre: Iterable[tuple[str, str]] = (),
        channel: list[tuple[str, str]] | None = None,
    ) -> FiredEvent:
        """Build an event as switch_event_create + set_data do, deliver it where subscribed, record it."""
        headers = build_event(name, extra, subclass=subclass, calling=calling, pre=pre, channel=channel)
        delivered = False
        for listener in self.listeners():
            delivered = listener.deliver(name, subclass, headers, body) or delivered
        fired = FiredEvent(time.monotonic_ns(), name, subclass, tuple(headers), body, delivered)
        self.events.append(fired)
        return fired

    def listeners(self) -> list[EslListener]:
        """The connections an event fired here can reach (events are switch-wide)."""
        return [self]

    # -- commands (mes.c parse_command, in its order) ------------------------------

    async def serve(self) -> None:
        """Read and answer commands until the client closes or the peer ends the connection."""
        assert self.reader is not None
        try:
            while not self.closed.is_set():
                try:
                    cmd = await read_command(self.reader)
                except BadCommand as exc:
                    self.errors.append(str(exc))
                    break
                except (ConnectionError, OSError, ValueError, asyncio.LimitOverrunError) as exc:
                    self.errors.append(f"read failed: {exc!r}")
                    break
                if cmd is None:
                    break
                self.commands.append(cmd)
                reply = await self.handle(cmd)
                if reply is not None:
                    self.send(command_reply(reply) if isinstance(reply, str) else reply)
                if self.writer is not None and not self.writer.is_closing():
                    with contextlib.suppress(ConnectionError):
                        await self.writer.drain()
                if cmd.name in ("exit", "...") or self._stop_after_reply:
                    break
        finally:
            await self.on_client_gone()

    _stop_after_reply = False

    async def on_client_gone(self) -> None:
        self.close_esl()

    async def handle(self, cmd: Command) -> str | bytes | None:
        """Return the Reply-Text (or whole bytes, or None for no reply) for one command."""
        low = cmd.line.lower()
        if low.startswith(("exit", "...")):
            return "+OK bye"
        pre = self.pre_auth(cmd, low)
        if pre is not None:
            return pre
        if low.startswith("filter "):
            return self._filter(cmd.line[7:].lstrip(" "))
        session = self.session_uuid is not None
        if session and low.startswith("resume"):
            self.resume = True
            return "+OK"
        if session or low.startswith("myevents "):
            special = self.session_command(cmd, low)
            if special is not None:
                return special or None
        if low.startswith("divert_events"):
            if not session:
                return "-ERR not controlling a session."
            onoff = cmd.line[13:].strip(" ")
            if not onoff:
                return "-ERR missing value."
            return "+OK events diverted" if onoff.lower() == "on" else "+OK events not diverted"
        if low.startswith("sendmsg"):
            return self.sendmsg(cmd)
        if not self.full:
            return "-ERR command not found"
        if low.startswith("api "):
            cmd_name, _, arg = cmd.line[4:].partition(" ")
            return api_response(self.api(cmd_name, arg if _ else None))
        if low.startswith("bgapi "):
            return self._bgapi(cmd)
        if low.startswith("linger"):
            if not session:
                return "-ERR not controlling a session"
            arg = cmd.line[7:] if cmd.line[6:7] == " " else ""
            self.linger = int(re.match(r"\s*(-?\d*)", arg).group(1) or 0) if arg else -1  # type: ignore[union-attr]
            return f"+OK will linger {self.linger} seconds" if self.linger != -1 else "+OK will linger"
        if low.startswith("nolinger"):
            if not session:
                return "-ERR not controlling a session"
            self.linger = None
            return "+OK will not linger"
        if low.startswith("event"):
            return self._event(cmd.line)
        if low.startswith("nixevent"):
            return self._nixevent(cmd.line)
        if low.startswith("noevents"):
            if not self.events_enabled:
                return "-ERR not listening for events"
            self.events_enabled = False
            self.event_names.clear()
            self.custom.clear()
            return "+OK no longer listening for events"
        return "-ERR command not found"

    full = True
    resume = False
    linger: int | None = None

    def pre_auth(self, cmd: Command, low: str) -> str | None:
        return None

    def session_command(self, cmd: Command, low: str) -> str | None:
        return None

    def sendmsg(self, cmd: Command) -> str:
        target = cmd.line[7:].strip() or (cmd.header("session-id") or "")
        if target == self.session_uuid:
            target = ""
        if not target and self.session_uuid is not None:
            target = self.session_uuid  # outbound: the controlled channel
        call = self._locate(target) if target else None
        if call is not None:
            call.queue_message(cmd)
            return "+OK"
        if target and self._lenient(target):
            return "+OK"
        return f"-ERR invalid session id [{target}]"

    def _filter(self, rest: str) -> str:
        name, _, value = rest.partition(" ")
        if name.lower() == "delete" and value:
            name, _, value = value.partition(" ")
            if name.lower() == "all":
                self.filters.clear()
            else:
                self.filters = [(n, v) for n, v in self.filters if not (n == name and (not value or v == value))]
            return f"+OK filter deleted. [{name}][{value or '(null)'}]"
        if value:
            if name.lower() == "add":
                name, _, value = value.partition(" ")
            self.filters.append((name, value))
            return f"+OK filter added. [{name}]=[{value}]"
        return "-ERR invalid syntax"

    def _event(self, line: str) -> str:
        words = line.split(" ")[1:]
        keys = 0
        custom = False
        for i, word in enumerate(words):
            if i == 0 and word.lower() in ("plain", "json", "xml"):
                self.format = word.lower()
                continue
            if custom:
                self.custom.add(word)
            elif word.upper() in EVENT_NAMES:
                keys += 1
                self.event_names.add(word.upper())
                custom = custom or word.upper() == "CUSTOM"
        if not keys:
            return "-ERR no keywords supplied"
        self.events_enabled = True
        return f"+OK event listener enabled {self.format}"

    def _nixevent(self, line: str) -> str:
        keys = 0
        custom = False
        for word in line.split(" ")[1:]:
            if custom:
                self.custom.discard(word)
            elif word.upper() in EVENT_NAMES:
                keys += 1
                name = word.upper()
                if name == "CUSTOM":
                    custom = True
                elif name == "ALL":
                    self.event_names.clear()
                else:
                    if "ALL" in self.event_names:  # ALL minus one: every name but that one
                        self.event_names = set(EVENT_NAMES) - {"ALL"}
                    self.event_names.discard(name)
        if not keys:
            return "-ERR no keywords supplied"
        self.events_enabled = True
        return "+OK events nixed"

    def _bgapi(self, cmd: Command) -> bytes:
        api_cmd, _, arg = cmd.line[6:].partition(" ")
        job = cmd.header("Job-UUID") or str(uuidlib.uuid4())
        output = self.api(api_cmd, arg if _ else None) or "Command returned no output!"
        extra = [("Job-UUID", job), ("Job-Owner-UUID", self.session_uuid or ""), ("Job-Command", api_cmd)]
        if _:
            extra.append(("Job-Command-Arg", arg))
        # The job thread answers after the reply is on the wire.
        asyncio.get_running_loop().call_soon(lambda: self.fire("BACKGROUND_JOB", extra, body=output))
        return command_reply(f"+OK Job-UUID: {job}", ("Job-UUID", job))

    def api(self, cmd: str, arg: str | None) -> str:
        """Run one API command as mod_commands / mod_socket_audio / mod_audio_stream answer it."""
        if cmd in self.api_handlers:
            return self.api_handlers[cmd](arg)
        if cmd in ("uuid_socket_audio_flush", "uuid_socket_audio_stop"):
            uuid = (arg or "").strip(" \t\r\n")
            if not uuid:
                return f"-ERR Usage: {cmd} <uuid>\n"
            call = self._locate(uuid)
            if call is None:
                return f"-ERR Session not found: {uuid}\n"
            if not call.socket_audio_active:
                return f"-ERR Socket audio not active on session: {uuid}\n"
            if cmd.endswith("flush"):
                call.request_flush()
            else:
                call.stop_audio_now()
            return "+OK\n"
        if cmd == "uuid_break":
            if not arg:
                return "-USAGE: <uuid> [all]\n"
            uuid = arg.split(" ", 1)[0]
            if self._locate(uuid) is None and not self._lenient(uuid):
                return "-ERR No such channel!\n"
            return "+OK\n"
        if cmd == "uuid_audio_stream":
            return "+OK Success\n" if arg else "-USAGE: <uuid> [start | stop | send_text | pause | resume]\n"
        return f"-ERR {cmd} Command not found!\n"


# -- inbound Event Socket (§3.3) ---------------------------------------------------


class InboundConnection(EslListener):
    """One client of :class:`InboundEslServer`: not FreeSWITCH, a peer per PROTOCOLS.md §3.3."""

    def __init__(self, server: InboundEslServer) -> None:
        super().__init__()
        self.server = server
        self.authed = False
        self.api_handlers = server.api_handlers
        self.commands = server.commands  # one shared, ordered record of all connections
        self.events = server.events

    def _locate(self, uuid: str) -> SocketAudioCall | None:
        call = self.server.calls.get(uuid)
        return None if call is None or call.hung_up else call

    def _lenient(self, uuid: str) -> bool:
        return not self.server.strict_uuids

    def listeners(self) -> list[EslListener]:
        return list(self.server.connections)

    def pre_auth(self, cmd: Command, low: str) -> str | None:
        if self.authed:
            return None
        if low.startswith("auth "):
            if cmd.line[5:].rstrip("\r") == self.server.password:
                self.authed = True
                return "+OK accepted"
            self._stop_after_reply = True
            return "-ERR invalid"
        return "-ERR command not found"


class InboundEslServer:
    """FreeSWITCH's inbound Event Socket (port 8021 style) as a peer; not FreeSWITCH.

    Follows PROTOCOLS.md §3.3 and TV-ESL-1: greets with ``auth/request``, checks
    ``auth <password>``, then answers ``api`` (``uuid_break``, ``uuid_audio_stream``,
    the socket_audio commands of :meth:`attach`-ed calls, ``api_handlers``), ``bgapi``
    (TV-ESL-4, BACKGROUND_JOB to subscribers), ``event``/``noevents``/``filter``/``exit``.
    ``commands`` records every command of every connection with its arrival time.
    With ``strict_uuids`` False (default) uuids of calls not attached are accepted.
    """

    def __init__(self, password: str = "ClueCon", *, strict_uuids: bool = False) -> None:
        self.password = password
        self.strict_uuids = strict_uuids
        self.commands: list[Command] = []
        self.events: list[FiredEvent] = []
        self.calls: dict[str, SocketAudioCall] = {}
        self.api_handlers: dict[str, Callable[[str | None], str]] = {}
        self.connections: list[InboundConnection] = []
        self.server: asyncio.base_events.Server | None = None
        self.port = 0
        self._tasks: set[asyncio.Task[None]] = set()

    def attach(self, call: SocketAudioCall) -> None:
        """Make a call known here: ``api uuid_socket_audio_flush <uuid>`` reaches it and its
        events reach this server's subscribed connections (events are switch-wide)."""
        self.calls[call.uuid] = call
        call.switch = self

    async def start(self, host: str = "127.0.0.1") -> InboundEslServer:
        self.server = await asyncio.start_server(self._accept, host, 0, limit=1 << 20)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = InboundConnection(self)
        conn.reader, conn.writer = reader, writer
        self.connections.append(conn)
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            conn.send(b"Content-Type: auth/request\n\n")
            await conn.serve()
        finally:
            if task is not None:
                self._tasks.discard(task)

    async def close(self) -> None:
        for conn in self.connections:
            conn.close_esl(notice=False)
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
