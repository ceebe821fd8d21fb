"""Dialer-like call scripts built from the committed fixtures, with known speech spans.

A call is what a dialer's callee does: a prompt plays (the caller is silent, only line
noise reaches the farm), the caller says a sentence, another prompt, another sentence…
The sentences are ``tests/data/ko_01..ko_10`` (16 kHz, or their ``_8k`` variants,
else resampled with soxr as the workers would). Because the bench builds the audio
itself it knows, to the millisecond, where each utterance starts and ends: that is the
ground truth for onset -> speech_start and end of speech -> final, independent of the
farm's VAD.

Speech spans inside each sentence file come from its energy envelope: espeak-ng's
speech is tens of dB above the fixtures' white-noise floor (tests/data/README.md), so
a fixed threshold finds the first and last spoken 10 ms exactly; no VAD is needed.
The recorded clips (tests/data/recorded) have a room-noise floor of their own: their
spans come from recorded.json, measured with a threshold per clip.

Corpora (``--corpus``): ``espeak`` the ten single sentences; ``pauses`` ten replies with
150-300 ms pauses inside (tests/data/pauses.json: one utterance each, or the farm split
it); ``recorded`` seven clips of recorded human (English) speech; ``mixed`` all of them,
the default: the more varied the speech, the less a recognizer's graph cache flatters
the run (bench/results/profile-12calls.md).
"""

from __future__ import annotations

import functools
import json
import os
import random
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


__all__ = [
    "DATA",
    "read_mono",
    "Utterance",
    "CallScript",
    "sentence",
    "speech_span",
    "build_script",
    "SENTENCES",
    "CORPORA",
    "prompt_pcm",
    "resample_script",
]

# The repository's fixtures; FARM_BENCH_DATA points an installed bench at a copy of them.
DATA = Path(os.environ.get("FARM_BENCH_DATA") or Path(__file__).resolve().parent.parent / "tests" / "data")
SENTENCES = tuple(f"ko_{i:02d}" for i in range(1, 11))
PAUSE_SENTENCES = tuple(f"pause_{i:02d}" for i in range(1, 11))
RECORDED = tuple(
    f"recorded/{name}"
    for name in (
        "librivox_0870",
        "librivox_0890",
        "arctic_awb_a0007",
        "arctic_a0009",
        "cmu_goforward",
        "cmu_numbers",
        "cmu_cards_005",
    )
)
CORPORA = {
    "espeak": SENTENCES,
    "pauses": PAUSE_SENTENCES,
    "recorded": RECORDED,
    "mixed": SENTENCES + PAUSE_SENTENCES + RECORDED,
}

# Line noise in the pauses: the level of the dialog fixtures (sox ``whitenoise vol 0.002``).
_NOISE_PEAK = int(0.002 * 32767)
# Shorter pauses than this would let the farm's VAD hangover (300 ms) merge two sentences.
_MIN_PAUSE_MS = 600
_SPEECH_RMS = 500.0  # ~ -36 dBFS: far above the 0.0005 noise floor, far below espeak's speech


@dataclass(frozen=True)
class Utterance:
    """One sentence in a call: ``[start_ms, end_ms)`` of the call's audio.

    ``complete`` is False when the call's start offset or end cut it: such utterances
    are sent but not measured (their onset or end is not in the call).
    """

    start_ms: int
    end_ms: int
    source: str
    complete: bool = True


@dataclass(frozen=True)
class CallScript:
    """The audio of one call (int16 LE mono at ``rate``) and where its speech is."""

    call_id: str
    rate: int
    pcm: bytes
    utterances: tuple[Utterance, ...]

    @property
    def duration_ms(self) -> int:
        return len(self.pcm) * 1000 // (2 * self.rate)

    @property
    def speech_ms(self) -> int:
        return sum(u.end_ms - u.start_ms for u in self.utterances)

    def measured(self) -> list[Utterance]:
        return [u for u in self.utterances if u.complete]


def read_mono(path: Path) -> tuple[np.ndarray, int]:
    with wave.open(str(path), "rb") as w:
        if w.getsampwidth() != 2 or w.getnchannels() != 1:
            raise ValueError(f"{path}: expected 16-bit mono PCM")
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2"), w.getframerate()


def speech_span(samples: np.ndarray, rate: int) -> tuple[int, int]:
    """``(first, last + 1)`` sample of speech: the 10 ms blocks whose RMS clears the threshold."""
    block = rate // 100
    n = len(samples) // block
    rms = np.sqrt(np.mean(samples[: n * block].astype(np.float64).reshape(n, block) ** 2, axis=1))
    loud = np.flatnonzero(rms > _SPEECH_RMS)
    if not len(loud):
        raise ValueError("no speech found")
    return int(loud[0]) * block, (int(loud[-1]) + 1) * block


