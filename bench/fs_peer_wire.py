"""The Event Socket's bytes as FreeSWITCH writes and reads them, for the peer in tests.

Not FreeSWITCH: the wire format of its mod_event_socket 1.10.12 as the peer standing in for
it uses it, following PROTOCOLS.md §3 (and §7). It *parses* what the client sends (§3.1: a
command line, header lines, an empty line, an optional ``Content-Length`` body) and
*serializes* replies, api responses, disconnect notices and events (§3.4:
``text/event-plain`` with URL-encoded values, or ``text/event-json``). :func:`build_event`
gives an event's headers in delivery order. No sockets are served here: connections are
bench/fs_peer_esl.py, the calls bench/fs_peer.py.
"""

from __future__ import annotations

import asyncio
import email.utils
import itertools
import json
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass

from farm.protocol.esl import url_encode


__all__ = [
    "GOODBYE",
    "BadCommand",
    "Command",
    "FiredEvent",
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


# -- events (§3.4) ---------------------------------------------------------------


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
