"""From what a call sent and received to latency samples, per stage, and a real-time verdict.

Two kinds of figures (ARCHITECTURE.md, "Per-stage latency vocabulary"):

* Ground truth, from the bench's own script and clock (every protocol): the bench
  knows when the message carrying an utterance's first or last speech sample left,
  and when the answer arrived.

  - ``onset_speech_start``: first speech sample sent -> speech_start received;
  - ``eos_final``: last speech sample sent -> the first final received after it;
  - ``first_partial``: first speech sample sent -> first non-empty partial received;
  - ``barge_in``: first speech sample sent -> barge_in received (calls that play audio);
  - ``barge_in_flush`` (socket_audio): the peer's first speech byte of an utterance spoken
    over a prompt -> ``api uuid_socket_audio_flush`` fully received by the peer: the cut as
    FreeSWITCH sees it.

* The farm's stage stamps (farm protocols only), ``t`` of every event:

  - ``ingress``: ``commit - recv`` (socket read -> frame in the ring);
  - ``dispatch``: ``read - commit`` of speech_start. Its ``commit`` is the first voiced
    frame's but its ``read`` is the read of the frame that confirmed the onset, so this
    includes the VAD's onset window (60 ms by default) on top of the dispatch delay;
    speech_end is left out (its read comes after the whole hangover);
  - ``vad``: ``vad - read`` of speech_start (the decision itself);
  - ``asr``: ``asr - commit`` of partials and finals (the audio's commit -> recognizer
    output: the farm has no separate "fed" stamp, so this includes the queue to Vosk);
  - ``publish``: event published -> received by the bench (ZeroMQ);
  - ``barge_in_farm``: ``flush - recv`` of barge_in (the utterance's first voiced frame
    read off the socket -> flush command written: ARCHITECTURE.md's barge-in latency);
  - ``eos_final_farm``: ``recv`` of the last frame the farm's VAD called speech ->
    final received (the farm's own view of end of speech -> final).
  - ``eos_intent_farm``: ``publish - recv`` of an ``intent`` event a final made (it carries
    the final's stamps; only finals of the farm's VAD or of the call's end, whose ``recv``
    is the end of speech): end of speech -> intent out of the farm.
  - ``early_intent_lead``: an ``early`` intent (on a stable partial) received -> the
    next final received: how much sooner than the final a dialer knew.

* ``reply_lag`` (vosk only): a message sent -> vosk-server's reply to it.

A call keeps real time when the server's lag behind the audio stays under a bound:
the p95 of ``asr - recv`` of the farm's partials (how far recognition trails the
audio) or of vosk-server's reply lags, and the time from the last audio message to
call_end (farm) or to the reply to eof (vosk-server): the backlog left at the end.
No message may be lost (frames received = frames sent).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

from bench.senders import CallRecord, Observation
from bench.stats import cer, percentile


__all__ = ["STAGES", "GROUND_TRUTH", "call_samples", "finals_per_utterance", "utterance_cer", "CallVerdict", "verdict"]

# Stage key -> label, in the order of the report.
STAGES: dict[str, str] = {
    "ingress": "ingress (socket read -> ring)",
    "dispatch": "dispatch + onset window (ring -> read)",
    "vad": "vad (read -> speech_start decision)",
    "asr": "asr (ring -> recognizer output)",
    "publish": "publish (event -> subscriber)",
    "eos_final_farm": "end of speech -> final (farm VAD)",
    "eos_final": "end of speech -> final",
    "onset_speech_start": "onset -> speech_start",
    "first_partial": "onset -> first partial",
    "barge_in": "onset -> barge-in",
    "barge_in_flush": "barge-in: onset -> flush at FreeSWITCH",
    "barge_in_farm": "barge-in (farm: voiced frame -> flush)",
    "eos_intent_farm": "end of speech -> intent published (farm)",
    "early_intent_lead": "early intent: ms before its final",
    "reply_lag": "message -> reply (vosk)",
}
GROUND_TRUTH = ("eos_final", "onset_speech_start", "first_partial", "barge_in", "barge_in_flush")

_ONSET_SLACK_MS = 200  # a speech_start this far before the script's onset still belongs to it


def _ms(ns: int) -> float:
    return round(ns / 1e6, 4)


def call_samples(record: CallRecord) -> dict[str, list[float]]:
    """Latency samples (ms) of one call, by stage key (only stages that have samples)."""
    out: dict[str, list[float]] = {k: [] for k in STAGES}
    obs = sorted(record.observations, key=lambda o: o.got_ns)
    for o in obs:
        t = o.stamps
        if "recv" in t and "commit" in t and o.kind != "final":  # finals' recv is end of speech
            out["ingress"].append(_ms(t["commit"] - t["recv"]))
        if o.kind == "speech_start" and "read" in t and "commit" in t:
            out["dispatch"].append(_ms(t["read"] - t["commit"]))
        if o.kind == "speech_start" and "vad" in t and "read" in t:
            out["vad"].append(_ms(t["vad"] - t["read"]))
        if o.kind in ("partial", "final") and "asr" in t and "commit" in t:
            out["asr"].append(_ms(t["asr"] - t["commit"]))
        if "publish" in t:
            out["publish"].append(_ms(o.got_ns - t["publish"]))
        if o.kind == "final" and o.reason in ("vad", "end") and "recv" in t:
            out["eos_final_farm"].append(_ms(o.got_ns - t["recv"]))
        if o.kind == "barge_in" and "flush" in t and "recv" in t:
            out["barge_in_farm"].append(_ms(t["flush"] - t["recv"]))
    out["reply_lag"] = list(record.reply_lag_ms)
    out["eos_intent_farm"], out["early_intent_lead"] = _intent_samples(record, obs)

    # Ground truth: pair each measured utterance with what answered it.
    out["barge_in_flush"] = _flush_samples(record)
    finals = [o for o in obs if o.kind == "final"]
    used: set[int] = set()
    for u in record.script.measured():
        start_ns = record.sent_at(u.start_ms)
        end_ns = record.sent_at(u.end_ms - 1)
        for i, o in enumerate(finals):
            if i not in used and o.got_ns >= end_ns:
                used.add(i)
                out["eos_final"].append(_ms(o.got_ns - end_ns))
                break
        for kind, key in (("speech_start", "onset_speech_start"), ("barge_in", "barge_in")):
            for o in obs:
                if (
                    o.kind == kind
                    and o.offset_ms is not None
                    and u.start_ms - _ONSET_SLACK_MS <= o.offset_ms < u.end_ms
                ):
                    out[key].append(_ms(o.got_ns - start_ns))
                    break
        # vosk-server repeats the last partial on every chunk until its endpointer fires, so
        # a partial still carrying the previous utterance's text is not this one's.
        stale = ""
        for o in obs:
            if o.kind != "partial" or not o.text:
                continue
            if o.got_ns < start_ns:
                stale = o.text
            elif o.text != stale and (o.offset_ms is None or o.offset_ms < u.end_ms):
                if o.got_ns <= end_ns + 2_000_000_000:
                    out["first_partial"].append(_ms(o.got_ns - start_ns))
                break
    return {k: v for k, v in out.items() if v}


def _intent_samples(record: CallRecord, obs: list[Observation]) -> tuple[list[float], list[float]]:
    """(end of speech -> intent published, early intent -> its final) of one call's intents."""
    finals = [o for o in obs if o.kind == "final"]
    eos_finals = {o.stamps["asr"] for o in finals if o.reason in ("vad", "end") and "asr" in o.stamps}
    eos, lead = [], []
    for o in record.dialer:
        t = o.stamps
        if o.kind != "intent":
            continue
        if o.data.get("early"):
            final = next((f for f in finals if f.got_ns >= o.got_ns), None)
            if final is not None:
                lead.append(_ms(final.got_ns - o.got_ns))
        elif t.get("asr") in eos_finals and "publish" in t and "recv" in t:
            eos.append(_ms(t["publish"] - t["recv"]))
    return eos, lead


