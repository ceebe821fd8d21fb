"""Paced many-call load against a running farm: latency per stage and memory.

    python -m bench.load --url ws://127.0.0.1:8080 --events tcp://127.0.0.1:5556 \
        --calls 12 --duration 60 --wav tests/data/ko_dialog_8k.wav --pids-from /tmp/farm.log

Every call streams the WAV file in a loop, paced in real time like mod_audio_stream
(20 ms binary frames), each call starting at a random offset so the calls are not in
lockstep. The farm's own stage stamps (CLOCK_MONOTONIC, shared by every process of
the host) give the latencies:

* onset -> speech_start: ``publish - recv`` of speech_start, where ``recv`` is the
  arrival of the first voiced frame (so it includes the VAD's onset window);
* end of speech -> final: ``publish - recv`` of VAD finals, where ``recv`` is the
  arrival of the last frame the VAD counted as speech (webrtcvad itself stretches
  voicing by ~100 ms, see workers/vad.py, so the true figure is higher by that);
* subscriber delay: the time this process received the event minus ``publish``.

A call "keeps real time" when no overrun happened and its end-of-speech -> final
delay does not grow over the run (last third vs first third of its finals).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import statistics
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from farm.client import Subscription
from farm.sender import read_wav, send_pcm


__all__ = ["run_load", "main"]


@dataclass
class CallStats:
    call_id: str
    onset: list[float] = field(default_factory=list)  # ms
    eos_final: list[float] = field(default_factory=list)  # ms
    subscriber: list[float] = field(default_factory=list)  # ms
    finals: int = 0
    overruns: int = 0
    errors: list[str] = field(default_factory=list)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def _proc_kb(path: str, field: str) -> int:
    try:
        text = Path(path).read_text()
    except OSError:
        return 0
    m = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) if m else 0


def pss_kb(pid: int) -> int:
    """Proportional set size of a process (shared pages split among sharers)."""
    return _proc_kb(f"/proc/{pid}/smaps_rollup", "Pss")


def rss_kb(pid: int) -> int:
    return _proc_kb(f"/proc/{pid}/status", "VmRSS")


def farm_pids(log_text: str) -> dict[str, list[int]]:
    """Pids of a node's processes, from the lines ``farm up`` logs."""
    roles: dict[str, list[int]] = {"worker": [], "broker": [], "ingress": [], "supervisor": []}
    for pid in re.findall(r"worker \d+ \(pid (\d+)\) started", log_text):
        roles["worker"].append(int(pid))
    for role in ("broker", "ingress"):
        roles[role] = [int(p) for p in re.findall(rf"started {role} \(pid (\d+)\)", log_text)]
    roles["supervisor"] = [int(p) for p in re.findall(r"farm up \(pid (\d+)\)", log_text)]
    return {k: [p for p in v if Path(f"/proc/{p}").exists()] for k, v in roles.items()}


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    import os

    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _one_call(args: argparse.Namespace, pcm: bytes, rate: int, channels: int, stats: CallStats) -> None:
    # Random start offset within the file, whole 20 ms frames.
    frame = rate * 2 * channels // 50
    offset = random.randrange(0, max(1, len(pcm) // frame)) * frame
    loops = max(1, int(args.duration * rate * 2 * channels / len(pcm)) + 1)
    audio = (pcm * (loops + 1))[offset : offset + int(args.duration * rate * 2 * channels) // frame * frame]
    await asyncio.sleep(random.uniform(0, args.stagger))
    url = f"{args.url.rstrip('/')}/{stats.call_id}?rate={rate}&channels={channels}"
    async with Subscription(args.events, stats.call_id) as sub:
        sending = asyncio.create_task(send_pcm(url, audio, rate=rate, channels=channels, realtime=True))
        while True:
            try:
                event = await sub.next(timeout=args.duration + 60)
            except TimeoutError:
                stats.errors.append("no call_end")
                break
            got = time.monotonic_ns()
            t = event.stamps
            if "publish" in t:
                stats.subscriber.append((got - t["publish"]) / 1e6)
            if event.type == "speech_start" and "recv" in t:
                stats.onset.append((t["publish"] - t["recv"]) / 1e6)
            elif event.type == "final":
                stats.finals += 1
                if event.get("reason") in ("vad", "end") and "recv" in t:
                    stats.eos_final.append((t["publish"] - t["recv"]) / 1e6)
            elif event.type == "overrun":
                stats.overruns += 1
            elif event.type == "error":
                stats.errors.append(str(event.get("reason")))
            elif event.type == "call_end":
                break
        await sending


async def run_load(args: argparse.Namespace) -> dict[str, Any]:
    pcm, rate, channels = read_wav(args.wav)
    log_text = Path(args.pids_from).read_text() if args.pids_from else ""
    pids = farm_pids(log_text)
    cpu0 = {p: cpu_seconds(p) for ps in pids.values() for p in ps}
    calls = [CallStats(f"bench-{uuid.uuid4().hex[:12]}") for _ in range(args.calls)]
    t0 = time.monotonic()
    memory_peak: dict[str, int] = {}

    async def sample_memory() -> None:
        while True:
            await asyncio.sleep(2)
            pss = sum(pss_kb(p) for p in pids["worker"])
            memory_peak["workers_pss_kb"] = max(memory_peak.get("workers_pss_kb", 0), pss)

    sampler = asyncio.create_task(sample_memory())
    await asyncio.gather(*(_one_call(args, pcm, rate, channels, c) for c in calls))
    sampler.cancel()
    wall = time.monotonic() - t0
    cpu = {role: sum(cpu_seconds(p) - cpu0.get(p, 0) for p in ps) for role, ps in pids.items()}

    def drift(c: CallStats) -> float:
        third = len(c.eos_final) // 3
        if third < 1:
            return 0.0
        return statistics.median(c.eos_final[-third:]) - statistics.median(c.eos_final[:third])

    onset = [v for c in calls for v in c.onset]
    eos = [v for c in calls for v in c.eos_final]
    sub = [v for c in calls for v in c.subscriber]
    kept = [c for c in calls if not c.overruns and not c.errors and drift(c) < 250]
    return {
        "calls": args.calls,
        "duration_s": args.duration,
        "wav": args.wav,
        "rate": rate,
        "wall_s": round(wall, 1),
        "onset_to_speech_start_ms": {q: round(percentile(onset, q), 1) for q in (50, 95, 99, 100)},
        "end_of_speech_to_final_ms": {q: round(percentile(eos, q), 1) for q in (50, 95, 99, 100)},
        "subscriber_delay_ms": {q: round(percentile(sub, q), 2) for q in (50, 95)},
        "samples": {"speech_start": len(onset), "final_after_eos": len(eos)},
        "finals": sum(c.finals for c in calls),
        "overruns": sum(c.overruns for c in calls),
        "errors": [e for c in calls for e in c.errors][:10],
        "calls_keeping_real_time": len(kept),
        "cpu_s_per_call_s": {role: round(s / (args.calls * args.duration), 4) for role, s in cpu.items()},
        "workers_pss_mb_peak": round(memory_peak.get("workers_pss_kb", 0) / 1024, 1),
        "workers_rss_mb_now": round(sum(rss_kb(p) for p in pids["worker"]) / 1024, 1),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="ws://127.0.0.1:8080")
    p.add_argument("--events", default="tcp://127.0.0.1:5556")
    p.add_argument("--calls", type=int, default=8)
    p.add_argument("--duration", type=float, default=30.0, help="seconds of audio per call")
    p.add_argument("--stagger", type=float, default=2.0, help="calls start within this many seconds")
    p.add_argument("--wav", default="tests/data/ko_dialog_8k.wav")
    p.add_argument("--pids-from", default="", help="the farm's log file, to find its processes for CPU and memory")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    random.seed(args.seed)
    print(json.dumps(asyncio.run(run_load(args)), indent=2))


if __name__ == "__main__":
    main()
