"""The canary: readiness that proves recognition, not only liveness.

Every ``--canary-interval-s`` the ingress plays a short committed utterance through the
node like a call: a ring, the broker's assignment, a worker's VAD and recognizer, the
events back. It is paced in real time and followed by a second of silence, so its
utterance ends the way a caller's does (the VAD's end of speech), and the probe passes
when the finals say what the utterance says and the closing one came within
``--canary-max-ms`` of the end of speech (the ``end_of_speech_to_final`` stage). While
the last probe failed, and until the first has passed, ``/readyz`` answers 503 with the
reason, and the agent check says so to the balancer.

Its traffic is marked: the call id begins :data:`~farm.protocol.events.CANARY_PREFIX`,
which no peer may use; the broker's relay sends its events to the ingress alone, and the
call table leaves it out of every call metric, of admission and of the command port. What
the node counts of it is its own: ``farm_canary_*``.

On an idle node the probe would be most of what the node spends (an utterance decoded every
30 s: 0.023 of a core on the graph composed on the fly, the rest of an idle node 0.011;
bench/RESULTS.md). What
can change recognition on a node that serves no call is a process replaced, and that the
node sees: while no call came and the broker and the workers are the ones the last passing
probe went through, the canary probes every ``--canary-idle-interval-s`` only.

The shipped utterance (farm/data/canary_ko_16k.wav: "네 맞습니다 잠시만 기다려 주세요" in
espeak-ng's Korean, made by tests/make_fixtures.sh as ko_02) is checked against what the
default model hears in it through the node, not against the sentence: the small model
half understands espeak's voice, and the canary's question is whether recognition still
works as it did, not how good the model is. With another model, give the canary an
utterance and its words (``--canary-wav``, ``--canary-text``); without them it is off,
and says so once.
"""

from __future__ import annotations

import asyncio
import difflib
import itertools
import logging
import time
from pathlib import Path

from farm.config import Config, default_model_dir
from farm.ingress.calls import CallRegistry
from farm.ingress.metrics import Metrics
from farm.protocol.events import CANARY_PREFIX, Event
from farm.protocol.latency import stage_latencies
from farm.transcribe import parse_audio


__all__ = ["Canary", "canary_utterance", "start_canary", "SHIPPED_WAV", "SHIPPED_TEXT", "same_words"]

log = logging.getLogger("farm.ingress.canary")

SHIPPED_WAV = Path(__file__).resolve().parent.parent / "data" / "canary_ko_16k.wav"
SHIPPED_TEXT = "내 맛 그 는 이 잠시 만 기다려 주세요"  # the default model, through the node
FRAME_MS = 20
TAIL_S = 1.0  # silence after the utterance: its end is the VAD's, as a caller's is
# Beyond the audio's own length and the latency bound, how long a probe may take before
# it is called lost (a worker that never answers).
SLACK_S = 10.0
# Kaldi's dither and the recognizer's state let a word vary between runs: the probe asks for
# this much of the expected characters (spaces aside), not all of them.
MIN_SIMILARITY = 0.8


def same_words(heard: str, expected: str) -> float:
    """How alike two transcripts are, 0 to 1, spacing and case aside (Korean spacing varies)."""
    a, b = ("".join(t.lower().split()) for t in (heard, expected))
    return difflib.SequenceMatcher(None, a, b).ratio()


