"""``farm bench --amd CORPUS_DIR``: answering-machine detection, beeps and tones through a real farm.

Each case of a :mod:`bench.amd_corpus` corpus (made if needed) is one call, streamed as
mod_audio_stream would (amigniter: metadata, then 20 ms of 8 kHz mono per frame, real
time) with ``?amd=1`` on its URL, ``--calls`` at a time (the next case starts when a call
ends). Its ``amd``, ``beep`` and ``tone`` events and ``call_end``'s stats are scored
against the manifest as :mod:`bench.amd_eval` scores the offline run; here the
recognizer runs, so the transcript rules (``phrase``, ``transcript_words``) can decide.

``--cost`` streams the same cases again with ``?tones=0`` (no AMD, no tones) on the same
farm: the workers' CPU seconds per call-second, on and off. ``--micro`` times
:class:`workers.analysis.CallAnalysis` alone (``time.process_time``) over the corpus
audio, 20 ms at a time with the VAD's flag per frame, per audio second; it needs no farm.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import soxr

from bench.amd_corpus import Case, ToneSpan, generate
from bench.amd_eval import BEEP_MATCH_MS, Result, _pct, _read_8k, _table, _times, _tone_lines
from bench.audio import CallScript
from bench.procs import ProcMonitor
from bench.senders import AmigniterSender, CallRecord, EventRouter, SenderOptions
from workers.amd import AMD_RESULTS, FRAME_MS, AmdBeep, AmdConfig, AmdDecision
from workers.analysis import TONE_BLOCK_MS, CallAnalysis, Options
from workers.vad import Vad, VadConfig


__all__ = ["run_cases", "rows_of", "report", "cost_line", "micro", "main"]

# bench/RESULTS.md: the workers' CPU per call-second, Vosk included (a compiled graph .. composed on the fly)
ASR_MS_PER_S = (55.0, 150.0)
TRANSCRIPT_REASONS = ("phrase", "transcript_words")
_NONE = AmdDecision("none", "no amd event", 0, {})
RETRIES, RETRY_S = 60, 1.0  # a call the farm refuses (admission) is tried again, as a dialer would


class _QuerySender(AmigniterSender):
    """amigniter with per-call options in the URL's query (``?amd=1``, ``?tones=0``)."""

    query = ""

    def url(self, script: CallScript) -> str:
        return super().url(script) + self.query