def finals_per_utterance(record: CallRecord) -> list[tuple[str, int]]:
    """How many finals each measured utterance (a scripted sentence) got: 1 is right, more
    means the farm split it at a pause inside it. A final belongs to the sentence its words
    start in; Vosk's own mid-utterance endpoints do not count (they are not splits)."""
    finals = [o for o in record.observations if o.kind == "final" and o.reason != "endpoint" and o.text]
    return [
        (
            u.source,
            sum(
                1 for o in finals if o.offset_ms is not None and u.start_ms - _ONSET_SLACK_MS <= o.offset_ms < u.end_ms
            ),
        )
        for u in record.script.measured()
    ]


@functools.cache
def _spoken() -> dict[str, str]:
    """What each Korean fixture sentence says (its normal spelling), by source name."""
    from bench.audio import DATA

    texts = json.loads((DATA / "texts.json").read_text())
    pauses = json.loads((DATA / "pauses.json").read_text())
    out = {
        name[: -len(".wav")]: str(v["orthographic"]) for name, v in texts.items() if isinstance(v["orthographic"], str)
    }
    out |= {name[: -len(".wav")]: " ".join(v["orthographic"]) for name, v in pauses.items()}
    return out


def utterance_cer(record: CallRecord) -> list[float]:
    """Character error rate of each measured utterance whose words are known (the Korean
    fixtures; the recorded clips are English, which the Korean model cannot say): the
    finals that belong to it, joined, against the sentence's normal spelling."""
    finals = [o for o in record.observations if o.kind == "final" and o.text]
    spoken = _spoken()
    out = []
    for u in record.script.measured():
        if u.source not in spoken:
            continue
        said = " ".join(
            o.text for o in finals if o.offset_ms is not None and u.start_ms - _ONSET_SLACK_MS <= o.offset_ms < u.end_ms
        )
        out.append(cer(said, spoken[u.source]))
    return out


