"""How many paced calls one node holds: start a farm, raise the load, find the limit.

    python -m bench.capacity --workers 2 --calls 4,8,12,16 --duration 45 \
        --wav tests/data/ko_dialog_8k.wav --out bench/results/capacity.json

For each number of calls it runs :mod:`bench.load` against a fresh-enough node (the
same node for the whole sweep, started here with ``farm up``) and says whether the
SLO held: p95 end-of-speech -> final and p95 onset -> speech_start under the
bounds, no audio dropped, every call keeping real time. Prints a markdown table and
writes every figure as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.load import run_load


__all__ = ["main"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_farm(workers: int, extra: list[str], log: Path) -> tuple[subprocess.Popen[bytes], str, str]:
    port, events = _free_port(), _free_port()
    cmd = [sys.executable, "-m", "farm.cli", "up", "--workers", str(workers), "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--events", f"tcp://127.0.0.1:{events}", *extra]
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 90
    while "farm up (pid" not in log.read_text(errors="replace") or log.read_text().count(") ready") < workers:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"farm did not start:\n{log.read_text()[-2000:]}")
        time.sleep(0.2)
    return proc, f"ws://127.0.0.1:{port}", f"tcp://127.0.0.1:{events}"


def held(r: dict[str, Any], args: argparse.Namespace) -> bool:
    return bool(
        r["end_of_speech_to_final_ms"][95] <= args.slo_final_ms
        and r["onset_to_speech_start_ms"][95] <= args.slo_onset_ms
        and r["overruns"] == 0
        and not r["errors"]
        and r["calls_keeping_real_time"] == r["calls"]
    )


def table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    out = [
        "| calls | onset->speech_start p50/p95 ms | end of speech->final p50/p95/max ms | real time | "
        "overruns | worker CPU s per call-s | workers PSS MB | SLO |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        o, f = r["onset_to_speech_start_ms"], r["end_of_speech_to_final_ms"]
        cpu = r["cpu_s_per_call_s"].get("worker", 0)
        out.append(
            f"| {r['calls']} | {o[50]:.0f} / {o[95]:.0f} | {f[50]:.0f} / {f[95]:.0f} / {f[100]:.0f} | "
            f"{r['calls_keeping_real_time']}/{r['calls']} | {r['overruns']} | {cpu:.3f} | "
            f"{r['workers_pss_mb_peak']:.0f} | {'held' if held(r, args) else 'broke'} |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.capacity", description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--calls", default="4,8,12,16", help="comma-separated numbers of concurrent calls")
    p.add_argument("--duration", type=float, default=45.0)
    p.add_argument("--stagger", type=float, default=5.0)
    p.add_argument("--wav", default="tests/data/ko_dialog_8k.wav")
    p.add_argument("--slo-final-ms", type=float, default=400.0)
    p.add_argument("--slo-onset-ms", type=float, default=150.0)
    p.add_argument("--farm-arg", action="append", default=[], help="extra `farm up` argument (repeatable)")
    p.add_argument("--out", default="")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    import random

    random.seed(args.seed)
    log = Path(tempfile.mkdtemp(prefix="farm-bench-")) / "farm.log"
    proc, url, events = _start_farm(args.workers, args.farm_arg, log)
    rows = []
    try:
        for n in [int(x) for x in args.calls.split(",")]:
            load = argparse.Namespace(
                url=url,
                events=events,
                calls=n,
                duration=args.duration,
                stagger=args.stagger,
                wav=args.wav,
                pids_from=str(log),
            )
            r = asyncio.run(run_load(load))
            rows.append(r)
            print(table([r], args).splitlines()[-1], flush=True)
            time.sleep(2)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    print()
    print(table(rows, args))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"args": vars(args), "runs": rows}, indent=2))


if __name__ == "__main__":
    main()