@functools.cache
def sentence(name: str, rate: int) -> np.ndarray:
    """The spoken part of fixture ``name`` at ``rate`` (int16), leading/trailing silence cut."""
    if name.startswith("recorded/"):
        native = DATA / f"{name}_{rate // 1000}k.wav"
        if not native.exists():
            native = DATA / f"{name}_16k.wav"
    else:
        native = DATA / f"{name}_8k.wav" if rate == 8000 else DATA / f"{name}.wav"
        if not native.exists():
            native = DATA / f"{name}.wav"
    samples, src = read_mono(native)
    if src != rate:
        import soxr

        samples = soxr.resample(samples, src, rate).astype("<i2")
    if name.startswith("recorded/"):
        spans = _recorded()[native.name]["speech"]
        a, b = spans[0][0] * rate // 1000, spans[-1][1] * rate // 1000
    else:
        a, b = speech_span(samples, rate)
    return samples[a:b]


@functools.cache
def _recorded() -> dict[str, dict[str, Any]]:
    data: dict[str, dict[str, Any]] = json.loads((DATA / "recorded" / "recorded.json").read_text())
    return data


def build_script(
    call_id: str,
    *,
    rate: int,
    duration_s: float,
    speech_fraction: float,
    rng: random.Random,
    sentences: tuple[str, ...] = CORPORA["mixed"],
) -> CallScript:
    """A call of ``duration_s`` seconds: prompt pauses and sentences, from a random offset.

    Each pause lasts ``len(sentence) * (1 - f) / f`` (±30 %, at least 600 ms) so that
    ``f`` of the call is speech on average. The script is built from a random point
    of its own cycle, so concurrent calls are not in lockstep.
    """
    if not 0 <= speech_fraction <= 1:
        raise ValueError(f"speech fraction {speech_fraction} is not in [0, 1]")
    total = int(duration_s * rate)
    ms = rate // 1000
    if not speech_fraction:  # a silent caller: line noise only (ringing, prompts, hold)
        noise = np.random.default_rng(rng.getrandbits(32)).integers(-_NOISE_PEAK, _NOISE_PEAK + 1, total)
        return CallScript(call_id, rate, noise.astype("<i2").tobytes(), ())
    offset = int(rng.uniform(0, 8.0) * rate)  # up to one pause + one sentence skipped
    pieces: list[np.ndarray] = []
    spans: list[tuple[int, int, str]] = []
    at = 0
    while at < offset + total:
        name = rng.choice(sentences)
        speech = sentence(name, rate)
        pause_ms = max(
            _MIN_PAUSE_MS, len(speech) / ms * (1 - speech_fraction) / speech_fraction * rng.uniform(0.7, 1.3)
        )
        pause = int(pause_ms) * ms
        pieces.append(np.zeros(pause, dtype="<i2"))
        spans.append((at + pause, at + pause + len(speech), name))
        pieces.append(speech)
        at += pause + len(speech)
    audio = np.concatenate(pieces)[offset : offset + total].astype(np.int32)
    audio += np.random.default_rng(rng.getrandbits(32)).integers(-_NOISE_PEAK, _NOISE_PEAK + 1, len(audio))
    audio = np.clip(audio, -32768, 32767).astype("<i2")
    utterances = []
    for a, b, name in spans:
        a, b = a - offset, b - offset
        if b <= 0 or a >= total:
            continue
        complete = a >= 0 and b <= total
        # whole milliseconds that cover the speech: floor the start, ceil the end
        utterances.append(Utterance(max(a, 0) // ms, -(-min(b, total) // ms), name, complete))
    return CallScript(call_id, rate, audio.tobytes(), tuple(utterances))


PROMPT_RATE = 24000  # what mod_socket_audio plays: the farm sends it on unconverted


def prompt_pcm(ms: int, rate: int = PROMPT_RATE) -> bytes:
    """A synthetic, speech-like prompt of ``ms`` ms: a 140 Hz voice with harmonics, syllable
    envelope at ~4 Hz. Never silent (envelope floor), so any of it played after a flush shows."""
    t = np.arange(rate * ms // 1000) / rate
    voice = sum(np.sin(2 * np.pi * 140 * k * t) / k for k in range(1, 6))
    envelope = 0.35 + 0.65 * np.abs(np.sin(np.pi * 4 * t))
    return (4000 * envelope * voice).astype("<i2").tobytes()


def resample_script(script: CallScript, rate: int) -> CallScript:
    """The same call at another rate (soxr, as the workers resample); speech spans are in ms, unchanged."""
    if script.rate == rate:
        return script
    import dataclasses

    import soxr

    samples = np.frombuffer(script.pcm, dtype="<i2")
    out = soxr.resample(samples, script.rate, rate).astype("<i2")
    return dataclasses.replace(script, rate=rate, pcm=out.tobytes())
