"""``farm bench --soak SECONDS``: dialer-like calls for a long time; does anything grow?

Calls come in waves: ``--calls`` concurrent calls of ``--duration`` seconds (the bench's
ordinary calls, a new seed per wave), the next wave as soon as one ends, until SECONDS
have passed. Every ``--sample-s`` seconds the soak samples each farm process (read again
from the farm's log, so a restarted one is followed): RSS, PSS and open file
descriptors, and the rings in /dev/shm. Per wave: calls, calls that never got their
``call_end``, lost messages, finals per sentence, the worst lag and end of speech ->
final.

The verdict (:func:`verdict`): after the warm-up (the first third), each role's PSS stays
within ``FLAT`` of where the warm-up left it (the mean of the first and of the last quarter
of the samples after it), every call ends with ``call_end``, and once the last wave is over
no ring of the farm is left and each role holds the file descriptors it held before the
first call (give or take ``FDS_SLACK``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import glob
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from bench.procs import pss_kb, rss_kb
from bench.run import BenchConfig, run_step


__all__ = ["soak", "verdict", "soak_report", "FLAT"]

FLAT = 0.05  # PSS after the warm-up: within 5 % (the capacity and hardening issues' goal)
FDS_SLACK = 2  # idle after the calls vs idle before them (a reconnecting socket may come and go)


def _fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def sample(pids: dict[int, str], t: float) -> dict[str, Any]:
    """One sample: per role (workers summed), RSS and PSS in MB and open fds; the rings of the
    farm's ingress in /dev/shm (farm.ring.segment_name: ``farm-<ingress pid>-<n>``)."""
    roles: dict[str, dict[str, float]] = {}
    for pid, role in pids.items():
        role = "workers" if role.startswith("worker") else role
        r = roles.setdefault(role, {"rss_mb": 0.0, "pss_mb": 0.0, "fds": 0, "procs": 0})
        r["rss_mb"] += rss_kb(pid) / 1024
        r["pss_mb"] += pss_kb(pid) / 1024
        r["fds"] += _fds(pid)
        r["procs"] += 1
    for r in roles.values():
        r["rss_mb"], r["pss_mb"] = round(r["rss_mb"], 1), round(r["pss_mb"], 1)
    rings = sum(len(glob.glob(f"/dev/shm/farm-{pid}-*")) for pid, role in pids.items() if role == "ingress")
    return {"t": round(t, 1), "roles": roles, "rings": rings}


def _wave_summary(step: dict[str, Any], started: float) -> dict[str, Any]:
    details = step["calls_detail"]
    final = step["stages"].get("eos_final", {})
    return {
        "started_s": round(started, 1),
        "calls": step["calls"],
        "no_call_end": sum(1 for d in details if any("no call_end" in e for e in d["errors"])),
        "refused": step["refused"],
        "lost_messages": step["lost_messages"],
        "missed_finals": step["missed_finals"],
        "finals_per_sentence": step["finals_per_sentence"]["mean"],
        "worst_lag_ms": round(step["worst_lag_ms"]),
        "eos_final_p50_ms": final.get("p50"),
        "eos_final_p95_ms": final.get("p95"),
    }


async def soak(
    cfg: BenchConfig, calls: int, seconds: float, sample_s: float, pids: Callable[[], dict[int, str]]
) -> dict[str, Any]:
    t0 = time.monotonic()
    samples = [sample(pids(), 0.0)]  # idle, before the first call

    async def sampler() -> None:
        while True:
            await asyncio.sleep(sample_s)
            samples.append(await asyncio.to_thread(sample, pids(), time.monotonic() - t0))
            print(_sample_line(samples[-1]), file=sys.stderr, flush=True)

    task = asyncio.create_task(sampler())
    waves = []
    try:
        wave = 0
        while time.monotonic() - t0 < seconds:
            started = time.monotonic() - t0
            step = await run_step(dataclasses.replace(cfg, seed=cfg.seed + wave, progress=False), calls)
            waves.append(_wave_summary(step, started))
            print(f"wave {wave}: {waves[-1]}", file=sys.stderr, flush=True)
            wave += 1
        await asyncio.sleep(5)  # the last calls' rings go when their workers are done
        samples.append(await asyncio.to_thread(sample, pids(), time.monotonic() - t0))
    finally:
        task.cancel()
    result = {"calls": calls, "seconds": seconds, "sample_s": sample_s, "waves": waves, "samples": samples}
    result["verdict"] = verdict(result)
    return result


