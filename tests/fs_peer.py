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
  TV-ESL-1) on an ephemeral port.

Everything observable is recorded with ``time.monotonic_ns()`` so tests can assert on
timing (commands received, mic bytes sent, playback received and played, events fired).
The channel headers come from a real event recorded on FreeSWITCH 1.10.12
(captures/freeswitch-1.10.12/socket_audio_sip_pcmu/events.jsonl) with the uuid replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import itertools
import json
import logging
import re
import socket
import struct
import time
import uuid as uuidlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from farm.protocol.esl import url_encode


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

log = logging.getLogger("tests.fs_peer")

# mes.c send_disconnect(): the 67-byte goodbye of every closing Event Socket (§3.6).
GOODBYE = "Disconnected, goodbye.\nSee you at ClueCon! http://www.cluecon.com/\n"
# mes.c MAX_CONTENT_LENGTH: a bigger client body makes FreeSWITCH drop the connection (§3.1).
MAX_CONTENT_LENGTH = 16 * 1024 * 1024
# mod_socket_audio.c constants (§2.2, §2.4, §2.5).
INPUT_RATE = 16000
OUTPUT_RATE = 24000
RECV_SIZE = 8192
DISCARD_NS = 50_000_000
PTIME_MS = 20
MIC_FRAME = INPUT_RATE // 1000 * PTIME_MS * 2  # 640 B
PLAY_FRAME = OUTPUT_RATE // 1000 * PTIME_MS * 2  # 960 B: the peer plays the 24 kHz bytes it got
QUEUE_MAX = 48000 * 2 * 90
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
_TEMPLATE_PATH = Path(__file__).parent / "captures/freeswitch-1.10.12/socket_audio_sip_pcmu/events.jsonl"


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


def channel_template() -> tuple[str, list[tuple[str, str]]]:
    """(uuid, channel headers) of a real SIP PCMU channel recorded on FreeSWITCH 1.10.12.

    The headers are those ``switch_channel_event_set_data`` adds (``Channel-State`` through
    the last ``variable_*``), taken from the recorded ``playback_start`` event.
    """
    for line in _TEMPLATE_PATH.read_text().splitlines():
        event = json.loads(line)
        if event.get("Event-Subclass") == "socket_audio::playback_start":
            names = list(event)
            start = names.index("Channel-State")
            return event["Unique-ID"], [(n, str(event[n])) for n in names[start:]]
    raise RuntimeError(f"no playback_start event in {_TEMPLATE_PATH}")


# -- parsing client -> FreeSWITCH (mes.c read_packet, §3.1) -------------------------


