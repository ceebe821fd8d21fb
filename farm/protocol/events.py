"""The farm's own event schema: what the farm says about a call.

Defined once here and used by every producer (ingress, workers) and consumer
(ingress WebSocket relay, :mod:`farm.client`, bench). See ARCHITECTURE.md, "Events".

On the wire an event is a two-frame ZeroMQ message ``[topic, json]`` where
``topic`` is the call id followed by a NUL byte, so that a subscription to one
call id never matches another id that merely starts with it. The JSON object is
flat::

    {"v": 1, "type": "final", "call_id": "6f2d…", "seq": 7, "offset_ms": 5120,
     "channel": 0, "text": "…", "words": [...],
     "t": {"recv": 1234, "commit": 1240, "read": 1300, "vad": 1310, "asr": 1500,
           "publish": 1510}}

``t`` holds ``time.monotonic_ns()`` values of the stages the event passed through
(CLOCK_MONOTONIC is shared by every process of a host, so consumers can subtract
them). Type-specific members sit next to the common ones.

The broker's relay also acknowledges every subscription it receives with
``[topic, SUBSCRIBED]`` (an empty body) on the subscribed topic itself, so a
subscriber can know that it will miss nothing published from then on (ZeroMQ drops
what is published before a subscription arrives). Consumers skip such messages.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


__all__ = [
    "SCHEMA_VERSION",
    "EVENT_TYPES",
    "STAGES",
    "Event",
    "EventError",
    "END_REASONS",
    "ERROR_ENDS",
    "end_reason_code",
    "end_reason_of",
    "topic_for",
    "call_id_from_topic",
    "SUBSCRIBED",
    "CANARY_PREFIX",
    "is_canary_topic",
    "is_canary",
]

SCHEMA_VERSION = 1

# The body of the relay's acknowledgement of a subscription (see the module docstring).
SUBSCRIBED = b""

EVENT_TYPES = frozenset(
    {
        "call_start",  # ingress saw the call begin: protocol, rate, channels, metadata
        "call_end",  # the call's audio is fully processed: reason (END_REASONS), detail, duration_ms
        "speech_start",  # VAD hysteresis says speech began
        "partial",  # recognizer has a new partial hypothesis: text
        "final",  # utterance finished: text, words, reason (vad|endpoint|end|reset); llm_intent: an LLM intent follows
        "speech_end",  # VAD says speech ended: duration_ms
        "barge_in",  # the caller spoke over playback and it was cut: what was flushed
        "playback_start",  # the farm began playing audio to the call: play id, duration
        "playback_stop",  # that audio ended: reason complete|flush|barge_in|hangup, played_ms
        "intent",  # a transcript's intent: intent, matched, source rules|llm, early, also, revised (llm: final_seq)
        "amd",  # answering-machine detection decided: result human|machine|unknown, reason, features
        "beep",  # a voicemail beep ended: start_ms, end_ms, freq_hz, level_dbfs
        "tone",  # a call-progress tone: kind sit|busy|reorder|fax_cng|fax_ced, start_ms, end_ms, freq_hz
        "overrun",  # audio dropped because a reader fell behind: bytes, count
        "error",  # bad input or a lost worker: reason
    }
)

# Why a call ended: ``call_end``'s ``reason``. Its ``detail`` says more ("" if nothing):
# the error's message, the hang-up cause, the close code. A call ends once, with one of:
END_REASONS = (
    # The peer ended it: the WebSocket closed or was lost, the channel hung up, the Event
    # Socket closed. mod_audio_stream's `uuid_audio_stream stop` sends the very Close 1000
    # a hang-up sends (PROTOCOLS.md §1.10): it is a hangup here too.
    "hangup",
    # Audio stopped on request while the call went on: uuid_socket_audio_stop (the audio
    # socket ended, no hang-up followed), vosk-server's {"eof" : 1}.
    "stop",
    "drain",  # farm was shutting down (SIGTERM) and ended it
    "refused",  # farm did not take the call: shutting down, a rate it cannot serve, at capacity
    "idle",  # nothing came for --idle-timeout (--first-message-timeout before the call began)
    "error",  # bad input, or a start that failed; detail is the message (also in an error event)
    # The ingress process holding the call's connection died (it is restarted, the stream
    # is gone): the worker finished what had come and ended the call.
    "lost",
)
# A call a worker serves that ends with one of these has its ``error`` event published by
# that worker, right before call_end, from the ring's end detail: the ingress and the
# worker publish through different sockets, so an ingress error could reach a subscriber
# after the worker's call_end, which ends its subscription (detail cut to 120 bytes).
ERROR_ENDS = ("idle", "error")
# A call that never began (refused, idle or failed before its audio came) still ends with
# a call_end, from the ingress: seq 0, duration 0, no call_start before it. Refusals before
# a WebSocket upgrade (HTTP 503) have no events: FreeSWITCH reports those itself.


def end_reason_code(reason: str) -> int:
    """The ring's code for an end reason (1, 2 ...); 0 for one not in :data:`END_REASONS`."""
    return END_REASONS.index(reason) + 1 if reason in END_REASONS else 0


