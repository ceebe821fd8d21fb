"""The per-stage latency vocabulary as arithmetic over one event's stage stamps.

ARCHITECTURE.md, "Per-stage latency vocabulary", names the stages; every event carries
``time.monotonic_ns()`` stamps of the stages it passed (:mod:`farm.protocol.events`).
This module says which difference of stamps measures which stage, once, for whoever
receives events: the ingress turns them into its Prometheus histograms
(:mod:`farm.ingress.metrics`). The definitions are bench/measure.py's, so the node's
histograms and ``farm bench`` report the same figures:

* ``ingress``: ``commit - recv`` (socket read -> frame in the ring), on every event
  that carries both, finals aside (a final's ``recv`` is the end of speech);
* ``dispatch``: ``read - commit`` of speech_start. Its ``commit`` is the first voiced
  frame's and its ``read`` the read of the frame that confirmed the onset, so it holds
  the VAD's onset window on top of the dispatch delay;
* ``vad``: ``vad - read`` of speech_start (the decision itself);
* ``asr``: ``asr - commit`` of partials and finals (the audio's commit -> recognizer
  output: there is no separate "fed" stamp, so it includes the queue to Vosk);
* ``publish``: ``publish`` -> received by the subscriber that measures;
* ``end_of_speech_to_final``: a final ending an utterance (reason ``vad`` or ``end``):
  ``recv`` of the last frame the VAD called speech -> final received;
* ``barge_in``: ``flush - recv`` of barge_in (the utterance's first voiced frame read
  off the socket -> flush command written to FreeSWITCH).

Sans-I/O: no clock is read here; the caller passes when it received the event.
"""

from __future__ import annotations

from farm.protocol.events import Event


__all__ = ["LATENCY_STAGES", "stage_latencies"]

# Stage names in pipeline order (the ``stage`` label of farm_stage_latency_seconds).
LATENCY_STAGES = ("ingress", "dispatch", "vad", "asr", "publish", "end_of_speech_to_final", "barge_in")

# Finals whose recv stamp is the end of speech (workers/call.py sets it for these).
_ENDING_REASONS = frozenset({"vad", "end"})


def stage_latencies(event: Event, received_ns: int) -> list[tuple[str, int]]:
    """The stages ``event`` measures, as ``(stage, nanoseconds)`` pairs, in pipeline order.

    Call on receiving an event from the event stream, with the ``time.monotonic_ns()``
    of its arrival. A stage whose stamps are missing is left out; so is a negative
    difference (stamps from a clock this host does not share: a replayed capture).
    """
    t = event.stamps
    kind = event.type
    out: list[tuple[str, int]] = []

    def add(stage: str, start: str, end: int | None) -> None:
        if start in t and end is not None and end >= t[start]:
            out.append((stage, end - t[start]))

    if kind != "final":
        add("ingress", "recv", t.get("commit"))
    if kind == "speech_start":
        add("dispatch", "commit", t.get("read"))
        add("vad", "read", t.get("vad"))
    if kind in ("partial", "final"):
        add("asr", "commit", t.get("asr"))
    add("publish", "publish", received_ns)
    if kind == "final" and event.get("reason") in _ENDING_REASONS:
        add("end_of_speech_to_final", "recv", received_ns)
    if kind == "barge_in":
        add("barge_in", "recv", t.get("flush"))
    return out