@dataclass(frozen=True)
class Command:
    """One command the client sent, as the peer parsed it.

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
    """An event the channel fired: when, what, and whether this connection delivered it."""

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


class _Listener:
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

    def listeners(self) -> list[_Listener]:
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


# -- mod_socket_audio + the outbound session ---------------------------------------


class SocketAudioCall(_Listener):
    """One FreeSWITCH channel under outbound Event Socket control, with mod_socket_audio.

    Not FreeSWITCH: a peer standing in for it, following PROTOCOLS.md §2, §3.6 and §7.
    Connect with :meth:`connect`; the peer then answers every command in order (§3.2) and
    runs ``sendmsg`` applications from a park loop (async mode: ``+OK`` first).

    Records (all times ``time.monotonic_ns()``):
        commands: every :class:`Command` received, in order.
        events: every :class:`FiredEvent`, delivered or not (``delivered`` says which).
        mic_sent: ``(t_ns, nbytes, is_speech)`` per mic write; ``speech_sent`` the speech ones.
        mic_dropped: bytes FreeSWITCH would have lost (kernel buffer full, §7).
        playback_recv: ``(t_ns, nbytes)`` per recv of farm's playback socket data.
        played: ``(t_ns, frame)`` per 20 ms frame written to the channel (24 kHz bytes).
        discarded: ``(t_ns, nbytes)`` per chunk dropped by a flush or its 50 ms window.
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
        hangup_on_esl_close: bool = True,
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
        self.hangup_on_esl_close = hangup_on_esl_close
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
        self.speech_sent: list[tuple[int, int]] = []
        self.mic_dropped = 0
        self.playback_recv: list[tuple[int, int]] = []
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
        self.reader, self.writer = await asyncio.wait_for(asyncio.open_connection(host, port, limit=1 << 20), timeout)
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        # FreeSWITCH gives the application 25 s for its first command (§3.6).
        first = await asyncio.wait_for(read_command(self.reader), max(timeout, 25.0))
        if first is None:
            self.close_esl()
            raise ConnectionError("the client closed before sending connect")
        self.commands.append(first)
        if first.name == "connect":
            self.connected = True
            self.send(self.connect_reply())
        else:
            await self.handle(first)  # processed, but its reply is never sent
        await self.writer.drain()
        self._tasks.append(asyncio.create_task(self.serve()))
        self._tasks.append(asyncio.create_task(self._park_loop()))
        return self

    def _locate(self, uuid: str) -> SocketAudioCall | None:
        call = self if uuid == self.uuid else self.peers.get(uuid)
        if call is None and self.switch is not None:
            call = self.switch.calls.get(uuid)
        return None if call is None or call.hung_up else call

    def listeners(self) -> list[_Listener]:
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
            asyncio.create_task(self._socket_thread(sock)),
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
        for _, fut in self._mic_waiters:
            if not fut.done():
                fut.set_exception(ConnectionError("audio socket closed"))
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
        period = PTIME_MS * 1_000_000
        t0 = time.monotonic_ns()
        k = 0
        while self.running:
            k += 1
            delay = t0 + k * period - time.monotonic_ns()
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
            if speech:
                self.speech_sent.append((now, sent))
                self._mic_speech_sent += min(len(data), self._mic_speech_queued - self._mic_speech_sent)
                while self._mic_waiters and self._mic_waiters[0][0] <= self._mic_speech_sent:
                    _, fut = self._mic_waiters.pop(0)
                    if not fut.done():
                        fut.set_result(None)

    # speaker: sidecar -> FreeSWITCH (§2.4, §2.5)

    def _take(self, chunk: bytes) -> bytes:
        """Record one recv and return what the resampler would use (odd last byte dropped)."""
        now = time.monotonic_ns()
        self.playback_recv.append((now, len(chunk)))
        self._recv_total += len(chunk)
        if len(chunk) % 2:
            self.violations.append(
                f"recv {len(self.playback_recv)} of {len(chunk)} bytes is odd (total {self._recv_total}):"
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
        if self.discard_until_ns and time.monotonic_ns() < self.discard_until_ns:
            self.discarded.append((time.monotonic_ns(), len(chunk)))
            return True
        return False

    def _enqueue(self, data: bytes) -> None:
        self.queue += data
        if len(self.queue) > QUEUE_MAX:
            del self.queue[: len(self.queue) - QUEUE_MAX]

    def _play(self, frame: bytes) -> None:
        self.played.append((time.monotonic_ns(), frame))

    async def _socket_thread(self, sock: socket.socket) -> None:
        """socket_audio_thread: blocking recv, flush/discard checks, queue, paced playback loop."""
        loop = asyncio.get_running_loop()
        period = PTIME_MS * 1_000_000
        try:
            while self.running and not self.hung_up:
                try:
                    chunk = await loop.sock_recv(sock, RECV_SIZE)
                except OSError:
                    break
                if not chunk:
                    self.audio_eof_ns = time.monotonic_ns()
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
                        try:
                            more = sock.recv(RECV_SIZE)  # the non-blocking look (10d9959)
                        except (BlockingIOError, InterruptedError):
                            more = b""
                        except OSError:
                            break
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


# -- inbound Event Socket (§3.3) ---------------------------------------------------


class _InboundConnection(_Listener):
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

    def listeners(self) -> list[_Listener]:
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
        self.connections: list[_InboundConnection] = []
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
        conn = _InboundConnection(self)
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
