"""Offline AMD evaluation: the farm's VAD + tone detector + :class:`workers.amd.AmdDecider` over a corpus.

For each case of a corpus made by :mod:`bench.amd_corpus`, the 8 kHz audio goes
through what a worker does, 20 ms at a time and in this order (a worker feeds its tone
detector ``workers.analysis.TONE_BLOCK_MS`` at a time, which moves when its events come,
by that much at most, not what they say; ``farm bench --amd`` runs the corpus through
workers):

1. the tone detector (``workers.tones.ToneDetector(8000)``, one per call) is fed the
   20 ms block; each tone it finished goes to ``AmdDecider.on_tone`` (a beep is
   reported up to ~40 ms after its end, so it arrives when a worker would see it);
2. the block goes up to the VAD's rate (soxr, in 20 ms blocks) and each 20 ms VAD
   frame to ``workers.vad.Vad.is_voiced``, the first onset window held as unvoiced
   (a fresh webrtcvad flags any noise onset, as ``workers/call.py`` holds it); the
   cadence gets ``on_frame(offset, voiced, tonal=detector.is_tonal(offset))``:
   webrtcvad voices beeps and call-progress tones, which are neither a greeting nor a
   pause (``workers.amd`` rule 10). ``--tonal-as-silence`` gives it ``voiced and not
   tonal`` instead (a tone counts as silence), for comparison.

Once the decider has decided and wants no beep (``wants_beep``), the VAD stops; the
tone detector runs to the end of the file (then ``flush``) so that its events can be
scored as a detector, and its tones keep going to the decider, which ignores what it
no longer wants. The end of the audio is ``on_end``. No recognizer runs, so the
transcript rules never fire here. ``--no-tones`` runs the cadence alone.

``python -m bench.amd_eval CORPUS_DIR [--count N] [--seed S] [--no-tones]`` makes the
corpus if needed, then prints the confusion table (expected x got), the causes per
kind, the decision time p50/p95 for humans and machines, the same with
``after_greeting_silence_ms`` at ``--what-if-ags`` (600; not the default), and with
tones: beep detection against the manifest (found = end within 100 ms, end error
p50/p95), false beeps per case kind and a tone classification table; last, every case
decided wrong.
"""

from __future__ import annotations


__all__ = ["Result", "ToneLike", "ToneSource", "ToneSourceFactory", "decide_file", "evaluate", "report", "main"]

import argparse
import dataclasses
import sys
import wave
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt
import soxr

from bench.amd_corpus import Case, generate
from workers.amd import AMD_RESULTS, FRAME_MS, AmdBeep, AmdConfig, AmdDecider, AmdDecision
from workers.tones import TONE_KINDS, ToneDetector
from workers.vad import Vad, VadConfig


class ToneLike(Protocol):
    @property
    def kind(self) -> str: ...
    @property
    def start_ms(self) -> int: ...
    @property
    def end_ms(self) -> int: ...


class ToneSource(Protocol):
    """What the evaluator needs of a tone detector (``workers.tones.ToneDetector`` is one)."""

    def feed(self, samples: npt.NDArray[np.int16]) -> Sequence[ToneLike]: ...
    def flush(self) -> Sequence[ToneLike]: ...
    def is_tonal(self, offset_ms: int) -> bool: ...


ToneSourceFactory = Callable[[], ToneSource]  # one detector per call, fed 8 kHz audio from the answer on
_AMD_DEFAULT = AmdConfig()
_VAD_DEFAULT = VadConfig()
BEEP_MATCH_MS = 100  # a reported beep is the manifest's if its end is this close


def _real_tones() -> ToneSource:
    return ToneDetector(8000)


@dataclass(frozen=True)
class Result:
    """One case's decision; ``tones`` is None when no tone detector ran."""

    case: Case
    decision: AmdDecision
    tones: tuple[ToneLike, ...] | None = None
    beep: AmdBeep | None = None  # the decider's beep: where a voicemail drop would start

    @property
    def correct(self) -> bool:
        return self.decision.result == self.case.expected


