"""Offline AMD evaluation: the farm's VAD + :class:`workers.amd.AmdDecider` over a corpus.

For each case of a corpus made by :mod:`bench.amd_corpus`, the 8 kHz audio goes
through what a worker does before its VAD (soxr up to the model rate in 20 ms blocks,
then ``workers.vad.Vad.is_voiced`` per 20 ms frame, the first onset window held as
unvoiced because a fresh webrtcvad flags any noise onset), and each flag into
``AmdDecider.on_frame``; the end of the audio is ``on_end``. No recogniser runs, so
the transcript rules never fire here. Tones only come from ``tone_detector``, a hook
for the tone detector being written elsewhere (``workers.tones``): a factory giving,
per call, a callable fed each 8 kHz 20 ms frame with its offset that returns the tones
it finished (anything with ``kind``, ``start_ms``, ``end_ms``).

``python -m bench.amd_eval CORPUS_DIR [--count N] [--seed S]`` makes the corpus if
needed, then prints the confusion table (expected x got), the causes per kind and
the decision time p50/p95 for humans and machines.
"""

from __future__ import annotations


__all__ = ["ToneDetector", "ToneDetectorFactory", "ToneLike", "Result", "decide_file", "evaluate", "report", "main"]

import argparse
import sys
import wave
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import soxr

from bench.amd_corpus import Case, generate
from workers.amd import AMD_RESULTS, FRAME_MS, AmdConfig, AmdDecider, AmdDecision
from workers.vad import Vad, VadConfig


class ToneLike(Protocol):
    @property
    def kind(self) -> str: ...
    @property
    def start_ms(self) -> int: ...
    @property
    def end_ms(self) -> int: ...


ToneDetector = Callable[[bytes, int], Iterable[ToneLike]]  # (20 ms of 8 kHz int16, offset_ms) -> tones ended
ToneDetectorFactory = Callable[[], ToneDetector]  # one detector per call
_AMD_DEFAULT = AmdConfig()
_VAD_DEFAULT = VadConfig()


@dataclass(frozen=True)
class Result:
    case: Case
    decision: AmdDecision

    @property
    def correct(self) -> bool:
        return self.decision.result == self.case.expected


def _read_8k(path: Path) -> np.ndarray:
    with wave.open(str(path), "rb") as w:
        if w.getnchannels() != 1 or w.getsampwidth() != 2:
            raise ValueError(f"{path}: expected mono int16")
        rate, data = w.getframerate(), w.readframes(w.getnframes())
    x = np.frombuffer(data, dtype="<i2")
    if rate != 8000:
        x = soxr.resample(x, rate, 8000).astype("<i2")
    return x