async def run_cases(
    cases: Sequence[Case], corpus_dir: Path, target: str, events: str, calls: int, query: str,
    pids: dict[int, str], tag: str = "amd", progress: bool = True,
) -> tuple[list[CallRecord], dict[str, Any]]:  # fmt: skip
    """Stream every case, ``calls`` at a time; the records (in case order) and the run's
    figures: wall seconds, call-seconds and the farm's processes (CPU, memory)."""
    pcms = [_read_8k(Path(corpus_dir) / case.file).astype("<i2").tobytes() for case in cases]
    records = [CallRecord(CallScript("", 8000, b"", ()), "amigniter")] * len(pcms)  # filled by one()
    slots = asyncio.Semaphore(max(1, calls))
    done = refusals = 0
    monitor = ProcMonitor(pids)
    call_seconds = sum(len(pcm) // 2 for pcm in pcms) / 8000

    async def one(i: int, sender: _QuerySender) -> None:
        nonlocal done, refusals
        async with slots:  # a refused call waits in its slot: never more than ``calls`` at a time
            for attempt in range(RETRIES + 1):
                record = CallRecord(
                    CallScript(f"{tag}-{os.getpid()}-{i:04d}-{attempt}", 8000, pcms[i], ()), "amigniter"
                )
                records[i] = record
                await sender.run(record)
                if not record.refused:
                    break
                refusals += 1  # admission (at capacity): the dialer tries again a moment later
                await asyncio.sleep(RETRY_S)
            done += 1
            if progress and (done % 20 == 0 or done == len(pcms)):
                print(f"{tag}: {done}/{len(pcms)} calls done", file=sys.stderr, flush=True)

    async with EventRouter(events) as router:
        sender = _QuerySender(SenderOptions(target=target, events=events), router)
        sender.query = query
        monitor.start()
        t0 = time.monotonic()
        await asyncio.gather(*(one(i, sender) for i in range(len(pcms))))
        wall = time.monotonic() - t0
        await monitor.stop()
    run = {"query": query, "calls": calls, "cases": len(records), "wall_s": round(wall, 1), "refusals": refusals}
    run["call_seconds"] = round(call_seconds, 1)
    run["procs"] = monitor.report(call_seconds) if pids else None
    return records, run


def _result(case: Case, record: CallRecord) -> Result:
    amd = [o for o in record.dialer if o.kind == "amd"]
    decision = _NONE
    if amd:
        d = amd[0].data
        decision = AmdDecision(str(d["result"]), str(d["reason"]), int(d["decision_ms"]), d.get("features", {}))
    tones = tuple(
        ToneSpan(
            str(o.data.get("kind", "beep")),
            int(o.data["start_ms"]),
            int(o.data["end_ms"]),
            float(o.data.get("freq_hz", 0.0)),
        )  # fmt: skip
        for o in record.dialer
        if o.kind in ("beep", "tone")
    )
    beeps = [t for t in tones if t.kind == "beep"]
    # What a dialer would drop its voicemail on: a call's first beep once it is a machine.
    beep = AmdBeep(beeps[0].start_ms, beeps[0].end_ms) if beeps and decision.result == "machine" else None
    return Result(case, decision, tones, beep)


def rows_of(cases: Sequence[Case], records: Sequence[CallRecord]) -> list[dict[str, Any]]:
    """One JSON-ready row per case: the truth, what the farm said, and when."""
    rows = []
    for case, record in zip(cases, records, strict=True):
        r = _result(case, record)
        amd = [o for o in record.dialer if o.kind == "amd"]
        want = [t.end_ms for t in case.tones if t.kind == "beep"]
        got = [t.end_ms for t in r.tones or () if t.kind == "beep"]
        near = [g - w for w in want for g in got if abs(g - w) <= BEEP_MATCH_MS]
        finals = [o.text for o in record.observations if o.kind == "final" and o.text]
        rows.append(
            {
                "file": case.file, "kind": case.kind, "expected": case.expected, "call_id": record.call_id,
                "got": r.decision.result, "reason": r.decision.reason, "correct": r.correct,
                "decision_ms": r.decision.decision_ms if amd else None,
                "features": dict(r.decision.features), "amd_events": len(amd),
                # the amd event received, after the message carrying its decision_ms left the bench
                "amd_event_ms": round((amd[0].got_ns - record.sent_at(r.decision.decision_ms)) / 1e6, 1)
                if amd and record.send_ns else None,
                "tones": [{"kind": t.kind, "start_ms": t.start_ms, "end_ms": t.end_ms} for t in r.tones or ()],
                "beep_end_error_ms": min(near, key=abs) if near else None,
                "beeps_expected": len(want), "transcript": " / ".join(finals), "stats": record.stats,
                "errors": record.errors, "refused": record.refused,
            }
        )  # fmt: skip
    return rows


def report(cases: Sequence[Case], records: Sequence[CallRecord], run: dict[str, Any]) -> str:
    results = [_result(c, r) for c, r in zip(cases, records, strict=True)]
    rows = rows_of(cases, records)
    n = len(results)
    lines = [
        f"{n} cases through the farm, {run['calls']} calls at a time, URL query {run['query']!r}, real time "
        f"(wall {run['wall_s']:g} s, {run['call_seconds']:g} call-seconds; {run['refusals']} refusals by the "
        "farm's admission, each tried again 1 s later)",
        "",
    ]
    conf = Counter((r.case.expected, r.decision.result) for r in results)
    lines += _table(AMD_RESULTS, (*AMD_RESULTS, "none"), conf, "expected \\ got")
    lines.append(f"correct: {sum(r.correct for r in results)}/{n}; without an amd event: {conf_none(results)}")
    multi = sum(1 for row in rows if row["amd_events"] > 1)
    lines.append(f"calls with more than one amd event: {multi}")
    lines += ["", "kind -> got (reason): count"]
    by_kind: dict[str, Counter[str]] = {}
    for r in results:
        by_kind.setdefault(r.case.kind, Counter())[f"{r.decision.result} ({r.decision.reason})"] += 1
    lines += [f"  {k:<19} " + ", ".join(f"{x}: {c}" for x, c in v.most_common()) for k, v in by_kind.items()]
    lines += ["", "decision time, ms from answer       n   p50   p95"]
    lines += _times([r for r in results if r.decision is not _NONE])
    lag = [row["amd_event_ms"] for row in rows if row["amd_event_ms"] is not None]
    lines.append(f"  amd event received after its decision_ms audio left the bench: p50 {_pct(lag, 50)} ms, "
                 f"p95 {_pct(lag, 95)} ms")  # fmt: skip
    live = [row for row in rows if row["reason"] in TRANSCRIPT_REASONS]
    lines += ["", f"decided by the transcript rules (live only: the offline run has no ASR): {len(live)}"]
    lines += [f"  {row['file']:<30} {row['got']} ({row['reason']}) at {row['decision_ms']} ms: "
              f"{str(row['features'].get('text', row['transcript']))[:80]!r}" for row in live]  # fmt: skip
    lines += _tone_lines(results)
    lines.append("  (live: 'kept by the decider' = the first beep event of a call decided machine)")
    wrong = [row for row in rows if not row["correct"]]
    lines += ["", f"decided wrong: {len(wrong)}"]
    for row in wrong:
        tones = ", ".join(f"{t['kind']} {t['start_ms']}-{t['end_ms']}" for t in row["tones"]) or "none"
        lines.append(f"  {row['file']:<30} {row['got']} ({row['reason']}) at {row['decision_ms']} ms; "
                     f"tones: {tones}; heard: {row['transcript'][:60]!r}")  # fmt: skip
    bad = [row for row in rows if row["errors"] or row["refused"]]
    if bad:
        lines += ["", f"calls with errors or refused: {len(bad)}"]
        lines += [f"  {row['file']}: {row['refused'] or '; '.join(row['errors'])[:120]}" for row in bad[:20]]
    return "\n".join(lines)


def conf_none(results: Sequence[Result]) -> int:
    return sum(1 for r in results if r.decision is _NONE)


def worker_cpu(run: dict[str, Any]) -> float | None:
    """The workers' CPU seconds per call-second of a run (None: its processes were not watched)."""
    procs = run.get("procs")
    return None if not procs or "worker" not in procs["roles"] else float(procs["roles"]["worker"]["cpu_s_per_call_s"])


def cost_line(on: dict[str, Any], off: dict[str, Any]) -> str:
    a, b = worker_cpu(on), worker_cpu(off)
    if a is None or b is None:
        return "cost: the farm's processes were not watched (--start-farm, --farm-log or --pid)"
    diff = a - b
    return (
        f"cost, workers' CPU s per call-second, same {on['cases']} cases on one farm: AMD + tones {a:.4f}, "
        f"neither (?tones=0) {b:.4f}; difference {diff * 1000:+.1f} ms per call-second "
        f"({100 * diff / b:+.1f} % of the calls' cost without them)"
    )


def vad_flags(pcm: Any, vad_rate: int = 16000) -> list[bool]:
    """The worker's VAD flag of each 20 ms frame of 8 kHz audio (first onset window held)."""
    cfg = VadConfig()
    vad = Vad(vad_rate, cfg)
    up = soxr.resample(pcm, 8000, vad_rate, quality="QQ").astype("<i2").tobytes()
    held = cfg.onset_window_ms // FRAME_MS + 1
    n = len(up) // vad.frame_bytes
    return [i >= held and vad.is_voiced(up[i * vad.frame_bytes : (i + 1) * vad.frame_bytes]) for i in range(n)]


def micro(cases: Sequence[Case], corpus_dir: Path, repeats: int = 3) -> dict[str, Any]:
    """CPU (process_time) of CallAnalysis per audio second: tones alone, AMD + tones, each
    with the tone detector fed TONE_BLOCK_MS at a time (as calls run) and 20 ms at a time
    (the lever off), all interleaved per case; the median of ``repeats`` passes."""
    block = 8000 * FRAME_MS // 1000
    runs = [
        (f"{what}{suffix}", options, block_ms)
        for what, options in (("tones", Options(None, True)), ("amd_tones", Options(AmdConfig(), True)))
        for suffix, block_ms in (("", TONE_BLOCK_MS), ("_20ms", FRAME_MS))
    ]
    cpu: dict[str, list[float]] = {key: [0.0] * repeats for key, _, _ in runs}
    cpu["vad"] = [0.0]
    audio_s = 0.0
    for case in cases:
        pcm = _read_8k(Path(corpus_dir) / case.file)
        t0 = time.process_time()
        flags = vad_flags(pcm)
        cpu["vad"][0] += time.process_time() - t0  # for scale: the VAD runs for ASR anyway
        audio_s += len(pcm) / 8000
        for rep in range(repeats):
            for key, options, block_ms in runs:
                t0 = time.process_time()
                analysis = CallAnalysis(8000, options, 0, False, tone_block_ms=block_ms)
                for k in range(min(len(flags), len(pcm) // block)):
                    analysis.on_audio(pcm[k * block : (k + 1) * block])
                    analysis.on_frame(k * FRAME_MS, flags[k])
                analysis.on_end()
                cpu[key][rep] += time.process_time() - t0
    per_s = {f"{k}_ms_per_s": round(1000 * statistics.median(v) / audio_s, 3) for k, v in cpu.items()}
    return {"cases": len(cases), "audio_s": round(audio_s, 1), "repeats": repeats, **per_s}


def micro_line(m: dict[str, Any]) -> str:
    lo, hi = (100 * m["amd_tones_ms_per_s"] / asr for asr in reversed(ASR_MS_PER_S))
    return (
        f"CallAnalysis alone (process_time, median of {m['repeats']} passes over {m['cases']} cases, "
        f"{m['audio_s']:g} s of 8 kHz audio in 20 ms blocks, the tones fed {TONE_BLOCK_MS} ms at a time): tones "
        f"{m['tones_ms_per_s']:.2f} ms CPU per audio second, AMD + tones {m['amd_tones_ms_per_s']:.2f} ms/s "
        f"(fed 20 ms at a time: {m['tones_20ms_ms_per_s']:.2f} and {m['amd_tones_20ms_ms_per_s']:.2f}; "
        f"webrtcvad at 16 kHz, which runs anyway, "
        f"{m['vad_ms_per_s']:.2f} ms/s); against the ASR's {ASR_MS_PER_S[0]:g}-{ASR_MS_PER_S[1]:g} ms per "
        f"call-second (bench/RESULTS.md): {lo:.1f}-{hi:.1f} %"
    )


def main(args: argparse.Namespace) -> int:
    """``farm bench --amd``'s run (args from bench/cli.py's parser)."""
    from bench.procs import pids_from_args
    from bench.report import write_json
    from bench.run import machine_info, start_farm

    corpus = Path(args.amd)
    cases = generate(corpus, args.count, args.seed)
    doc: dict[str, Any] = {"machine": machine_info(), "argv": sys.argv[1:], "corpus": str(corpus)}
    out: list[str] = []
    if not args.micro_only:
        with contextlib.ExitStack() as stack:
            target, events, pids = args.target, args.events, pids_from_args(args.farm_log, args.pid)
            if args.start_farm:
                log = Path(tempfile.mkdtemp(prefix="farm-bench-amd-")) / "farm.log"
                print(f"farm log: {log}", file=sys.stderr)
                farm = stack.enter_context(start_farm(args.workers, log, args.farm_arg))
                target, events, pids = farm.url, farm.events, {**farm.pids(), **pids}
            progress = not args.no_progress
            records, run = asyncio.run(run_cases(cases, corpus, target, events, args.calls, "?amd=1", pids,
                                                 progress=progress))  # fmt: skip
            doc["run"], doc["cases"] = run, rows_of(cases, records)
            out.append(report(cases, records, run))
            if args.cost:
                time.sleep(2.0)  # the last calls' recognizers go
                _, off = asyncio.run(run_cases(cases, corpus, target, events, args.calls, "?tones=0", pids,
                                               tag="off", progress=progress))  # fmt: skip
                doc["off"] = off
                out += ["", cost_line(run, off)]
    if args.micro or args.micro_only:  # after the farm is gone: nothing else of ours on the CPU
        doc["micro"] = micro(cases, corpus)
        out += ["", micro_line(doc["micro"])]
    print("\n".join(out))
    if args.json:
        write_json(args.json, doc)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0