def _read_8k(path: Path) -> npt.NDArray[np.int16]:
    with wave.open(str(path), "rb") as w:
        if w.getnchannels() != 1 or w.getsampwidth() != 2:
            raise ValueError(f"{path}: expected mono int16")
        rate, data = w.getframerate(), w.readframes(w.getnframes())
    x = np.frombuffer(data, dtype="<i2").astype(np.int16)
    if rate != 8000:
        x = soxr.resample(x, rate, 8000).astype(np.int16)
    return x


def run_file(
    path: Path,
    config: AmdConfig = _AMD_DEFAULT,
    vad_config: VadConfig = _VAD_DEFAULT,
    vad_rate: int = 16000,
    tones: ToneSource | None = None,
    tonal_as_silence: bool = False,
) -> tuple[AmdDecision, tuple[ToneLike, ...], AmdBeep | None]:
    """One 8 kHz file as a worker would run it: the decision, every tone the detector
    reported over the whole file, and the decider's beep (see the module docstring).
    ``tonal_as_silence`` gives the cadence ``voiced and not tonal`` instead of ``tonal``."""
    pcm = _read_8k(path)
    block = 8000 * FRAME_MS // 1000
    vad = Vad(vad_rate, vad_config)
    up = soxr.ResampleStream(8000, vad_rate, 1, dtype="int16", quality="QQ") if vad_rate != 8000 else None
    held = vad_config.onset_window_ms // FRAME_MS + 1  # as workers/call.py's quiet_frames
    amd = AmdDecider(config)
    found: list[ToneLike] = []
    pending = b""
    frame_no = 0
    listening = True  # the VAD and cadence still run
    for i in range(0, len(pcm) - block + 1, block):
        chunk = pcm[i : i + block]
        offset = i * 1000 // 8000
        if tones is not None:
            for tone in tones.feed(chunk):
                found.append(tone)
                amd.on_tone(tone.kind, tone.start_ms, tone.end_ms)
        if listening:
            pending += up.resample_chunk(chunk).tobytes() if up is not None else chunk.tobytes()
            while len(pending) >= vad.frame_bytes:
                frame, pending = pending[: vad.frame_bytes], pending[vad.frame_bytes :]
                at = frame_no * FRAME_MS
                voiced = vad.is_voiced(frame) and frame_no >= held
                tonal = tones is not None and tones.is_tonal(at)
                if tonal_as_silence:
                    amd.on_frame(at, voiced and not tonal)
                else:
                    amd.on_frame(at, voiced, tonal)
                frame_no += 1
            listening = amd.decision is None or amd.wants_beep(offset)
        if not listening and tones is None:
            break
    if tones is not None:
        for tone in tones.flush():
            found.append(tone)
            amd.on_tone(tone.kind, tone.start_ms, tone.end_ms)
    amd.on_end(len(pcm) * 1000 // 8000)
    assert amd.decision is not None
    return amd.decision, tuple(found), amd.beep


def decide_file(
    path: Path,
    config: AmdConfig = _AMD_DEFAULT,
    vad_config: VadConfig = _VAD_DEFAULT,
    vad_rate: int = 16000,
    tones: ToneSource | None = None,
    tonal_as_silence: bool = False,
) -> AmdDecision:
    """The decider's one decision for one 8 kHz file (see run_file)."""
    return run_file(path, config, vad_config, vad_rate, tones, tonal_as_silence)[0]


def evaluate(
    cases: Sequence[Case],
    corpus_dir: Path,
    config: AmdConfig = _AMD_DEFAULT,
    vad_config: VadConfig = _VAD_DEFAULT,
    vad_rate: int = 16000,
    tone_detector_factory: ToneSourceFactory | None = _real_tones,
    tonal_as_silence: bool = False,
) -> list[Result]:
    """Run every case; ``tone_detector_factory`` makes a fresh tone detector per case
    (the real ``ToneDetector(8000)`` by default; None runs the cadence alone)."""
    out = []
    for case in cases:
        det = tone_detector_factory() if tone_detector_factory is not None else None
        decision, found, beep = run_file(
            Path(corpus_dir) / case.file, config, vad_config, vad_rate, det, tonal_as_silence
        )
        out.append(Result(case, decision, found if det is not None else None, beep))
    return out


def _pct(values: Sequence[int], q: float) -> str:
    return f"{int(np.percentile(values, q))}" if values else "-"


def _share(n: int, total: int) -> str:
    return f"{n}/{total} ({100 * n / total:.0f} %)" if total else "0/0"


def _times(results: Sequence[Result]) -> list[str]:
    lines = []
    for e in ("human", "machine"):
        ok = [r.decision.decision_ms for r in results if r.case.expected == e and r.correct]
        every = [r.decision.decision_ms for r in results if r.case.expected == e]
        lines.append(f"  expected {e:<8} decided right  {len(ok):>4} {_pct(ok, 50):>5} {_pct(ok, 95):>5}")
        lines.append(f"  expected {e:<8} any decision   {len(every):>4} {_pct(every, 50):>5} {_pct(every, 95):>5}")
    # Asterisk's rules cannot call a human before its greeting's end + after_greeting_silence_ms.
    after = [r.decision.decision_ms - r.case.speech[0].end_ms for r in results if r.case.kind == "human" and r.correct]
    lines.append(f"  human, after the greeting's end  {len(after):>4} {_pct(after, 50):>5} {_pct(after, 95):>5}")
    return lines


def _table(rows: Sequence[str], cols: Sequence[str], counts: Counter[tuple[str, str]], corner: str) -> list[str]:
    width = max(9, *(len(c) + 2 for c in cols))
    lines = [f"{corner:<14} " + "".join(f"{c:>{width}}" for c in cols) + f"{'total':>8}"]
    for e in rows:
        row = [counts[(e, g)] for g in cols]
        if sum(row):
            lines.append(f"{e:<14} " + "".join(f"{n:>{width}}" for n in row) + f"{sum(row):>8}")
    return lines


def _reported_kind(tones: Sequence[ToneLike]) -> str:
    """What a case's tones say: its last non-beep kind, else beep, else none."""
    kinds = [t.kind for t in tones]
    other = [k for k in kinds if k != "beep"]
    return other[-1] if other else ("beep" if kinds else "none")


def _tone_lines(results: Sequence[Result]) -> list[str]:
    scored = [r for r in results if r.tones is not None]
    if not scored:
        return []
    lines = ["", f"beeps: {sum(1 for r in scored for t in r.case.tones if t.kind == 'beep')} in the manifest"]
    errors: list[int] = []
    hits = drops = 0
    by_kind: Counter[str] = Counter()
    false_beeps = 0
    for r in scored:
        assert r.tones is not None
        want = [t for t in r.case.tones if t.kind == "beep"]
        beeps = [t for t in r.tones if t.kind == "beep"]
        if not want:
            false_beeps += len(beeps)
            by_kind.update({r.case.kind: len(beeps)} if beeps else {})
        for t in want:
            near = [b.end_ms - t.end_ms for b in beeps if abs(b.end_ms - t.end_ms) <= BEEP_MATCH_MS]
            if near:
                hits += 1
                errors.append(min(near, key=abs))
            if r.beep is not None and abs(r.beep.end_ms - t.end_ms) <= BEEP_MATCH_MS:
                drops += 1
    n = sum(1 for r in scored for t in r.case.tones if t.kind == "beep")
    absolute = [abs(e) for e in errors]
    lines.append(f"  detected (reported end within {BEEP_MATCH_MS} ms)  {_share(hits, n)}")
    lines.append(f"  kept by the decider as its beep       {_share(drops, n)}")
    lines.append(f"  |end error| ms p50 {_pct(absolute, 50)}, p95 {_pct(absolute, 95)}, max {max(absolute, default=0)}")
    lines.append(f"  end error (reported - true) ms p50 {_pct(errors, 50)}, min {min(errors, default=0)}")
    kinds = ", ".join(f"{k}: {c}" for k, c in by_kind.most_common()) or "none"
    others = sum(1 for r in scored if not any(t.kind == "beep" for t in r.case.tones))
    lines.append(f"  beeps reported on the {others} cases without one: {false_beeps} ({kinds})")
    if by_kind.get("fax"):
        lines.append("    (a fax CNG burst is reported as a beep by design, fax_cng follows 3.5 s later)")
    lines.append("")
    lines.append("tone classification (a case's manifest tone x what the detector reported: its last")
    lines.append("non-beep kind, else beep, else none)")
    kinds_all = ("none", *TONE_KINDS)
    conf: Counter[tuple[str, str]] = Counter()
    for r in scored:
        assert r.tones is not None
        conf[(r.case.tones[-1].kind if r.case.tones else "none", _reported_kind(r.tones))] += 1
    lines += ["  " + line for line in _table(kinds_all, kinds_all, conf, "expected\\got")]
    right = sum(conf[(k, k)] for k in kinds_all)
    lines.append(f"  correct: {_share(right, len(scored))}")
    return lines


def report(results: Sequence[Result], what_if: Sequence[tuple[str, Sequence[Result]]] = ()) -> str:
    """Confusion table, causes per kind, decision time p50/p95 (ms from answer), rows for
    other configs (``what_if``: (label, results)), tone figures and the cases decided wrong."""
    conf = Counter((r.case.expected, r.decision.result) for r in results)
    lines = _table(AMD_RESULTS, AMD_RESULTS, conf, "expected \\ got")
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
    lines += _times(results)
    for label, other in what_if:
        lines.append("")
        lines.append(f"{label}: correct {sum(r.correct for r in other)}/{len(other)}")
        wrong = Counter((r.case.expected, r.decision.result) for r in other if not r.correct)
        lines.append(
            "  wrong (expected -> got): " + (", ".join(f"{e} -> {g}: {n}" for (e, g), n in wrong.items()) or "none")
        )
        lines += _times(other)
    lines += _tone_lines(results)
    wrong_cases = [r for r in results if not r.correct]
    lines.append("")
    lines.append(f"decided wrong: {len(wrong_cases)}")
    for r in wrong_cases:
        d, tones = r.decision, ""
        if r.tones is not None:
            tones = " tones: " + (", ".join(f"{t.kind} {t.start_ms}-{t.end_ms}" for t in r.tones) or "none")
        lines.append(f"  {r.case.file:<30} {d.result} ({d.reason}) at {d.decision_ms} ms;{tones}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.amd_eval", description=__doc__.splitlines()[0])
    ap.add_argument("corpus_dir", type=Path)
    ap.add_argument("--count", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--vad-rate", type=int, default=16000, help="rate the VAD runs at (the worker's: the model's)")
    ap.add_argument("--aggressiveness", type=int, default=VadConfig().aggressiveness)
    ap.add_argument("--no-tones", action="store_true", help="no tone detector: the cadence rules alone")
    ap.add_argument(
        "--tonal-as-silence",
        action="store_true",
        help="give the cadence voiced-and-not-tonal (tones count as silence) instead of AmdDecider's tonal",
    )
    ap.add_argument("--what-if-ags", type=int, default=600, metavar="MS",
                    help="also run with after_greeting_silence_ms=MS (0: do not)")  # fmt: skip
    args = ap.parse_args(argv)
    cases = generate(args.corpus_dir, args.count, args.seed)
    vad_config = VadConfig(aggressiveness=args.aggressiveness)
    factory = None if args.no_tones else _real_tones

    def run(config: AmdConfig) -> list[Result]:
        return evaluate(cases, args.corpus_dir, config, vad_config, args.vad_rate, factory, args.tonal_as_silence)

    what_if = []
    if args.what_if_ags:
        config = dataclasses.replace(_AMD_DEFAULT, after_greeting_silence_ms=args.what_if_ags)
        what_if.append((f"with after_greeting_silence_ms={args.what_if_ags} (not the default)", run(config)))
    print(report(run(_AMD_DEFAULT), what_if))
    return 0


if __name__ == "__main__":
    sys.exit(main())