def _flush_samples(record: CallRecord) -> list[float]:
    """Each prompted utterance's first speech byte sent -> the first flush command after it
    (before the next utterance: a flush later than that is not this utterance's)."""
    starts = sorted(u.start_ms for u in record.script.utterances)
    out = []
    for start_ms in record.prompted_ms:
        start_ns = record.sent_at(start_ms)
        later = [s for s in starts if s > start_ms]
        until = record.sent_at(later[0]) if later else 1 << 62
        flush = next((f for f in record.flush_ns if start_ns <= f < until), None)
        if flush is not None:
            out.append(_ms(flush - start_ns))
    return out


@dataclass(frozen=True)
class CallVerdict:
    call_id: str
    lag_ms: float  # how far the server trailed the audio, at worst
    lost_messages: int  # audio messages sent and not seen by the server
    overrun_bytes: int
    missed_finals: int  # measured utterances with no final after them
    errors: tuple[str, ...]
    bench_late_ms: float  # this bench's own worst pacing lateness
    real_time: bool
    refused: str = ""  # the server refused the call, with this reason (not an error: admission)


def verdict(record: CallRecord, samples: dict[str, list[float]], lag_limit_ms: float) -> CallVerdict:
    """Did the server keep up with this call? (see the module docstring)"""
    if record.refused:
        return CallVerdict(record.call_id, 0.0, 0, 0, 0, (), round(record.late_ms_max, 1), False, record.refused)
    series = [
        (o.stamps["asr"] - o.stamps["recv"]) / 1e6
        for o in record.observations
        if o.kind == "partial" and "asr" in o.stamps and "recv" in o.stamps
    ] + record.reply_lag_ms
    # p95, not the maximum: Vosk computes in 240 ms batches and stalls up to ~0.9 s now
    # and then (MEASUREMENTS.md) without falling behind; a backlog shows in most samples.
    lag = percentile(series, 95) if series else 0.0
    if record.done_ns and record.end_ns:
        lag = max(lag, (record.done_ns - record.end_ns) / 1e6)  # the backlog left at the call's end
    elif record.end_ns:
        lag = float("inf")  # never finished
    received = record.messages_received if record.messages_received is not None else 0
    lost = max(0, record.messages_sent - received)
    missed = len(record.script.measured()) - len(samples.get("eos_final", []))
    ok = lag <= lag_limit_ms and not lost and not record.overrun_bytes and not record.errors
    return CallVerdict(
        record.call_id,
        round(lag, 1),
        lost,
        record.overrun_bytes,
        missed,
        tuple(record.errors),
        round(record.late_ms_max, 1),
        ok,
    )