def end_reason_of(code: int) -> str:
    """The end reason of a ring code; "" for 0 (none recorded) or an unknown code."""
    return END_REASONS[code - 1] if 0 < code <= len(END_REASONS) else ""


# Latency stages in pipeline order (ARCHITECTURE.md, "Per-stage latency vocabulary").
STAGES = ("recv", "commit", "read", "vad", "asr", "publish")
# barge_in events also carry "flush": when the flush command was written to FreeSWITCH.

_COMMON = frozenset({"v", "type", "call_id", "seq", "offset_ms", "channel", "t"})


class EventError(ValueError):
    """An event could not be built or parsed (bad JSON, missing member, bad type)."""


@dataclass(frozen=True)
class Event:
    """One event about one call.

    Attributes:
        type: one of :data:`EVENT_TYPES`.
        call_id: the call this event is about.
        seq: per-call sequence number, increasing by one per event of the call, as
            counted by the call's worker. Events the ingress makes after
            ``call_start`` (``error``, ``barge_in``, ``playback_*``) carry 0: two
            processes cannot share one counter without a lock.
        offset_ms: audio offset in the call (caller channel time) the event refers to.
        data: type-specific members (``text``, ``words``, ``reason`` …).
        stamps: stage name -> ``time.monotonic_ns()`` when the event passed it.
        channel: audio channel the event is about (0 = caller).
    """

    type: str
    call_id: str
    seq: int = 0
    offset_ms: int = 0
    data: Mapping[str, Any] = field(default_factory=dict)
    stamps: Mapping[str, int] = field(default_factory=dict)
    channel: int = 0

    def __post_init__(self) -> None:
        if self.type not in EVENT_TYPES:
            raise EventError(f"unknown event type {self.type!r}")
        clash = _COMMON.intersection(self.data)
        if clash:
            raise EventError(f"event data may not redefine {sorted(clash)}")

    def __getitem__(self, key: str) -> Any:
        """Read a type-specific member, e.g. ``event["text"]``."""
        return self.data[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    def stamped(self, stage: str, ns: int) -> Event:
        """Return a copy with one more stage timestamp; call right before sending."""
        return Event(
            self.type,
            self.call_id,
            self.seq,
            self.offset_ms,
            self.data,
            {**self.stamps, stage: ns},
            self.channel,
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "v": SCHEMA_VERSION,
            "type": self.type,
            "call_id": self.call_id,
            "seq": self.seq,
            "offset_ms": self.offset_ms,
            "channel": self.channel,
        }
        out.update(self.data)
        out["t"] = dict(self.stamps)
        return out

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), ensure_ascii=False, separators=(",", ":")).encode()

    def to_frames(self) -> list[bytes]:
        """The ZeroMQ multipart message for this event: ``[topic, json]``."""
        return [topic_for(self.call_id), self.to_json()]

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> Event:
        try:
            if obj["v"] != SCHEMA_VERSION:
                raise EventError(f"event schema version {obj['v']!r}, expected {SCHEMA_VERSION}")
            data = {k: v for k, v in obj.items() if k not in _COMMON}
            stamps = obj.get("t") or {}
            if not isinstance(stamps, dict):
                raise EventError("event member 't' is not an object")
            return cls(
                str(obj["type"]),
                str(obj["call_id"]),
                int(obj["seq"]),
                int(obj["offset_ms"]),
                data,
                {str(k): int(v) for k, v in stamps.items()},
                int(obj.get("channel", 0)),
            )
        except KeyError as exc:
            raise EventError(f"event lacks member {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            if isinstance(exc, EventError):
                raise
            raise EventError(f"malformed event: {exc}") from None

    @classmethod
    def from_json(cls, raw: bytes | str) -> Event:
        try:
            obj = json.loads(raw)
        except ValueError as exc:
            raise EventError(f"event is not JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise EventError("event is not a JSON object")
        return cls.from_dict(obj)


def topic_for(call_id: str) -> bytes:
    """The ZeroMQ topic of a call's events; subscribe to it to get only that call."""
    return call_id.encode() + b"\0"


# The call ids of the node's own canary (farm/ingress/canary.py). The broker's relay sends
# their events to the ingress alone, never to the public stream; no peer may use them.
CANARY_PREFIX = "farm-canary-"
_CANARY_TOPIC = CANARY_PREFIX.encode()


def is_canary_topic(topic: bytes) -> bool:
    return topic.startswith(_CANARY_TOPIC)


def is_canary(call_id: str) -> bool:
    """The node's own probe: counted as nobody's call in the node's figures."""
    return call_id.startswith(CANARY_PREFIX)


def call_id_from_topic(topic: bytes) -> str:
    return topic.rstrip(b"\0").decode(errors="replace")