class Canary:
    def __init__(self, config: Config, registry: CallRegistry, metrics: Metrics, pcm: bytes, rate: int, text: str):
        self.config = config
        self.registry = registry
        self.metrics = metrics
        self.rate = rate
        self.pcm = pcm + bytes(int(TAIL_S * rate) * 2)
        self.text = text
        self.numbers = itertools.count(1)
        registry.canary_failing = "canary: first probe pending"
        self.passed_on: tuple[object, ...] | None = None  # the node as the last passing probe found it
        self.passed_at = 0.0

    async def run(self) -> None:
        while True:
            if not self._can_probe():
                await asyncio.sleep(0.1)
                continue
            if self._proven_and_idle():
                await asyncio.sleep(self.config.canary_interval_s)
                continue
            node = self._node()
            try:
                verdict = await self.probe()
            except Exception as exc:  # a probe that cannot run (no room for its ring) fails; the canary goes on
                verdict = f"canary: the probe could not run ({type(exc).__name__}: {exc})"
            if verdict != self.registry.canary_failing:
                log_at = logging.WARNING if verdict else logging.INFO
                log.log(log_at, "%s", verdict or "canary passes: recognition proven")
            self.registry.canary_failing = verdict
            self.passed_on, self.passed_at = (None, 0.0) if verdict else (node, time.monotonic())
            await asyncio.sleep(self.config.canary_interval_s)

    def _node(self) -> tuple[object, ...] | None:
        """What recognition goes through now: the calls so far, the broker, the workers
        (None while a call is live: the node is not idle)."""
        if self.registry.active:
            return None
        status = self.registry.link.status
        return (self.metrics.calls_total, status.broker_pid, tuple(r.pid for r in status.reports))

    def _proven_and_idle(self) -> bool:
        """The last probe passed, nothing changed since and it is younger than the idle interval."""
        idle_s = self.config.canary_idle_interval_s
        return (
            self.passed_on is not None
            and self._node() == self.passed_on
            and time.monotonic() - self.passed_at < idle_s
        )

    def _can_probe(self) -> bool:
        """Only a node that is otherwise able to transcribe is worth probing."""
        return not self.registry.pipeline_ready and self.registry.relay.canary_subscribed

    async def probe(self) -> str:
        """One utterance through a worker: ``""`` if it passed, else why not (for /readyz)."""
        call_id = f"{CANARY_PREFIX}{next(self.numbers)}"
        events: asyncio.Queue[tuple[Event, int]] = asyncio.Queue()
        call = await self.registry.open(
            call_id,
            rate=self.rate,
            channels=1,
            protocol="canary",
            info={"protocol": "canary", "canary": True, "metadata": {}},
            on_event=lambda e: events.put_nowait((e, time.monotonic_ns())),
            canary=True,
        )
        size = self.rate * FRAME_MS // 1000 * 2
        try:
            t0 = time.monotonic()
            for i, start in enumerate(range(0, len(self.pcm), size)):
                await asyncio.sleep(max(0.0, t0 + i * FRAME_MS / 1000 - time.monotonic()))
                call.write(self.pcm[start : start + size], time.monotonic_ns())
        finally:
            self.registry.close(call, "hangup", "end of the canary's utterance")
        texts: list[str] = []
        latency_ms = -1
        deadline = time.monotonic() + self.config.canary_max_ms / 1000 + SLACK_S
        while True:
            try:
                event, received = await asyncio.wait_for(events.get(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                return self._result("lost", f"canary: no call_end {SLACK_S:.0f} s after its audio")
            if event.type == "final":
                texts.append(str(event.get("text") or ""))
                for stage, ns in stage_latencies(event, received):
                    if stage == "end_of_speech_to_final":
                        latency_ms = ns // 1_000_000
            elif event.type == "call_end":
                break
        heard = " ".join(t for t in texts if t)
        if same_words(heard, self.text) < MIN_SIMILARITY:
            return self._result("wrong", f"canary: heard {heard!r}, expected {self.text!r}")
        if latency_ms < 0 or latency_ms > self.config.canary_max_ms:
            said = f"{latency_ms} ms" if latency_ms >= 0 else "no final at its end of speech"
            return self._result("late", f"canary: {said} (bound {self.config.canary_max_ms} ms)")
        self.metrics.canary_latency_s = latency_ms / 1000
        return self._result("ok", "")

    def _result(self, result: str, verdict: str) -> str:
        self.metrics.canary_probes[result] += 1
        return verdict


def canary_utterance(config: Config) -> tuple[bytes, int, str] | None:
    """The canary's ``(pcm, rate, text)``, or None when it is off (``--canary-interval-s 0``,
    or an utterance or a model of the user's own with no words given for it). Raises
    ValueError or OSError for an utterance farm cannot play (``farm up`` refuses to start)."""
    if not config.canary_interval_s:
        return None
    text = config.canary_text
    if not text:
        if config.canary_wav or config.model not in ("", default_model_dir()):
            return None
        text = SHIPPED_TEXT
    path = Path(config.canary_wav) if config.canary_wav else SHIPPED_WAV
    try:
        pcm, rate, channels = parse_audio(path.read_bytes())
    except ValueError as exc:
        raise ValueError(f"--canary-wav {path}: {exc}") from None
    if channels != 1:
        raise ValueError(f"--canary-wav {path}: {channels} channels, the canary plays a caller: mono")
    return pcm, rate, text


def start_canary(config: Config, registry: CallRegistry, metrics: Metrics) -> asyncio.Task[None] | None:
    """The canary's task (None when it is off)."""
    utterance = canary_utterance(config)
    if utterance is None:
        if config.canary_interval_s:
            log.warning("canary off: for this model or utterance, say what it says (--canary-text)")
        return None
    canary = Canary(config, registry, metrics, *utterance)
    log.info("canary every %g s: %r", config.canary_interval_s, utterance[2])
    return asyncio.create_task(canary.run(), name="canary")
