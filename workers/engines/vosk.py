"""The one place that imports vosk: model loading, recognisers and their pool.

Measured on this machine (MEASUREMENTS.md): a new recogniser costs ~1.4 s CPU over its
first 2 s of audio with one long stall, a reused one (``Reset``) half that; and a
recogniser's memory grows with the audio it has heard and is never given back. So
recognisers are leased per utterance from a per-worker pool, returned with
``Reset()``, and retired once they have heard ``max_audio_s`` seconds. Only
utterances in flight hold one, so a worker needs as many as the caller speech that
overlaps, not one per call.

Reset() keeps Vosk's adaptation state (and its clock), so a reused recogniser may
word an utterance slightly differently from a fresh one; ``reuse=False`` trades the
capacity for bit-exact repeatability.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass
from typing import Any

import vosk


__all__ = ["ModelError", "load_model", "model_rate", "model_view", "Recognizer", "RecognizerPool", "Result"]

log = logging.getLogger("farm.worker.vosk")


class ModelError(Exception):
    """The Vosk model directory is missing or cannot be loaded."""


def model_rate(path: str) -> int:
    """The sample rate the model was trained on (``--sample-frequency`` in mfcc.conf)."""
    conf = os.path.join(path, "conf", "mfcc.conf")
    try:
        with open(conf, encoding="utf-8") as f:
            for line in f:
                if line.strip().startswith("--sample-frequency="):
                    return int(float(line.split("=", 1)[1]))
    except OSError:
        pass
    return 16000


def model_view(path: str, into: str, *, dither: float = 0.0) -> str:
    """A view of model ``path`` whose feature extraction uses ``dither``; returns its dir.

    Kaldi's MFCC code adds random dither (1.0 unless mfcc.conf says otherwise, and
    Vosk's small models do not), which made the same audio give "… 저 입니다" in
    some runs and "… 더 입니다" in others here. With dither 0 a recogniser is
    repeatable, so a worker that takes over a call rebuilds the same words. The view
    is symlinks to the model's files plus an edited conf/mfcc.conf; the model itself
    is not touched. A model without conf/mfcc.conf is used as it is.
    """
    conf = os.path.join(path, "conf", "mfcc.conf")
    if not os.path.isfile(conf):
        return path
    with open(conf, encoding="utf-8") as f:
        lines = [line for line in f.read().splitlines() if not line.strip().startswith("--dither")]
    view = os.path.join(into, "model")
    os.makedirs(os.path.join(view, "conf"), exist_ok=True)
    for name in os.listdir(path):
        if name != "conf" and not os.path.lexists(os.path.join(view, name)):
            os.symlink(os.path.join(os.path.abspath(path), name), os.path.join(view, name))
    for name in os.listdir(os.path.join(path, "conf")):
        if name != "mfcc.conf" and not os.path.lexists(os.path.join(view, "conf", name)):
            os.symlink(os.path.join(os.path.abspath(path), "conf", name), os.path.join(view, "conf", name))
    with open(os.path.join(view, "conf", "mfcc.conf"), "w", encoding="utf-8") as f:
        f.write("\n".join([*lines, f"--dither={dither:g}"]) + "\n")
    return view


def load_model(path: str) -> vosk.Model:
    """Load a Vosk model directory; raise :class:`ModelError` with a clear reason."""
    if not path:
        raise ModelError("no model given: pass --model DIR or set FARM_MODEL")
    if not os.path.isdir(path):
        raise ModelError(f"model directory {path} does not exist")
    if not (os.path.isdir(os.path.join(path, "am")) or os.path.exists(os.path.join(path, "final.mdl"))):
        raise ModelError(f"{path} is not a Vosk model directory (no am/ inside)")
    vosk.SetLogLevel(-1)
    try:
        return vosk.Model(path)
    except Exception as exc:  # vosk raises a bare Exception on any failure
        raise ModelError(f"vosk could not load the model in {path}: {exc}") from None


@dataclass(frozen=True)
class Result:
    """What a recogniser said, times relative to the start of its utterance."""

    text: str
    words: list[dict[str, Any]]


def _parse(raw: str) -> Result:
    obj = json.loads(raw)
    words = [
        {
            "word": w["word"],
            "start_ms": round(w["start"] * 1000),
            "end_ms": round(w["end"] * 1000),
            "conf": round(w.get("conf", 1.0), 3),
        }
        for w in obj.get("result", [])
    ]
    return Result(obj.get("text", ""), words)


class Recognizer:
    """A KaldiRecognizer plus how much audio it has heard since it was created."""

    def __init__(self, model: vosk.Model, rate: int) -> None:
        self._rec = vosk.KaldiRecognizer(model, rate)
        self._rec.SetWords(True)
        self.rate = rate
        self.heard_bytes = 0

    @property
    def heard_s(self) -> float:
        return self.heard_bytes / (2 * self.rate)

    @property
    def heard_ms(self) -> int:
        """Vosk's word times count from the recogniser's creation, across Reset()."""
        return self.heard_bytes * 1000 // (2 * self.rate)

    def accept(self, pcm: bytes) -> bool:
        """Feed int16 mono audio; True when Vosk's own endpoint closed an utterance."""
        self.heard_bytes += len(pcm)
        return bool(self._rec.AcceptWaveform(pcm))

    def result(self) -> Result:
        """Call after :meth:`accept` returned True."""
        return _parse(self._rec.Result())

    def partial(self) -> str:
        return str(json.loads(self._rec.PartialResult()).get("partial", ""))

    def final(self) -> Result:
        """End the utterance now (flushes the decoder); the recogniser is ready for more."""
        return _parse(self._rec.FinalResult())

    def reset(self) -> None:
        self._rec.Reset()


class RecognizerPool:
    """Warm recognisers of one worker, leased per utterance; thread-safe."""

    def __init__(self, model: vosk.Model, rate: int, *, max_audio_s: float, keep: int, reuse: bool = True) -> None:
        self.model = model
        self.rate = rate
        self.max_audio_s = max_audio_s
        self.keep = keep
        self.reuse = reuse
        self._idle: list[Recognizer] = []
        self._lock = threading.Lock()
        self.created = 0
        self.retired = 0

    def lease(self) -> Recognizer:
        with self._lock:
            if self._idle:
                return self._idle.pop()
            self.created += 1
        return Recognizer(self.model, self.rate)

    def give_back(self, rec: Recognizer) -> None:
        """Return a recogniser after its utterance; retire it if it has heard too much."""
        with self._lock:
            if not self.reuse or rec.heard_s >= self.max_audio_s or len(self._idle) >= self.keep:
                self.retired += 1
                return  # dropped: its memory goes with it
        rec.reset()
        with self._lock:
            self._idle.append(rec)

    def warm(self, count: int, seconds: float = 1.0) -> None:
        """Create ``count`` recognisers and pay their first-audio stall now, not on a call.

        A new recogniser spent 1.45 s CPU on its first 2 s of speech here, one warmed
        with 1 s of noise 0.99 s, a reused one 0.17 s (MEASUREMENTS.md; workers/asr.py).
        """
        import numpy as np

        noise = (np.random.default_rng(0).standard_normal(int(self.rate * seconds)) * 300).astype("<i2").tobytes()
        warmed = []
        for _ in range(count):
            rec = self.lease()
            rec.accept(noise)
            rec.final()
            warmed.append(rec)
        for rec in warmed:
            self.give_back(rec)

    @property
    def idle(self) -> int:
        return len(self._idle)