def decide_file(
    path: Path,
    config: AmdConfig = _AMD_DEFAULT,
    vad_config: VadConfig = _VAD_DEFAULT,
    vad_rate: int = 16000,
    tone_detector: ToneDetector | None = None,
) -> AmdDecision:
    """The decider's one decision for one 8 kHz file, VAD at ``vad_rate`` as a worker would."""
    pcm = _read_8k(path)
    block = 8000 * FRAME_MS // 1000
    vad = Vad(vad_rate, vad_config)
    up = soxr.ResampleStream(8000, vad_rate, 1, dtype="int16", quality="QQ") if vad_rate != 8000 else None
    held = vad_config.onset_window_ms // FRAME_MS + 1  # as workers/call.py's quiet_frames
    amd = AmdDecider(config)
    pending = b""
    frame_no = 0
    for i in range(0, len(pcm) - block + 1, block):
        chunk = pcm[i : i + block]
        offset = i * 1000 // 8000
        if tone_detector is not None:
            for tone in tone_detector(chunk.tobytes(), offset):
                amd.on_tone(tone.kind, tone.start_ms, tone.end_ms)
        pending += up.resample_chunk(chunk).tobytes() if up is not None else chunk.tobytes()
        while len(pending) >= vad.frame_bytes:
            frame, pending = pending[: vad.frame_bytes], pending[vad.frame_bytes :]
            voiced = vad.is_voiced(frame) and frame_no >= held
            amd.on_frame(frame_no * FRAME_MS, voiced)
            frame_no += 1
        if amd.decision is not None and not amd.wants_beep(offset):
            break
    amd.on_end(len(pcm) * 1000 // 8000)
    assert amd.decision is not None
    return amd.decision


def evaluate(
    cases: Sequence[Case],
    corpus_dir: Path,
    config: AmdConfig = _AMD_DEFAULT,
    vad_config: VadConfig = _VAD_DEFAULT,
    vad_rate: int = 16000,
    tone_detector_factory: ToneDetectorFactory | None = None,
) -> list[Result]:
    """Run every case; ``tone_detector_factory`` (if given) makes a fresh tone detector per case."""
    out = []
    for case in cases:
        det = tone_detector_factory() if tone_detector_factory is not None else None
        out.append(Result(case, decide_file(Path(corpus_dir) / case.file, config, vad_config, vad_rate, det)))
    return out


def _pct(values: list[int], q: float) -> str:
    return f"{int(np.percentile(values, q))}" if values else "-"


def report(results: Sequence[Result]) -> str:
    """Confusion table, causes per kind, accuracy, decision time p50/p95 (ms from answer)."""
    lines = []
    conf = Counter((r.case.expected, r.decision.result) for r in results)
    lines.append("expected \\ got " + "".join(f"{g:>9}" for g in AMD_RESULTS) + f"{'total':>8}")
    for e in AMD_RESULTS:
        row = [conf[(e, g)] for g in AMD_RESULTS]
        lines.append(f"{e:<14} " + "".join(f"{n:>9}" for n in row) + f"{sum(row):>8}")
    right = sum(r.correct for r in results)
    lines.append(f"correct: {right}/{len(results)}")
    lines.append("")
    lines.append("kind -> got (reason): count")
    by_kind: dict[str, Counter[str]] = {}
    for r in results:
        by_kind.setdefault(r.case.kind, Counter())[f"{r.decision.result} ({r.decision.reason})"] += 1
    for kind, counter in by_kind.items():
        lines.append(f"  {kind:<19} " + ", ".join(f"{k}: {n}" for k, n in counter.most_common()))
    lines.append("")
    lines.append("decision time, ms from answer       n   p50   p95")
    for e in ("human", "machine"):
        ok = [r.decision.decision_ms for r in results if r.case.expected == e and r.correct]
        every = [r.decision.decision_ms for r in results if r.case.expected == e]
        lines.append(f"  expected {e:<8} decided right  {len(ok):>4} {_pct(ok, 50):>5} {_pct(ok, 95):>5}")
        lines.append(f"  expected {e:<8} any decision   {len(every):>4} {_pct(every, 50):>5} {_pct(every, 95):>5}")
    # Asterisk's rules cannot call a human before its greeting's end + after_greeting_silence_ms.
    after = [r.decision.decision_ms - r.case.speech[0].end_ms for r in results if r.case.kind == "human" and r.correct]
    lines.append(f"  human, after the greeting's end  {len(after):>4} {_pct(after, 50):>5} {_pct(after, 95):>5}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.amd_eval", description=__doc__.splitlines()[0])
    ap.add_argument("corpus_dir", type=Path)
    ap.add_argument("--count", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--vad-rate", type=int, default=16000, help="rate the VAD runs at (the worker's: the model's)")
    ap.add_argument("--aggressiveness", type=int, default=VadConfig().aggressiveness)
    args = ap.parse_args(argv)
    cases = generate(args.corpus_dir, args.count, args.seed)
    results = evaluate(cases, args.corpus_dir, vad_config=VadConfig(aggressiveness=args.aggressiveness),
                       vad_rate=args.vad_rate)  # fmt: skip
    print(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
