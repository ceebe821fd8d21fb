"""FARMW01: the broker's wire contract. Constants and frame builders/parsers only.

Spec (one page; the code below follows it, nothing else defines it)
-------------------------------------------------------------------

Sockets, all owned (bound) by the broker:

* ``workers``  ROUTER. Each worker connects one DEALER.
* ``ingress``  ROUTER. The ingress connects one DEALER.
* ``events_in`` XSUB. Every event producer (workers, ingress) connects a PUB.
* ``events``   XPUB. Any subscriber (ingress, dialer apps, bench) connects a SUB.
  The broker relays XSUB <-> XPUB unchanged (topic = call id + NUL, see
  :mod:`farm.protocol.events`).

Every control message a DEALER sends is ``[b"", HEADER, command, *body]``; the
ROUTER sees ``[identity, b"", HEADER, command, *body]``. Body frames are UTF-8
text or JSON. A message with another header is dropped and logged. Audio never
crosses these sockets: only call ids and ring names do (all messages are far
below ``zmq.COPY_THRESHOLD``, so they are copied).

Worker -> broker:

* ``W_READY index pid``          register (also after a reconnect).
* ``W_HEARTBEAT calls``          sent from the worker's recognition loop every
  ``HEARTBEAT_INTERVAL``; ``calls`` is the number of calls it serves. Any
  message from a worker counts as a heartbeat.
* ``W_DONE call_id``             the call's ring is closed and fully processed,
  its ``call_end`` event is published.
* ``W_DISCONNECT``               the worker is leaving; reassign its calls now.

Broker -> worker:

* ``B_ASSIGN call_id ring info`` serve this call: attach ``ring``, resume at its
  committed cursor. ``info`` is JSON (protocol, metadata, transcribe options).
* ``B_HEARTBEAT``                sent when the broker has been silent to a worker.
* ``B_DISCONNECT``               the broker does not know this worker (it was
  declared dead): drop every call and send ``W_READY`` again on a new DEALER.

Ingress -> broker:

* ``I_OPEN call_id ring info``   a new call; the broker assigns it to the live
  worker with the fewest calls, or queues it until a worker is ready.
* ``I_HEARTBEAT``                liveness of the ingress.

Broker -> ingress:

* ``I_DONE call_id``             relayed ``W_DONE``: the ingress may unlink the ring.
* ``I_STATUS workers``           answer to ``I_HEARTBEAT``: how many workers are live
  (the ingress is ready for calls only while some are, and the broker answers).

Liveness (zguide "Heartbeating", MDP): a worker that sent nothing for
``HEARTBEAT_INTERVAL * HEARTBEAT_LIVENESS`` seconds is dead: the broker forgets
it and reassigns its calls (the new worker resumes from the ring's committed
cursor, so no words are lost). Workers treat the broker the same way and
reconnect by re-creating their DEALER.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any


__all__ = [
    "HEADER",
    "HEARTBEAT_INTERVAL",
    "HEARTBEAT_LIVENESS",
    "W_READY",
    "W_HEARTBEAT",
    "W_DONE",
    "W_DISCONNECT",
    "B_ASSIGN",
    "B_HEARTBEAT",
    "B_DISCONNECT",
    "I_OPEN",
    "I_HEARTBEAT",
    "I_DONE",
    "I_STATUS",
    "WireError",
    "message",
    "parse",
    "encode_info",
    "decode_info",
]

HEADER = b"FARMW01"

HEARTBEAT_INTERVAL = 0.25  # seconds
HEARTBEAT_LIVENESS = 4  # missed intervals before a peer is dead (about 1 s)

W_READY = b"\x01"
W_HEARTBEAT = b"\x02"
W_DONE = b"\x03"
W_DISCONNECT = b"\x04"

B_ASSIGN = b"\x11"
B_HEARTBEAT = b"\x12"
B_DISCONNECT = b"\x13"

I_OPEN = b"\x21"
I_HEARTBEAT = b"\x22"
I_DONE = b"\x23"
I_STATUS = b"\x24"

_NAMES = {
    W_READY: "W_READY",
    W_HEARTBEAT: "W_HEARTBEAT",
    W_DONE: "W_DONE",
    W_DISCONNECT: "W_DISCONNECT",
    B_ASSIGN: "B_ASSIGN",
    B_HEARTBEAT: "B_HEARTBEAT",
    B_DISCONNECT: "B_DISCONNECT",
    I_OPEN: "I_OPEN",
    I_HEARTBEAT: "I_HEARTBEAT",
    I_DONE: "I_DONE",
    I_STATUS: "I_STATUS",
}

# Number of body frames each command carries.
_ARITY = {
    W_READY: 2,
    W_HEARTBEAT: 1,
    W_DONE: 1,
    W_DISCONNECT: 0,
    B_ASSIGN: 3,
    B_HEARTBEAT: 0,
    B_DISCONNECT: 0,
    I_OPEN: 3,
    I_HEARTBEAT: 0,
    I_DONE: 1,
    I_STATUS: 1,
}


class WireError(ValueError):
    """A control message does not follow FARMW01."""


def message(command: bytes, *body: str | bytes) -> list[bytes]:
    """Frames a DEALER sends: ``[b"", HEADER, command, *body]``."""
    arity = _ARITY.get(command)
    if arity is None:
        raise WireError(f"unknown command {command!r}")
    if len(body) != arity:
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
    if len(body) != arity:
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
