"""Percentiles and the terminal tables of a run or a ramp."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any


__all__ = ["QUANTILES", "percentile", "summarize", "table", "stage_table", "ramp_table", "fmt_ms", "cer"]

QUANTILES = (50, 95, 99, 100)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile with linear interpolation between order statistics
    (numpy's default); NaN for no values. ``q=100`` is the maximum."""
    if not values:
        return math.nan
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is not in [0, 100]")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize(values: Sequence[float]) -> dict[str, float]:
    """``{"n", "p50", "p95", "p99", "max"}`` of latency samples in ms."""
    out: dict[str, float] = {"n": len(values)}
    for q in QUANTILES:
        out["max" if q == 100 else f"p{q}"] = round(percentile(values, q), 1)
    return out


def fmt_ms(v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.0f}" if v >= 10 else f"{v:.1f}" if v >= 1 else f"{v:.3f}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]

    def fmt(cells: Sequence[str]) -> str:
        # first column (names) left-aligned, figures right-aligned
        pairs = enumerate(zip(cells, widths, strict=True))
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in pairs)

    line = fmt(header)
    return "\n".join([line, "-" * len(line), *(fmt(r) for r in rows)])


def stage_table(stages: Mapping[str, Mapping[str, float]], labels: Mapping[str, str]) -> str:
    """One row per stage with samples: n, p50, p95, p99, max (ms)."""
    rows = []
    for key, label in labels.items():
        s = stages.get(key)
        if not s or not s.get("n"):
            continue
        rows.append([label, str(int(s["n"])), *(fmt_ms(s[q]) for q in ("p50", "p95", "p99", "max"))])
    return table(["stage (ms)", "n", "p50", "p95", "p99", "max"], rows)


def ramp_table(steps: Sequence[Mapping[str, Any]]) -> str:
    """One row per number of calls: the SLO figures and the verdict."""
    rows = []
    for s in steps:
        st = s["stages"]
        eos, onset = st.get("eos_final", {}), st.get("onset_speech_start", {})
        cpu = sum(r["cpu_s_per_call_s"] for r in s["procs"]["roles"].values()) if s.get("procs") else math.nan
        rows.append(
            [
                str(s["calls"]),
                f"{fmt_ms(eos.get('p50'))} / {fmt_ms(eos.get('p95'))}",
                f"{fmt_ms(onset.get('p50'))} / {fmt_ms(onset.get('p95'))}",
                f"{s['real_time_calls']}/{s['calls']}",
                str(s["lost_messages"]),
                "-" if math.isnan(cpu) else f"{cpu:.3f}",
                "held" if s["slo"]["held"] else "broke: " + ", ".join(s["slo"]["broken"]),
            ]
        )
    header = ["calls", "eos->final p50/p95", "onset->start p50/p95", "real time", "lost", "CPU s/call-s", "SLO"]
    return table(header, rows)


def cer(said: str, reference: str) -> float:
    """Character error rate, spaces ignored (Levenshtein distance / reference length)."""
    a, b = said.replace(" ", ""), reference.replace(" ", "")
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[len(b)] / max(1, len(b))
