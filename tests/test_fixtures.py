"""The pause fixtures and the recorded clips are what their JSON files say they are.

Fast and self-contained: reads tests/data, recomputes every span from the energy
envelope (10 ms blocks, RMS threshold) and compares it with pauses.json / recorded.json.
"""

from __future__ import annotations

import json
import wave
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from bench.audio import speech_span


DATA = Path(__file__).parent / "data"
RECORDED = DATA / "recorded"
PAUSES = json.loads((DATA / "pauses.json").read_text(encoding="utf-8"))
CLIPS = json.loads((RECORDED / "recorded.json").read_text(encoding="utf-8"))
PAUSE_RMS = 500.0  # bench/audio.py's speech threshold, used for the synthetic fixtures
PAUSE_TOLERANCE_MS = 20


def read(path: Path) -> tuple[np.ndarray, int]:
    with wave.open(str(path), "rb") as w:
        assert w.getnchannels() == 1 and w.getsampwidth() == 2, path
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2"), w.getframerate()


def envelope(x: np.ndarray, rate: int) -> np.ndarray:
    """RMS of each whole 10 ms block (a trailing partial block is dropped)."""
    block = rate // 100
    n = len(x) // block
    return np.sqrt(np.mean(x[: n * block].astype(np.float64).reshape(n, block) ** 2, axis=1))


def runs(loud: np.ndarray) -> list[list[int]]:
    """Consecutive block indices -> [first, last + 1] runs."""
    out: list[list[int]] = []
    for i in loud.tolist():
        if out and i == out[-1][1]:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return out


@pytest.mark.parametrize("name", sorted(PAUSES))
def test_pause_file(name: str) -> None:
    meta = PAUSES[name]
    x, rate = read(DATA / name)
    assert rate == meta["rate"] == (8000 if name.endswith("_8k.wav") else 16000)
    assert round(len(x) / rate, 3) == meta["duration_s"]
    n = len(meta["text"])
    assert len(meta["orthographic"]) == n and len(meta["phrases"]) == n and len(meta["pauses_ms"]) == n - 1

    # The phrases are the loud runs separated by the n - 1 longest silences.
    silences = runs(np.flatnonzero(envelope(x, rate) <= PAUSE_RMS))
    loud = runs(np.flatnonzero(envelope(x, rate) > PAUSE_RMS))
    inner = [s for s in silences if loud[0][0] < s[0] and s[1] <= loud[-1][1]]
    widest = sorted(sorted(inner, key=lambda s: s[1] - s[0], reverse=True)[: n - 1])
    edges = [loud[0][0]] + [e for s in widest for e in s] + [loud[-1][1]]
    phrases = [[edges[2 * k] * 10, edges[2 * k + 1] * 10] for k in range(n)]
    assert phrases == meta["phrases"]

    # The first and last spoken blocks are where bench/audio.py finds them.
    start, end = speech_span(x, rate)
    assert (start * 1000 // rate, end * 1000 // rate) == (phrases[0][0], phrases[-1][1])

    # Each pause is there, with its stated length; any silence inside a phrase is shorter.
    measured = [b[0] - a[1] for a, b in zip(phrases, phrases[1:])]
    for got, want in zip(measured, meta["pauses_ms"]):
        assert abs(got - want) <= PAUSE_TOLERANCE_MS, (measured, meta["pauses_ms"])
    others = [(s[1] - s[0]) * 10 for s in inner if s not in widest]
    assert max(others, default=0) < min(meta["pauses_ms"]) - PAUSE_TOLERANCE_MS, others

    # The noise floor runs through the pauses: no stretch of digital silence.
    zero_runs = runs(np.flatnonzero(x == 0))
    assert max((b - a for a, b in zero_runs), default=0) < rate // 1000, "digital silence in the file"


def test_pause_lengths_are_covered() -> None:
    pauses = Counter(p for name, meta in PAUSES.items() if not name.endswith("_8k.wav") for p in meta["pauses_ms"])
    assert set(pauses) == {150, 200, 250, 300}
    assert min(pauses.values()) >= 3, pauses
    names = {name.removesuffix("_8k.wav").removesuffix(".wav") for name in PAUSES}
    assert set(PAUSES) == {f"{n}.wav" for n in names} | {f"{n}_8k.wav" for n in names}


@pytest.mark.parametrize("name", sorted(CLIPS))
def test_recorded_clip(name: str) -> None:
    meta = CLIPS[name]
    x, rate = read(RECORDED / name)
    assert rate == meta["rate"] == (8000 if name.endswith("_8k.wav") else 16000)
    assert round(len(x) / rate, 3) == meta["duration_s"]

    rms = envelope(x, rate)
    noise = max(rms[:15].max(), rms[-10:].max())  # first 150 ms, last 100 ms: no speech there
    assert round(float(noise), 1) == meta["noise_rms"]
    assert meta["threshold_rms"] >= 2 * noise

    spans = runs(np.flatnonzero(rms > meta["threshold_rms"]))
    merged = [spans[0]]
    for a, b in spans[1:]:
        if (a - merged[-1][1]) * 10 >= meta["min_gap_ms"]:
            merged.append([a, b])
        else:
            merged[-1][1] = b
    assert [[a * 10, b * 10] for a, b in merged] == meta["speech"]
    assert meta["speech"][0][0] >= 150 and meta["speech"][-1][1] <= len(x) * 1000 // rate - 100


def test_recorded_clips_are_documented() -> None:
    readme = (RECORDED / "README.md").read_text(encoding="utf-8")
    names = {name.rsplit("_", 1)[0] for name in CLIPS}
    assert 3 <= len(names) <= 8
    for n in names:
        assert {f"{n}_16k.wav", f"{n}_8k.wav"} <= set(CLIPS)
        assert f"`{n}`" in readme, f"{n} has no provenance in recorded/README.md"
    on_disk = {p.name for p in RECORDED.glob("*.wav")}
    assert on_disk == set(CLIPS)