def _sample_line(s: dict[str, Any]) -> str:
    parts = [f"{role} {r['pss_mb']:.0f} MB {r['fds']} fds" for role, r in sorted(s["roles"].items())]
    return f"[{s['t']:7.0f} s] " + ", ".join(parts) + f", rings {s['rings']}"


def verdict(result: dict[str, Any], flat: float = FLAT) -> dict[str, Any]:
    """Flat after the warm-up (the first third of the run), every call ended, nothing left."""
    before, during, end = result["samples"][0], result["samples"][1:-1], result["samples"][-1]
    after = [s for s in during if s["t"] >= result["seconds"] / 3]
    quarter = max(1, len(after) // 4)
    growth: dict[str, float | None] = {}
    for role in sorted({r for s in after for r in s["roles"]}):
        values = [s["roles"][role]["pss_mb"] for s in after if role in s["roles"]]
        first = statistics.mean(values[:quarter]) if len(values) >= 2 * quarter else 0.0
        growth[role] = round((statistics.mean(values[-quarter:]) - first) / first, 4) if first else None
    flat_ok = bool(growth) and all(g is not None and abs(g) <= flat for g in growth.values())
    fds_left = {
        role: end["roles"][role]["fds"] - r["fds"] for role, r in before["roles"].items() if role in end["roles"]
    }
    missing = sum(w["no_call_end"] for w in result["waves"])
    return {
        "pss_growth_after_warmup": growth,
        "flat": flat_ok,
        "calls": sum(w["calls"] - w["refused"] for w in result["waves"]),
        "calls_without_call_end": missing,
        "rings_left": end["rings"],
        "fds_left": fds_left,
        "ok": flat_ok
        and missing == 0
        and end["rings"] == 0
        and all(n <= FDS_SLACK for n in fds_left.values()),
    }


def soak_report(result: dict[str, Any]) -> str:
    v, samples = result["verdict"], result["samples"]
    roles = sorted({r for s in samples for r in s["roles"]})
    lines = [
        f"soak: {result['calls']} calls in waves for {result['seconds']:.0f} s, "
        f"{len(result['waves'])} waves, {v['calls']} calls, {v['calls_without_call_end']} without call_end, "
        f"{v['rings_left']} rings left after the last wave",
        "",
        "| t (s) | " + " | ".join(f"{r} PSS MB | {r} fds" for r in roles) + " | rings |",
        "|---" * (2 * len(roles) + 2) + "|",
    ]
    every = max(1, len(samples) // 12)
    for i in sorted({*range(0, len(samples), every), len(samples) - 1}):
        s = samples[i]
        cells = [
            f"{s['roles'][r]['pss_mb']:.0f} | {s['roles'][r]['fds']}" if r in s["roles"] else "- | -" for r in roles
        ]
        lines.append(f"| {s['t']:.0f} | " + " | ".join(cells) + f" | {s['rings']} |")
    lines += ["", "after the warm-up, PSS from the first to the last quarter; fds after the calls - before them:"]
    for role, g in v["pss_growth_after_warmup"].items():
        lines.append(f"  {role}: PSS {_pct(g)}, fds {v['fds_left'].get(role, 0):+.0f}")
    p95 = [w["eos_final_p95_ms"] for w in result["waves"] if w["eos_final_p95_ms"] is not None]
    lost = sum(w["lost_messages"] for w in result["waves"])
    lines.append(
        f"waves: eos -> final p95 median {statistics.median(p95) if p95 else None} ms, "
        f"worst lag {max((w['worst_lag_ms'] for w in result['waves']), default=0)} ms, lost messages {lost}"
    )
    lines.append(f"verdict: {'ok' if v['ok'] else 'NOT ok'} (flat within {FLAT:.0%}: {v['flat']})")
    return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.1%}"
