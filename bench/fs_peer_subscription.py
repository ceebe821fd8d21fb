"""Which events one Event Socket connection hears, for the FreeSWITCH peer in tests.

Not FreeSWITCH: mes.c's per-listener event state as the peer standing in for it keeps it,
following PROTOCOLS.md §3.3-§3.6: the ``event``/``nixevent``/``noevents``/``filter``/
``myevents`` commands set it (their reply texts are mes.c ``parse_command``'s) and
:meth:`Subscription.wants` is mes.c ``event_handler``'s verdict on one event. The connection
that owns it is bench/fs_peer_esl.py.
"""

from __future__ import annotations

import re
from collections.abc import Mapping


__all__ = ["EVENT_NAMES", "MYEVENTS", "Subscription"]


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


class Subscription:
    """One connection's event list, CUSTOM subclasses, filters, myevents flag and format.

    Each command method applies one command and returns its ``Reply-Text``.
    """

    def __init__(self) -> None:
        self.format = "plain"
        self.events_enabled = False
        self.myevents = False
        self.event_names: set[str] = set()
        self.custom: set[str] = set()
        self.filters: list[tuple[str, str]] = []

    def wants(self, name: str, subclass: str | None, headers: Mapping[str, str], session_uuid: str | None) -> bool:
        """mes.c event_handler: event list, CUSTOM subclasses, filters, myevents (``session_uuid``'s)."""
        if not self.events_enabled:
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
            send = headers.get("Unique-ID") == session_uuid
            if session_uuid is not None and headers.get("Job-Owner-UUID") == session_uuid:
                send = True
        return send

    def filter(self, rest: str) -> str:
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

    def event(self, line: str) -> str:
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

    def nixevent(self, line: str) -> str:
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

    def noevents(self) -> str:
        if not self.events_enabled:
            return "-ERR not listening for events"
        self.events_enabled = False
        self.event_names.clear()
        self.custom.clear()
        return "+OK no longer listening for events"

    def enable_myevents(self, line: str) -> str:
        """``myevents [plain|json|xml]`` of an outbound connection: its channel's events (§3.6)."""
        if self.myevents:
            return "-ERR aready enabled."
        self.event_names |= MYEVENTS
        self.myevents = self.events_enabled = True
        if "xml" in line or "XML" in line:
            self.format = "xml"
        if "json" in line or "JSON" in line:
            self.format = "json"
        return "+OK Events Enabled"
