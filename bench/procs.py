"""CPU and memory of the server's processes, from /proc, while a run goes on.

CPU is ``utime + stime`` from ``/proc/<pid>/stat`` (threads included), reported per
call-second of audio so runs of different sizes compare. Memory is sampled every
``interval`` seconds: RSS (``VmRSS``) and PSS (``Pss`` of ``smaps_rollup``: shared
pages split among the processes that map them, so the farm's model, loaded once
before the workers fork, is not counted once per worker).
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


__all__ = ["farm_pids", "pids_from_args", "cpu_seconds", "rss_kb", "pss_kb", "ProcMonitor"]

_TICK = os.sysconf("SC_CLK_TCK")


def _kb(path: str, name: str) -> int:
    try:
        text = Path(path).read_text()
    except OSError:
        return 0
    m = re.search(rf"^{name}:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) if m else 0


def pss_kb(pid: int) -> int:
    return _kb(f"/proc/{pid}/smaps_rollup", "Pss")


def rss_kb(pid: int) -> int:
    return _kb(f"/proc/{pid}/status", "VmRSS")


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


def pids_from_args(farm_log: str | None, specs: list[str]) -> dict[int, str]:
    """The processes to measure: the farm's, read from its log, and ``--pid PID[:ROLE]``s."""
    pids = farm_pids(Path(farm_log).read_text(errors="replace")) if farm_log else {}
    for spec in specs:
        pid, _, role = spec.partition(":")
        pids[int(pid)] = role or f"pid-{pid}"
    return pids


def farm_pids(log_text: str) -> dict[int, str]:
    """pid -> role (``supervisor``, ``broker``, ``ingress``, ``worker-N``) from ``farm up``'s log.

    A restarted process appears twice; only the live ones are kept."""
    roles: dict[int, str] = {}
    for pid in re.findall(r"farm up \(pid (\d+)\)", log_text):
        roles[int(pid)] = "supervisor"
    for role in ("broker", "ingress"):
        for pid in re.findall(rf"started {role} \(pid (\d+)\)", log_text):
            roles[int(pid)] = role
    for index, pid in re.findall(r"worker (\d+) \(pid (\d+)\) started", log_text):
        roles[int(pid)] = f"worker-{index}"
    return {p: r for p, r in roles.items() if Path(f"/proc/{p}").exists()}


@dataclass
class _Proc:
    role: str
    cpu0: float
    cpu1: float = 0.0
    rss_kb_peak: int = 0
    pss_kb_peak: int = 0
    pss_kb_idle: int = 0  # when the run started, before any call
    samples: list[tuple[float, int, int]] = field(default_factory=list)  # (s since start, rss, pss)


class ProcMonitor:
    """Samples ``pids`` (pid -> role) from :meth:`start` to :meth:`stop`."""

    def __init__(self, pids: dict[int, str], interval: float = 1.0) -> None:
        self.procs = {pid: _Proc(role, cpu_seconds(pid)) for pid, role in pids.items()}
        self.interval = interval
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.t0 = time.monotonic()
        for pid, p in self.procs.items():
            p.cpu0 = cpu_seconds(pid)
            p.pss_kb_idle = pss_kb(pid)
        self.task = asyncio.create_task(self._sample_forever())

    def _sample(self) -> None:
        now = time.monotonic() - self.t0
        for pid, p in self.procs.items():
            rss, pss = rss_kb(pid), pss_kb(pid)
            if rss:
                p.samples.append((now, rss, pss))
                p.rss_kb_peak, p.pss_kb_peak = max(p.rss_kb_peak, rss), max(p.pss_kb_peak, pss)

    async def _sample_forever(self) -> None:
        while True:
            # smaps_rollup walks every mapping: off the event loop, which paces the calls.
            await asyncio.to_thread(self._sample)
            await asyncio.sleep(self.interval)

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
        self._sample()
        for pid, p in self.procs.items():
            p.cpu1 = cpu_seconds(pid) or p.cpu1

    def report(self, call_seconds: float) -> dict[str, Any]:
        """Per process and per role: CPU seconds per call-second, RSS and PSS (MB, peak and mean)."""
        per_proc: dict[str, dict[str, Any]] = {}
        roles: dict[str, dict[str, float]] = {}
        for pid, p in self.procs.items():
            cpu = max(0.0, p.cpu1 - p.cpu0)
            mean_rss = sum(s[1] for s in p.samples) / len(p.samples) if p.samples else 0
            mean_pss = sum(s[2] for s in p.samples) / len(p.samples) if p.samples else 0
            per_proc[f"{p.role} ({pid})"] = {
                "pid": pid,
                "role": p.role,
                "cpu_s": round(cpu, 2),
                "cpu_s_per_call_s": round(cpu / call_seconds, 4) if call_seconds else 0.0,
                "rss_mb_peak": round(p.rss_kb_peak / 1024, 1),
                "pss_mb_peak": round(p.pss_kb_peak / 1024, 1),
                "pss_mb_idle": round(p.pss_kb_idle / 1024, 1),
                "rss_mb_mean": round(mean_rss / 1024, 1),
                "pss_mb_mean": round(mean_pss / 1024, 1),
                # over time (at most 120 points): is memory flat once warm?
                "pss_mb_series": [[round(t, 1), round(pss / 1024, 1)] for t, _, pss in _thin(p.samples, 120)],
            }
            role = p.role.split("-")[0]
            r = roles.setdefault(
                role, {"processes": 0, "cpu_s": 0.0, "cpu_s_per_call_s": 0.0, "pss_mb_peak": 0.0, "pss_mb_idle": 0.0}
            )
            r["processes"] += 1
            r["cpu_s"] = round(r["cpu_s"] + cpu, 2)
            r["cpu_s_per_call_s"] = round(r["cpu_s_per_call_s"] + (cpu / call_seconds if call_seconds else 0), 4)
            r["pss_mb_peak"] = round(r["pss_mb_peak"] + p.pss_kb_peak / 1024, 1)
            r["pss_mb_idle"] = round(r["pss_mb_idle"] + p.pss_kb_idle / 1024, 1)
        total_pss = sum(v["pss_mb_peak"] for v in roles.values())
        return {
            "processes": per_proc,
            "roles": roles,
            "pss_mb_peak_total": round(total_pss, 1),
            "pss_mb_idle_total": round(sum(v["pss_mb_idle"] for v in roles.values()), 1),
        }


def _thin(samples: list[tuple[float, int, int]], at_most: int) -> list[tuple[float, int, int]]:
    step = max(1, -(-len(samples) // at_most))
    return samples[::step]
