"""The one place that imports vosk: model loading, recognizers and their pool.

Measured on this machine (MEASUREMENTS.md): a new recognizer costs ~1.4 s CPU over its
first 2 s of audio with one long stall, a reused one (``Reset``) half that; and a
recognizer's memory grows with the audio it has heard and is never given back. So
recognizers are leased per utterance from a per-worker pool, returned with
``Reset()``, and retired once they have heard ``max_audio_s`` seconds. Only
utterances in flight hold one, so a worker needs as many as the caller speech that
overlaps, not one per call.

Reset() keeps Vosk's adaptation state (and its clock), so a reused recognizer may
word an utterance slightly differently from a fresh one; ``reuse=False`` trades the
capacity for bit-exact repeatability.

Why warm recognizers matter so much (bench/results/profile-12calls.md): with a model
that ships HCLr.fst and Gr.fst (the small ones), each recognizer composes its decoding
graph as it decodes and caches what it built; that composition is ~75 % of a worker's
CPU, and a recognizer's first second of audio costs ~5x what its twentieth does. The
cache is also most of its memory, and glibc keeps a retired recognizer's memory unless
asked to give it back (``malloc_trim``). So the pool warms recognizers on speech before
calls come, reuses the warmest first, and retires one only when the worker holds more
memory than its budget (or it has heard ``max_audio_s``).
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import threading
import wave
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import vosk


__all__ = [
    "ModelError",
    "load_model",
    "model_rate",
    "model_view",
    "Recognizer",
    "RecognizerPool",
    "Result",
    "warmup_audio",
    "limit_malloc_arenas",
    "rss_bytes",
]

log = logging.getLogger(__name__)


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


def model_view(path: str, into: str, *, dither: float = 0.0, decoder: dict[str, float] | None = None) -> str:
    """A view of model ``path`` with ``dither`` in its feature extraction and ``decoder``
    options (``beam``, ``max-active``, ``lattice-beam``) in its model.conf; returns its dir.

    Kaldi's MFCC code adds random dither (1.0 unless mfcc.conf says otherwise, and
    Vosk's small models do not), which made the same audio give "… 저 입니다" in
    some runs and "… 더 입니다" in others here. With dither 0 a recognizer is
    repeatable, so a worker that takes over a call rebuilds the same words. The decoder
    options trade accuracy for CPU (bench/results/profile-12calls.md: the search and the
    graph it composes are most of a worker's CPU). The view is symlinks to the model's
    files plus edited conf files; the model itself is not touched. A model without
    conf/mfcc.conf is used as it is.
    """
    conf_dir = os.path.join(path, "conf")
    if not os.path.isfile(os.path.join(conf_dir, "mfcc.conf")):
        return path
    view = os.path.join(into, "model")
    os.makedirs(os.path.join(view, "conf"), exist_ok=True)
    for name in os.listdir(path):
        if name != "conf" and not os.path.lexists(os.path.join(view, name)):
            os.symlink(os.path.join(os.path.abspath(path), name), os.path.join(view, name))
    edits = {"mfcc.conf": {"dither": dither}, "model.conf": dict(decoder or {})}
    for name in os.listdir(conf_dir):
        target = os.path.join(view, "conf", name)
        if os.path.lexists(target):
            os.unlink(target)
        if not edits.get(name):
            os.symlink(os.path.join(os.path.abspath(conf_dir), name), target)
            continue
        with open(os.path.join(conf_dir, name), encoding="utf-8") as f:
            lines = [
                line for line in f.read().splitlines() if line.strip().split("=", 1)[0].lstrip("-") not in edits[name]
            ]
        with open(target, "w", encoding="utf-8") as f:
            f.write("\n".join([*lines, *(f"--{k}={v:g}" for k, v in edits[name].items())]) + "\n")
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


WARMUP = Path(__file__).resolve().parent.parent / "data" / "warmup_8k.wav"  # made by data/make_warmup.sh

_libc = ctypes.CDLL(None)
_M_ARENA_MAX = -8  # mallopt(3)


def limit_malloc_arenas(arenas: int = 2) -> None:
    """Fewer glibc arenas for the recognition threads: memory a retired recognizer gave
    back is reused, and ``malloc_trim`` can return it, instead of sitting in a thread's
    own arena. Call once at worker start."""
    _libc.mallopt(_M_ARENA_MAX, arenas)


def warmup_audio(rate: int, path: Path = WARMUP) -> bytes:
    """The warm-up speech (int16 mono) at ``rate``."""
    with wave.open(str(path), "rb") as w:
        pcm, src = w.readframes(w.getnframes()), w.getframerate()
    if src == rate:
        return pcm
    import soxr

    out: bytes = soxr.resample(np.frombuffer(pcm, dtype="<i2"), src, rate).astype("<i2").tobytes()
    return out


def rss_bytes() -> int:
    """This process's resident memory (0 when it cannot be read: out of file descriptors)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def _rss_mb() -> float:
    return rss_bytes() / 1e6


@dataclass(frozen=True)
class Result:
    """What a recognizer said, times relative to the start of its utterance."""

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
        self.heard_bytes = 0  # since creation: Vosk's word times count from there
        self.warm_bytes = 0  # of which warm-up audio
        self.open_pipeline = False  # audio fed since the last final: its features are still held

    @property
    def heard_s(self) -> float:
        """Calls' audio heard, warm-up not counted (what retirement goes by)."""
        return (self.heard_bytes - self.warm_bytes) / (2 * self.rate)

    @property
    def heard_ms(self) -> int:
        """Vosk's word times count from the recognizer's creation, across Reset()."""
        return self.heard_bytes * 1000 // (2 * self.rate)

    def accept(self, pcm: bytes) -> bool:
        """Feed int16 mono audio; True when Vosk's own endpoint closed an utterance."""
        self.heard_bytes += len(pcm)
        self.open_pipeline = True
        return bool(self._rec.AcceptWaveform(pcm))

    def result(self) -> Result:
        """Call after :meth:`accept` returned True (Vosk's own endpoint: the features go on)."""
        return _parse(self._rec.Result())

    def partial(self) -> str:
        return str(json.loads(self._rec.PartialResult()).get("partial", ""))

    def final(self) -> Result:
        """End the utterance now (flushes the features and the decoder); the next audio
        starts a fresh feature pipeline, as a new recognizer would."""
        self.open_pipeline = False
        return _parse(self._rec.FinalResult())

    def reset(self) -> None:
        """Before reuse. A recognizer given back without a final (its call ended mid-utterance,
        or after Vosk's own endpoint) still holds that utterance's feature pipeline, which
        Reset() keeps: end it on 20 ms of silence first, so the next utterance starts fresh,
        as a new recognizer would."""
        if self.open_pipeline:
            self.accept(bytes(self.rate // 50 * 2))
            self.final()
        self._rec.Reset()


class RecognizerPool:
    """Warm recognizers of one worker, leased per utterance; thread-safe.

    Args:
        max_audio_s: retire a recognizer that has heard this much audio.
        keep: idle recognizers kept at most.
        memory_mb: retire a returned recognizer while the worker holds more than this
            above what it held when the pool was made (resident MB; 0: no budget): the
            model's pages, a static graph's gigabyte included, are not the recognizers'.
            Retiring trims the heap so the memory goes back.
        reuse: False gives each utterance a fresh recognizer (repeatable, slower).
    """

    def __init__(
        self,
        model: vosk.Model,
        rate: int,
        *,
        max_audio_s: float,
        keep: int,
        memory_mb: float = 0.0,
        reuse: bool = True,
    ) -> None:
        self.model = model
        self.rate = rate
        self.max_audio_s = max_audio_s
        self.keep = keep
        self.memory_mb = memory_mb
        self.base_mb = _rss_mb()  # the model, shared with the node's other processes since the fork
        self.reuse = reuse
        self._idle: list[Recognizer] = []  # the warmest (most recently used) last
        self._lock = threading.Lock()
        self.created = 0
        self.retired = 0
        self.leased = 0

    def lease(self) -> Recognizer:
        with self._lock:
            self.leased += 1
            if self._idle:
                return self._idle.pop()
            self.created += 1
        return Recognizer(self.model, self.rate)

    def give_back(self, rec: Recognizer) -> None:
        """Return a recognizer after its utterance; retire it if it has heard too much, or
        the worker is over its memory budget, or enough are idle."""
        with self._lock:
            self.leased -= 1
            over_budget = bool(self.memory_mb) and _rss_mb() - self.base_mb > self.memory_mb
            if not self.reuse or rec.heard_s >= self.max_audio_s or len(self._idle) >= self.keep or over_budget:
                self.retired += 1
                retire = True
            else:
                retire = False
        if retire:
            del rec  # its graph cache goes with it...
            _libc.malloc_trim(0)  # ...back to the system, not into glibc's free lists
            return
        rec.reset()
        with self._lock:
            self._idle.append(rec)

    def warm(self, count: int, pcm: bytes, progress: Callable[[], None] | None = None) -> None:
        """Create ``count`` recognizers and pay their first-audio cost now, on ``pcm`` (speech
        at the model's rate), fed as a worker feeds calls: 20 ms frames, partials every 200 ms.
        ``progress`` is called every second of audio (a worker proves it is alive)."""
        frame = self.rate // 50 * 2
        # New ones: leasing would take the pool's warm ones first and warm them again.
        with self._lock:
            self.leased += count
            self.created += count
        warmed = [Recognizer(self.model, self.rate) for _ in range(count)]
        for rec in warmed:
            for i, start in enumerate(range(0, len(pcm) - frame + 1, frame)):
                rec.accept(pcm[start : start + frame])
                if i % 10 == 9:
                    rec.partial()
                if progress is not None and i % 50 == 49:
                    progress()
            rec.final()
            rec.warm_bytes = rec.heard_bytes  # not a call's audio: it does not count toward retirement
        for rec in warmed:
            self.give_back(rec)

    def warm_in_background(self, count: int, pcm: bytes) -> threading.Thread:
        """:meth:`warm` on a thread at the lowest CPU priority: calls' decoding goes first."""

        def run() -> None:
            try:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
            except OSError:  # pragma: no cover - not allowed here; warm at normal priority
                pass
            self.warm(count, pcm)
            log.info("%d more recognizers warmed in the background (%d idle)", count, self.idle)

        thread = threading.Thread(target=run, name="warm", daemon=True)
        thread.start()
        return thread

    @property
    def idle(self) -> int:
        return len(self._idle)
