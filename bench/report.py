"""What a run prints in the terminal and writes to its JSON file."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bench.measure import STAGES
from bench.stats import fmt_ms, ramp_table, stage_table, table


__all__ = ["step_report", "step_line", "ramp_report", "write_json"]


def _procs_table(procs: Mapping[str, Any]) -> str:
    rows = [
        [
            name,
            f"{p['cpu_s']:.1f}",
            f"{p['cpu_s_per_call_s']:.4f}",
            f"{p['rss_mb_peak']:.0f}",
            f"{p['pss_mb_peak']:.0f}",
        ]
        for name, p in sorted(procs["processes"].items())
    ]
    return table(["process", "CPU s", "CPU s/call-s", "RSS MB peak", "PSS MB peak"], rows)


def _or_dash(value: object) -> str:
    return "-" if value is None else str(value)


def step_report(step: Mapping[str, Any]) -> str:
    """The full terminal report of one step."""
    if step.get("idle"):
        return "\n".join(
            [
                f"no calls for {step['duration_s']:g} s: the server used {step['cores']:.4f} cores in all",
                "",
                _procs_table(step["procs"]).replace("CPU s/call-s", "cores"),
            ]
        )
    per, pauses, cer = step["finals_per_sentence"], step["finals_per_pause_sentence"], step["cer"]
    lines = [
        f"{step['calls']} calls, {step['protocol']}, {step['rate']} Hz, {step['duration_s']:g} s each, "
        f"{step['corpus']} sentences (wall {step['wall_s']:g} s)",
        "",
        stage_table(step["stages"], STAGES),
        "",
        f"finals per sentence: {_or_dash(per['mean'])} over {per['sentences']} "
        f"({per['split']} split, {per['without_final']} without a final); sentences with pauses inside: "
        f"{_or_dash(pauses['mean'])} over {pauses['sentences']} ({pauses['split']} split); "
        f"CER {_or_dash(cer['mean'])} over {cer['sentences']}",
        f"audio messages: sent {step['messages_sent']}, received {step['messages_received']}, "
        f"lost {step['lost_messages']}; overruns {step['overrun_bytes']} bytes; "
        f"utterances without a final {step['missed_finals']}",
        f"real time: {step['real_time_calls']}/{step['calls']} calls kept up "
        f"(worst lag {fmt_ms(step['worst_lag_ms'])} ms); bench pacing late by at most "
        f"{fmt_ms(step['bench_late_ms_max'])} ms, bench CPU {step['bench_cpu_s_per_call_s']:.4f} s/call-s",
    ]
    if step.get("prompts"):
        lines.append(
            f"barge-in: {step['prompts']} prompts under caller speech, {step['flushes']} flushes; "
            f"flushes while idle {step['flush_idle']}, prompt frames played after a flush "
            f"{step['prompt_after_flush']}, playback violations {len(step['playback_violations'])}"
        )
    if step.get("refused"):
        lines.append(
            f"refused by the server: {step['refused']} calls ("
            + "; ".join(f"{n} x {why}" for why, n in step["refusals"].items())
            + ")"
        )
    if step["errors"]:
        lines.append("errors: " + "; ".join(step["errors"][:5]))
    if step.get("procs"):
        lines += ["", _procs_table(step["procs"]), f"PSS in all: {step['procs']['pss_mb_peak_total']:.0f} MB"]
    slo = step["slo"]
    lines += ["", "SLO held" if slo["held"] else "SLO broken: " + "; ".join(slo["broken"])]
    return "\n".join(lines)


def step_line(step: Mapping[str, Any]) -> str:
    """One line per ramp step, printed as the ramp goes."""
    eos, onset = step["stages"].get("eos_final", {}), step["stages"].get("onset_speech_start", {})
    verdict = "held" if step["slo"]["held"] else "broke (" + "; ".join(step["slo"]["broken"]) + ")"
    return (
        f"{step['calls']:>4} calls: final p95 {fmt_ms(eos.get('p95'))} ms, onset p95 {fmt_ms(onset.get('p95'))} ms, "
        f"{step['real_time_calls']}/{step['calls']} in real time, {step['lost_messages']} lost: {verdict}"
    )


def ramp_report(result: Mapping[str, Any]) -> str:
    return ramp_table(result["steps"]) + f"\n\ncapacity at the SLO: {result['capacity']} calls"


def write_json(path: str | Path, doc: Mapping[str, Any]) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(doc, ensure_ascii=False, separators=(",", ":")))
