"""PNG plots of runs: latency CDFs, a ramp's percentiles and CPU, farm vs vosk-server.

matplotlib is the ``bench`` extra and is imported here only, inside the functions,
so nothing else of the farm needs it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.measure import GROUND_TRUTH, STAGES


__all__ = ["cdf_plot", "cdf_compare", "ramp_plot", "compare_plot"]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server
    import matplotlib.pyplot as plt

    return plt


def _color(key: str) -> str:
    # one colour per stage (or metric) on every chart, whatever the server
    keys = [*STAGES, "cpu"]
    return f"C{keys.index(key) % 10}" if key in keys else "k"


def _cdf(ax: Any, values: Sequence[float], label: str, **kw: Any) -> None:
    xs = sorted(values)
    ys = [(i + 1) / len(xs) for i in range(len(xs))]
    ax.step(xs, ys, where="post", label=f"{label} (n={len(xs)})", **kw)


def cdf_plot(step: Mapping[str, Any], path: str | Path, title: str = "") -> Path:
    """One CDF per stage with samples, log time axis."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for key, label in STAGES.items():
        values = [v for v in step["samples"].get(key, []) if v > 0]
        if values:
            # what the caller's side sees: bold; the farm's internal stages: dashed
            style = {"linewidth": 2.2} if key in GROUND_TRUTH else {"linestyle": "--"}
            _cdf(ax, values, label, color=_color(key), **style)
    ax.set_xscale("log")
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("fraction of samples")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title or f"{step['calls']} calls, {step['protocol']}, {step['rate']} Hz: latency CDF per stage")
    return _save(fig, plt, path)


def cdf_compare(steps: Mapping[str, Mapping[str, Any]], path: str | Path, title: str = "") -> Path:
    """The caller-side stages of several servers at the same number of calls, on one chart."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for (name, step), style in zip(steps.items(), ("-", "--", ":", "-."), strict=False):
        for key in GROUND_TRUTH:
            values = [v for v in step["samples"].get(key, []) if v > 0]
            if values:
                _cdf(ax, values, f"{name}: {STAGES[key]}", linestyle=style, color=_color(key))
    ax.set_xscale("log")
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("fraction of samples")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    calls = next(iter(steps.values()))["calls"]
    ax.set_title(title or f"{calls} calls: " + " vs ".join(steps))
    return _save(fig, plt, path)


def _ramp_axes(ax_lat: Any, ax_cpu: Any, steps: Sequence[Mapping[str, Any]], name: str, style: str) -> None:
    calls = [s["calls"] for s in steps]
    for key, q, marker in (("eos_final", "p95", "o"), ("eos_final", "p50", "."), ("onset_speech_start", "p95", "s")):
        ys = [s["stages"].get(key, {}).get(q) for s in steps]
        if any(y is not None for y in ys):
            ax_lat.plot(
                calls,
                [y if y is not None else float("nan") for y in ys],
                style,
                marker=marker,
                color=_color(key),
                alpha=1.0 if q == "p95" else 0.6,
                label=f"{name} {STAGES[key]} {q}",
            )
    cpu = [
        sum(r["cpu_s_per_call_s"] for r in s["procs"]["roles"].values()) if s.get("procs") else float("nan")
        for s in steps
    ]
    ax_cpu.plot(calls, cpu, style, marker="o", label=f"{name} CPU s per call-second (all processes)")


def ramp_plot(result: Mapping[str, Any], path: str | Path, slo_ms: float | None = None, title: str = "") -> Path:
    """Latency percentiles and CPU per call against the number of calls."""
    return compare_plot({"": result}, path, slo_ms, title)


def compare_plot(
    results: Mapping[str, Mapping[str, Any]], path: str | Path, slo_ms: float | None = None, title: str = ""
) -> Path:
    """Several ramps (e.g. ``{"farm": …, "vosk-server": …}``) on one chart."""
    plt = _pyplot()
    fig, (ax_lat, ax_cpu) = plt.subplots(2, 1, figsize=(9, 8), sharex=True)
    for (name, result), style in zip(results.items(), ("-", "--", ":", "-."), strict=False):
        _ramp_axes(ax_lat, ax_cpu, result["steps"], name, style)
    if slo_ms:
        ax_lat.axhline(slo_ms, color="red", alpha=0.4, label=f"SLO {slo_ms:g} ms")
    ax_lat.set_yscale("log")
    ax_lat.set_ylabel("latency (ms)")
    ax_lat.grid(True, which="both", alpha=0.3)
    ax_lat.legend(fontsize=7)
    ax_cpu.set_xlabel("concurrent calls")
    ax_cpu.set_ylabel("CPU s per call-second")
    ax_cpu.grid(True, alpha=0.3)
    ax_cpu.legend(fontsize=7)
    ax_lat.set_title(title or "latency and CPU against the number of calls")
    return _save(fig, plt, path)


def _save(fig: Any, plt: Any, path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(p, dpi=100)
    plt.close(fig)
    return p
