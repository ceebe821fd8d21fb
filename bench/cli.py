"""``farm bench`` / ``python -m bench``: load a farm (or vosk-server) with emulated calls.

farm bench --start-farm --workers 2 --calls 20 --duration 60 --out results/run.json
farm bench --start-farm --workers 2 --ramp --duration 60 --out results/ramp.json
farm bench --target ws://127.0.0.1:2700 --protocol vosk --calls 4 --duration 30
farm bench --start-farm --protocol socket_audio --calls 6 --duration 60 --out results/barge-in.json
farm bench --rtf
farm bench --amd /tmp/amd200 --start-farm --workers 2 --calls 10 --cost --micro --json results/amd-live.json
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.audio import CORPORA
from bench.procs import pids_from_args
from bench.senders import PROTOCOLS
from farm.native import choose_blas_core


__all__ = ["main", "build_parser", "config_from_args"]


def build_parser(prog: str = "farm bench") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    what = p.add_argument_group("what to run")
    what.add_argument(
        "--calls", type=int, default=None, help="concurrent calls (default 20, --amd 10; 0: the idle server's cost)"
    )
    what.add_argument("--duration", type=float, default=60.0, help="seconds of audio per call (default %(default)s)")
    what.add_argument("--ramp", action="store_true", help="raise the number of calls until the SLO breaks")
    what.add_argument(
        "--ramp-calls", default="", help="ramp steps, e.g. 2,4,8,12 (default: --ramp-start by --ramp-step)"
    )
    what.add_argument("--ramp-start", type=int, default=2)
    what.add_argument("--ramp-step", type=int, default=2)
    what.add_argument("--ramp-max", type=int, default=200)
    what.add_argument("--keep-going", action="store_true", help="ramp: run every step even after the SLO broke")
    what.add_argument("--rtf", action="store_true", help="measure the model's single-stream CPU real-time factor")
    what.add_argument(
        "--soak", type=float, default=0.0, metavar="SECONDS", help="waves of --calls calls this long (bench/soak.py)"
    )
    what.add_argument("--sample-s", type=float, default=30.0, help="--soak: seconds between samples (default 30)")
    what.add_argument(
        "--decoder",
        action="append",
        default=[],
        metavar="beam=B,max-active=N",
        help="--rtf: also measure with these decoder options (repeatable; the model's own always first)",
    )
    what.add_argument(
        "--graph",
        action="append",
        default=[],
        metavar="MODEL_DIR",
        help="--rtf: also measure this model directory (a graph compiled by farm graph), same transcripts or not",
    )
    what.add_argument(
        "--resampler",
        action="append",
        default=[],
        choices=("LQ", "MQ", "HQ", "VHQ", "none"),
        help="--rtf at 8 kHz: also measure with this soxr quality instead of the farm's QQ (none: Kaldi's own)",
    )

    amd = p.add_argument_group("answering machines (--amd: bench/amd_live.py)")
    amd.add_argument("--amd", default="", metavar="CORPUS_DIR", help="run the AMD corpus (made here if needed)")
    amd.add_argument("--count", type=int, default=200, help="--amd: corpus cases (default %(default)s)")
    amd.add_argument("--cost", action="store_true", help="--amd: the same calls again with ?tones=0 (CPU on/off)")
    amd.add_argument("--micro", action="store_true", help="--amd: also time CallAnalysis alone over the corpus")
    amd.add_argument("--micro-only", action="store_true", help="--amd: only that (no farm)")
    amd.add_argument("--json", default="", help="--amd: JSON file with every case's result")

    server = p.add_argument_group("the server")
    server.add_argument("--target", default="ws://127.0.0.1:8080", help="server URL (default %(default)s)")
    server.add_argument("--events", default="tcp://127.0.0.1:5556", help="the farm's event endpoint")
    server.add_argument(
        "--protocol", choices=PROTOCOLS, default="amigniter", help="emulated sender (default %(default)s)"
    )
    server.add_argument("--esl", default="", help="socket_audio: the farm's outbound Event Socket server, host:port")
    server.add_argument(
        "--commands", default="", help="socket_audio: the farm's command endpoint, e.g. tcp://127.0.0.1:5557"
    )
    server.add_argument("--start-farm", action="store_true", help="start a farm for the run (free loopback ports)")
    server.add_argument("--workers", type=int, default=2, help="--start-farm: worker processes (default %(default)s)")
    server.add_argument("--farm-arg", action="append", default=[], help="--start-farm: extra `farm up` argument")
    server.add_argument("--farm-log", default="", help="log of a running `farm up`: its processes are measured")
    server.add_argument("--pid", action="append", default=[], help="another server process to measure: PID[:ROLE]")

    audio = p.add_argument_group("the calls")
    audio.add_argument("--rate", type=int, choices=(8000, 16000), default=8000, help="audio rate (default %(default)s)")
    audio.add_argument(
        "--speech-fraction", type=float, default=0.4, help="share of caller speech (default %(default)s)"
    )
    audio.add_argument("--seed", type=int, default=1, help="random offsets, sentences and pauses (default %(default)s)")
    audio.add_argument(
        "--corpus",
        choices=tuple(CORPORA),
        default="mixed",
        help="the caller's sentences: espeak, pauses (with pauses inside), recorded (human), mixed (default)",
    )
    audio.add_argument("--stagger", type=float, default=2.0, help="calls start within this many seconds")
    audio.add_argument("--jitter-ms", type=float, default=0.0, help="each frame leaves up to this much late")
    audio.add_argument("--burst-ms", type=int, default=40, help="sptmru message size (40 or 80 ms)")
    audio.add_argument("--vosk-chunk-ms", type=int, default=20, help="vosk message size (default %(default)s)")
    audio.add_argument(
        "--prompt-ms", type=int, default=3000, help="socket_audio: prompt played before each utterance (ms)"
    )
    audio.add_argument(
        "--prompt-lead-ms", type=int, default=1000, help="socket_audio: the caller speaks this far into it (ms)"
    )
    audio.add_argument("--vosk-reset", action="store_true", help='vosk: send {"reset" : 1} at each end of speech')

    slo = p.add_argument_group("the SLO (ramp)")
    slo.add_argument(
        "--slo-final-ms", type=float, default=400.0, help="p95 end of speech -> final (default %(default)s)"
    )
    slo.add_argument(
        "--slo-onset-ms", type=float, default=150.0, help="p95 onset -> speech_start (default %(default)s)"
    )
    slo.add_argument("--slo-max-lost", type=int, default=0, help="audio messages that may be lost (default 0)")
    slo.add_argument("--no-slo-real-time", action="store_true", help="do not require every call to keep real time")
    slo.add_argument("--lag-limit-ms", type=float, default=1000.0, help="a call trailing more is behind real time")

    out = p.add_argument_group("output")
    out.add_argument("--out", default="", help="JSON file with every sample; PNGs are written next to it")
    out.add_argument("--no-plot", action="store_true")
    out.add_argument("--no-progress", action="store_true")
    return p


def config_from_args(args: argparse.Namespace, **override: Any) -> Any:
    from bench.run import BenchConfig, Slo

    kw: dict[str, Any] = dict(
        protocol=args.protocol,
        target=args.target,
        events=args.events,
        duration_s=args.duration,
        rate=args.rate,
        speech_fraction=args.speech_fraction,
        corpus=args.corpus,
        seed=args.seed,
        stagger_s=args.stagger,
        jitter_ms=args.jitter_ms,
        burst_ms=args.burst_ms,
        vosk_chunk_ms=args.vosk_chunk_ms,
        vosk_reset=args.vosk_reset,
        lag_limit_ms=args.lag_limit_ms,
        esl=args.esl,
        commands=args.commands,
        prompt_ms=args.prompt_ms,
        prompt_lead_ms=args.prompt_lead_ms,
        slo=Slo(args.slo_final_ms, args.slo_onset_ms, args.slo_max_lost, not args.no_slo_real_time),
        pids=pids_from_args(args.farm_log, args.pid),
        progress=not args.no_progress,
    )
    kw.update(override)
    return BenchConfig(**kw)


def ramp_steps(args: argparse.Namespace) -> list[int]:
    if args.ramp_calls:
        return [int(x) for x in args.ramp_calls.split(",") if x.strip()]
    return list(range(args.ramp_start, args.ramp_max + 1, max(1, args.ramp_step)))


def _run(
    args: argparse.Namespace,
    cfg: Any,
    pids: Callable[[], dict[int, str]],
    settle: Callable[[], float] | None = None,
) -> dict[str, Any]:
    from bench.report import ramp_report, step_report
    from bench.run import ramp, run_step

    if args.soak:
        from bench.soak import soak, soak_report

        result = asyncio.run(soak(cfg, args.calls, args.soak, args.sample_s, pids))
        print(soak_report(result))
        return result

    if args.ramp:
        result = ramp(cfg, ramp_steps(args), keep_going=args.keep_going, settle=settle)
        print(ramp_report(result))
        return result
    step = asyncio.run(run_step(cfg, args.calls))
    print(step_report(step))
    return {"steps": [step]}


def _outputs(args: argparse.Namespace, doc: dict[str, Any]) -> None:
    from bench.report import write_json

    if not args.out:
        return
    write_json(args.out, doc)
    print(f"wrote {args.out}", file=sys.stderr)
    if args.no_plot or args.soak or doc["result"]["steps"][-1].get("idle"):
        return
    from bench import plots

    stem = Path(args.out).with_suffix("")
    steps = doc["result"]["steps"]
    last = steps[-1]
    print(f"wrote {plots.cdf_plot(last, f'{stem}-cdf.png')}", file=sys.stderr)
    if args.ramp:
        print(f"wrote {plots.ramp_plot(doc['result'], f'{stem}-ramp.png', args.slo_final_ms)}", file=sys.stderr)


def main(argv: list[str] | None = None, prog: str = "farm bench") -> int:
    args = build_parser(prog).parse_args(argv)
    # Vosk in this process (--rtf, the AMD corpus) on the kernels a node picks (farm/native.py).
    choose_blas_core()
    if args.calls is None:
        args.calls = 10 if args.amd else 20
    if args.amd:
        from bench.amd_live import main as amd_main

        return amd_main(args)
    if args.rtf:
        from bench.rtf import main as rtf_main

        return rtf_main(args)
    if args.protocol == "socket_audio" and not args.start_farm and not (args.esl and args.commands):
        print("--protocol socket_audio needs --start-farm, or --esl and --commands", file=sys.stderr)
        return 2
    from bench.run import machine_info, start_farm, wait_ready

    if args.start_farm:
        log = Path(tempfile.mkdtemp(prefix="farm-bench-")) / "farm.log"
        print(f"farm log: {log}", file=sys.stderr)
        with start_farm(args.workers, log, args.farm_arg, vosk=args.protocol == "vosk") as farm:
            target = farm.vosk_url if args.protocol == "vosk" else farm.url
            cfg = config_from_args(
                args,
                target=target,
                events=farm.events,
                esl=f"127.0.0.1:{farm.esl_port}",
                commands=farm.commands,
                pids={**farm.pids(), **pids_from_args(args.farm_log, args.pid)},
            )
            result = _run(args, cfg, settle=lambda: wait_ready(farm.url), pids=farm.pids)
    else:
        cfg = config_from_args(args)
        result = _run(args, cfg, pids=lambda: pids_from_args(args.farm_log, args.pid))
    doc = {
        "machine": machine_info(),
        "argv": sys.argv[1:] if argv is None else argv,
        "config": _jsonable(cfg),
        "result": result,
    }
    _outputs(args, doc)
    return 0


def _jsonable(cfg: Any) -> dict[str, Any]:
    from dataclasses import asdict

    d = asdict(cfg)
    d["pids"] = {str(k): v for k, v in d["pids"].items()}
    return d
