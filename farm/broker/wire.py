"""FARMW03: the broker's wire contract. Constants, typed bodies, frame builders/parsers only.

Spec (one page; the code below follows it, nothing else defines it)
-------------------------------------------------------------------

Sockets, all owned (bound) by the broker:

* ``workers``  ROUTER. Each worker connects one DEALER.
* ``ingress``  ROUTER. The ingress connects one DEALER.
* ``events_in`` XSUB. Every event producer (workers, ingress) connects an XPUB.
* ``events``   XPUB. Any subscriber (ingress, dialer apps, bench) connects a SUB.
  The broker relays XSUB -> XPUB unchanged (topic = call id + NUL, see
  :mod:`farm.protocol.events`) and answers each subscription on its own topic.

Every control message a DEALER sends is ``[b"", HEADER, command, *body]``; the
ROUTER sees ``[identity, b"", HEADER, command, *body]``. Body frames are UTF-8
text or JSON. A message that does not follow this spec (another header, an unknown
command, the wrong number of frames, a body that does not parse) is dropped and
logged by whoever receives it: :func:`parse` and the body parsers raise
:class:`WireError` and nothing else. Audio never crosses these sockets: only call
ids and ring names do (all messages are far below ``zmq.COPY_THRESHOLD``, so they
are copied).

Worker -> broker:

* ``W_READY index pid [held]``   register (also after a reconnect); two integers >= 0,
  and ``held``, a JSON array of ``[call_id, ring, info]``: the calls this worker still
  serves (after a reconnect; none when left out). A worker index is held by one
  registration: a ``W_READY`` for an index already registered under another identity
  replaces it, and the old one's calls not in ``held`` are reassigned at once.
* ``W_HEARTBEAT load``           sent from the worker's recognition loop every
  ``HEARTBEAT_INTERVAL``; ``load`` is a JSON :class:`Load` (its calls, how far
  recognition trails, what a call costs it, and the counters and gauges the node's
  metrics show per worker: CPU, memory, recognizer pool, events). Any message from a
  worker counts as a heartbeat. Body fields missing from a JSON body are 0 (older
  peers); members a receiver does not know are ignored (newer peers).
* ``W_DONE call_id [reason]``    the worker serves the call no more. Without
  ``reason``: its ring is closed and fully processed and its ``call_end`` is published
  (the ingress ends the call when that ``call_end`` reaches it, after every other event
  of the call: one path, in order). With ``reason``: the worker gave the call up with
  no ``call_end`` (it could not attach the ring, or failed on it; an ``error`` event
  said why).
* ``W_FLUSH call_id request``    the caller speaks over the call's playback: cut it
  (barge-in). ``request`` is a JSON :class:`FlushRequest`. An internal command, not an
  event: the ingress answers it with a ``barge_in`` event when it did cut.
* ``W_RELEASED call_id``         after ``B_RELEASE``: the worker stopped serving the
  call between two utterances; the ring's committed cursor is where the next
  worker resumes (no event was published for the move).
* ``W_DISCONNECT``               the worker is leaving; reassign its calls now.

Broker -> worker:

* ``B_ASSIGN call_id ring info`` serve this call: attach ``ring``, resume at its
  committed cursor. ``info`` is JSON (protocol, metadata, transcribe options).
* ``B_RELEASE call_id``          hand this call back at its next pause (rebalancing:
  the broker moves calls from a busier worker to a less busy one, one at a time).
* ``B_HEARTBEAT``                sent when the broker has been silent to a worker.
* ``B_DISCONNECT``               the broker does not know this worker (it was
  declared dead, or the broker restarted): send ``W_READY`` again on a new DEALER,
  with the calls it still serves in ``held``.
* ``B_DROP call_id``             another worker serves this call (or it has ended):
  stop serving it now, publish nothing more for it, answer nothing.

Ingress -> broker:

* ``I_OPEN call_id ring info``   a new call; the broker assigns it to the live
  worker with the fewest calls (then the least behind), or queues it until a
  worker is ready.
* ``I_HEARTBEAT``                liveness of the ingress.

Broker -> ingress:

* ``I_GAVE_UP call_id reason``   relayed ``W_DONE`` with a reason: no worker will end
  the call with a ``call_end``; the ingress says its end itself.
* ``I_FLUSH call_id request``    relayed ``W_FLUSH`` from the worker serving the call.
* ``I_STATUS status``            answer to ``I_HEARTBEAT``: a JSON :class:`Status`
  (the ingress is ready for calls only while some worker is live and the broker
  answers, and takes new ones only while recognition keeps up and the node holds
  fewer calls than its ``capacity``: the CPUs calls may use over what a call costs,
  measured by the workers, see :func:`farm.broker.broker.node_capacity`). It also
  carries each live worker's last :class:`Load` (a :class:`WorkerReport`) and the
  broker's own counters, which the ingress exports as the node's metrics
  (:mod:`farm.ingress.metrics`): so every process's figures reach ``/metrics`` over
  these links, with no other channel.

Restarts. A broker the supervisor restarted (``FARM_BROKER_RESTART`` in its
environment) knows no call and no worker. For its first ``RESTART_GRACE_S`` it adopts
the calls workers name in ``held`` (the worker goes on from where it is: no event is
repeated), holds the calls the ingress announces again (``I_OPEN`` of a ring it
already knows is a no-op, at any time) without assigning them. The ingress
announces its live calls again when ``Status.broker_pid`` changes. After the grace,
a held call the broker does not know has ended (``B_DROP``), and calls still
unclaimed are assigned as usual, from their committed cursor. Events: producers
*connect* to ``events_in``, so ZeroMQ keeps each one's pipe through the broker's
death and queues what it publishes (up to its SNDHWM) until the new relay binds; a
restarted relay reads them only ``RESTART_GRACE_S / 2`` after its start, once the
subscribers (who reconnect every 100 ms) are back, so the events of the gap reach
them in order.

Liveness (zguide "Heartbeating", MDP): a worker that sent nothing for
``HEARTBEAT_INTERVAL * HEARTBEAT_LIVENESS`` seconds is dead: the broker forgets
it and reassigns its calls. The broker also watches each worker's process (a pidfd
from W_READY's pid): an exit is seen at once, and a worker whose process lives is
given ``WATCHED_LIVENESS`` intervals (its loop starved on a busy machine, most
likely). A worker with no call beats, and is beaten, every ``IDLE_HEARTBEAT_INTERVAL``
(see :func:`beat_interval`), and an unwatched one is given ``HEARTBEAT_LIVENESS`` of
those. Either way the broker reassigns its calls, one by one to the least loaded live
worker (the new worker resumes from the ring's committed cursor, so no words are lost). Workers
treat the broker the same way and reconnect by re-creating their DEALER.

Balance: whenever a worker serves two or more calls more than another, the broker
releases one of its calls (``B_RELEASE``) and assigns it to the least loaded worker
once released; so calls queued before the workers were all ready, or moved off a
dead worker, spread again, and a returning worker takes its share.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any


__all__ = [
    "HEADER",
    "HEARTBEAT_INTERVAL",
    "HEARTBEAT_LIVENESS",
    "WATCHED_LIVENESS",
    "IDLE_HEARTBEAT_INTERVAL",
    "beat_interval",
    "W_READY",
    "W_HEARTBEAT",
    "W_DONE",
    "W_DISCONNECT",
    "W_RELEASED",
    "W_FLUSH",
    "B_ASSIGN",
    "B_RELEASE",
    "B_HEARTBEAT",
    "B_DISCONNECT",
    "B_DROP",
    "I_OPEN",
    "I_HEARTBEAT",
    "I_GAVE_UP",
    "I_FLUSH",
    "I_STATUS",
    "WireError",
    "message",
    "parse",
    "encode_info",
    "decode_info",
    "FlushRequest",
    "Load",
    "Status",
    "WorkerReport",
    "parse_ready",
    "encode_held",
    "HeldCall",
    "RESTART_GRACE_S",
    "RESTART_ENV",
]

HEADER = b"FARMW03"

HEARTBEAT_INTERVAL = 0.25  # seconds
HEARTBEAT_LIVENESS = 4  # missed intervals before a peer is dead (about 1 s)
# A worker whose process the broker watches (a pidfd: same host, the ipc endpoint) is seen
# to exit at once; its silence then means a starved or stuck loop, and moving its calls to a
# worker as starved only adds a replay: it is given this many intervals (5 s) instead.
WATCHED_LIVENESS = 20
# A worker with no call beats, and is beaten, this often: most of an idle node's CPU was
# these wakes (bench/RESULTS.md). A call assigned wakes it at once (B_ASSIGN).
IDLE_HEARTBEAT_INTERVAL = 1.0
RESTART_GRACE_S = 2.0  # a restarted broker's time for its peers to come back (see Restarts)
RESTART_ENV = "FARM_BROKER_RESTART"  # set by the supervisor for a broker it starts again


def beat_interval(busy: bool, worker_timeout: float) -> float:
    """How often a worker and the broker beat to each other: ``HEARTBEAT_INTERVAL`` while
    the worker serves calls, ``IDLE_HEARTBEAT_INTERVAL`` while it serves none (but at least
    4 beats per ``--worker-timeout``: the supervisor must not take an idle loop for a hung one)."""
    if busy:
        return HEARTBEAT_INTERVAL
    return max(HEARTBEAT_INTERVAL, min(IDLE_HEARTBEAT_INTERVAL, worker_timeout / 4))


W_READY = b"\x01"
W_HEARTBEAT = b"\x02"
W_DONE = b"\x03"
W_DISCONNECT = b"\x04"
W_RELEASED = b"\x05"
W_FLUSH = b"\x06"

B_ASSIGN = b"\x11"
B_HEARTBEAT = b"\x12"
B_DISCONNECT = b"\x13"
B_RELEASE = b"\x14"
B_DROP = b"\x15"

I_OPEN = b"\x21"
I_HEARTBEAT = b"\x22"
I_STATUS = b"\x24"
I_GAVE_UP = b"\x25"
I_FLUSH = b"\x26"

_NAMES = {
    W_READY: "W_READY",
    W_HEARTBEAT: "W_HEARTBEAT",
    W_DONE: "W_DONE",
    W_DISCONNECT: "W_DISCONNECT",
    W_RELEASED: "W_RELEASED",
    W_FLUSH: "W_FLUSH",
    B_ASSIGN: "B_ASSIGN",
    B_RELEASE: "B_RELEASE",
    B_HEARTBEAT: "B_HEARTBEAT",
    B_DISCONNECT: "B_DISCONNECT",
    B_DROP: "B_DROP",
    I_OPEN: "I_OPEN",
    I_HEARTBEAT: "I_HEARTBEAT",
    I_STATUS: "I_STATUS",
    I_GAVE_UP: "I_GAVE_UP",
    I_FLUSH: "I_FLUSH",
}

# Number of body frames each command carries (W_READY: with or without ``held``; W_DONE:
# with or without a reason).
_ARITY: dict[bytes, int | tuple[int, ...]] = {
    W_READY: (2, 3),
    W_HEARTBEAT: 1,
    W_DONE: (1, 2),
    W_DISCONNECT: 0,
    W_RELEASED: 1,
    W_FLUSH: 2,
    B_ASSIGN: 3,
    B_RELEASE: 1,
    B_HEARTBEAT: 0,
    B_DISCONNECT: 0,
    B_DROP: 1,
    I_OPEN: 3,
    I_HEARTBEAT: 0,
    I_STATUS: 1,
    I_GAVE_UP: 2,
    I_FLUSH: 2,
}


class WireError(ValueError):
    """A control message does not follow FARMW03."""


def message(command: bytes, *body: str | bytes) -> list[bytes]:
    """Frames a DEALER sends: ``[b"", HEADER, command, *body]``."""
    arity = _ARITY.get(command)
    if arity is None:
        raise WireError(f"unknown command {command!r}")
    if len(body) not in (arity if isinstance(arity, tuple) else (arity,)):
        raise WireError(f"{_NAMES[command]} takes {arity} body frames, got {len(body)}")
    return [b"", HEADER, command, *(b if isinstance(b, bytes) else b.encode() for b in body)]


def parse(frames: Sequence[bytes]) -> tuple[bytes, list[str]]:
    """Parse what a DEALER sent (identity already removed): ``(command, body)``."""
    if len(frames) < 3 or frames[0] != b"":
        raise WireError(f"malformed envelope of {len(frames)} frames")
    if frames[1] != HEADER:
        raise WireError(f"header {frames[1][:16]!r}, expected {HEADER!r}")
    command = frames[2]
    arity = _ARITY.get(command)
    if arity is None:
        raise WireError(f"unknown command {command!r}")
    body = frames[3:]
    if len(body) not in (arity if isinstance(arity, tuple) else (arity,)):
        raise WireError(f"{_NAMES[command]} carries {len(body)} body frames, expected {arity}")
    try:
        return command, [b.decode() for b in body]
    except UnicodeDecodeError:
        raise WireError(f"{_NAMES[command]} body is not UTF-8") from None


def name(command: bytes) -> str:
    return _NAMES.get(command, repr(command))


def encode_info(info: dict[str, Any]) -> str:
    return json.dumps(info, separators=(",", ":"), ensure_ascii=False)


def decode_info(raw: str) -> dict[str, Any]:
    try:
        info = json.loads(raw)
    except ValueError as exc:
        raise WireError(f"call info is not JSON: {exc}") from None
    if not isinstance(info, dict):
        raise WireError("call info is not a JSON object")
    return info


def _json_object(raw: str, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(raw)
    except ValueError:
        raise WireError(f"{what} is not JSON: {raw[:40]!r}") from None
    if not isinstance(obj, dict):
        raise WireError(f"{what} is not a JSON object")
    return obj


def _count(obj: dict[str, Any], key: str, what: str) -> int:
    value = obj.get(key, 0)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise WireError(f"{what} {key} is {value!r}, expected an integer >= 0")
    return value


@dataclass(frozen=True)
class FlushRequest:
    """``W_FLUSH``'s body: where in the call the caller spoke over playback, for how long
    so far, and the stamps of the utterance's first voiced frame (recv ... vad), which the
    ``barge_in`` event carries on, so its latency is measured from the caller's first sound."""

    offset_ms: int = 0  # the call's audio offset when the worker decided
    voiced_ms: int = 0  # voiced audio heard so far (--barge-in-min-speech-ms or more)
    speech_start_ms: int = 0  # where the utterance began
    stamps: tuple[tuple[str, int], ...] = ()

    def encode(self) -> str:
        obj = {"offset_ms": self.offset_ms, "voiced_ms": self.voiced_ms, "speech_start_ms": self.speech_start_ms}
        return json.dumps({**obj, "stamps": dict(self.stamps)}, separators=(",", ":"))

    @classmethod
    def decode(cls, raw: str) -> FlushRequest:
        obj = _json_object(raw, "flush request")
        stamps = obj.get("stamps", {})
        if not isinstance(stamps, dict):
            raise WireError("flush request stamps is not a JSON object")
        counts = {f: _count(obj, f, "flush request") for f in ("offset_ms", "voiced_ms", "speech_start_ms")}
        return cls(**counts, stamps=tuple((str(k), _count(stamps, k, "flush request stamp")) for k in stamps))


@dataclass(frozen=True)
class Load:
    """A worker's ``W_HEARTBEAT`` body: what it serves, how far recognition trails, and the
    figures the node's metrics show per worker (counters count since the worker started)."""

    calls: int = 0
    lag_ms: int = 0  # the most audio any of its calls has waiting for recognition
    utterances: int = 0  # utterances in progress
    call_cpu_ms: int = 0  # CPU ms the worker spends per call-second, smoothed (0: not measured yet)
    queued: int = 0  # call channels waiting for a recognition thread
    cpu_ms: int = 0  # CPU time the worker process used, every thread (counter)
    rss_bytes: int = 0  # resident memory
    recognizers_idle: int = 0  # warm recognizers in the pool
    recognizers_busy: int = 0  # recognizers leased to utterances
    recognizers_created: int = 0  # (counter)
    recognizers_retired: int = 0  # (counter)
    events_published: int = 0  # (counter)
    partials_dropped: int = 0  # partials not published: the call's recognition was behind (counter)

    def encode(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def decode(cls, raw: str) -> Load:
        return cls._from_object(_json_object(raw, "load"))

    @classmethod
    def _from_object(cls, obj: dict[str, Any]) -> Load:
        return cls(*(_count(obj, f.name, "load") for f in fields(cls)))


@dataclass(frozen=True)
class WorkerReport:
    """One live worker in :class:`Status`: its index, its pid and its last :class:`Load`."""

    index: int
    pid: int
    load: Load = Load()

    @classmethod
    def _from_object(cls, obj: Any) -> WorkerReport:
        if not isinstance(obj, dict) or not isinstance(obj.get("load", {}), dict):
            raise WireError("status worker report is not a JSON object with a load object")
        return cls(_count(obj, "index", "report"), _count(obj, "pid", "report"), Load._from_object(obj.get("load", {})))


@dataclass(frozen=True)
class Status:
    """The broker's ``I_STATUS`` body: the node's recognition side as the ingress needs it
    (admission, readiness) and as its metrics show it (the workers' reports)."""

    workers: int = 0  # live workers
    lag_ms: int = 0  # the least loaded worker's lag: what a new call would meet
    calls: int = 0  # calls assigned to workers
    capacity: int = 0  # calls the node's CPUs hold within the SLO (0: no limit)
    call_cpu_ms: int = 0  # the CPU ms per call-second that capacity is computed from
    workers_lost: int = 0  # workers declared dead (exited, silent or replaced) since the broker started (counter)
    calls_moved: int = 0  # calls moved between workers to balance them (counter)
    broker_pid: int = 0  # which broker answers: a new one means a restart (see Restarts)
    reports: tuple[WorkerReport, ...] = ()  # one per live worker, by index

    def encode(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def decode(cls, raw: str) -> Status:
        obj = _json_object(raw, "status")
        reports = obj.get("reports", [])
        if not isinstance(reports, list):
            raise WireError("status reports is not a JSON array")
        counts = {f.name: _count(obj, f.name, "status") for f in fields(cls) if f.name != "reports"}
        return cls(**counts, reports=tuple(WorkerReport._from_object(r) for r in reports))


# A call a worker still serves when it registers again: (call_id, ring, info).
HeldCall = tuple[str, str, str]


def encode_held(calls: Sequence[HeldCall]) -> str:
    return json.dumps([list(c) for c in calls], separators=(",", ":"), ensure_ascii=False)


def parse_ready(body: Sequence[str]) -> tuple[int, int, tuple[HeldCall, ...]]:
    """``W_READY``'s ``(index, pid, held)``."""
    try:
        index, pid = int(body[0]), int(body[1])
    except (ValueError, IndexError):
        raise WireError(f"W_READY body {list(body)[:2]!r} is not two integers") from None
    if index < 0 or pid <= 0:
        raise WireError(f"W_READY index {index}, pid {pid}: out of range")
    if len(body) < 3:
        return index, pid, ()
    try:
        held = json.loads(body[2])
    except ValueError:
        raise WireError(f"W_READY held is not JSON: {body[2][:40]!r}") from None
    if not isinstance(held, list) or not all(
        isinstance(c, list) and len(c) == 3 and all(isinstance(x, str) for x in c) for c in held
    ):
        raise WireError("W_READY held is not an array of [call_id, ring, info] strings")
    return index, pid, tuple((c[0], c[1], c[2]) for c in held)
