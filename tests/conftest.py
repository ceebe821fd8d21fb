"""Shared test fixtures: a real ``farm up`` node, the real model, real speech.

Nothing here mocks a farm component: nodes are real processes started with
``subprocess.Popen(..., start_new_session=True)`` and stopped with real signals, on
loopback sockets. Timeouts are in units of ``MS`` scaled by
``FARM_TESTS_TIMEOUT_FACTOR`` for slow machines.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
import wave
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from farm.client import Subscription
from farm.config import default_model_dir
from farm.native import node_environ
from farm.protocol.events import Event
from farm.sender import SendResult, metadata_for, read_wav, send_pcm

from . import leftovers, netns


MS = 0.001 * float(os.environ.get("FARM_TESTS_TIMEOUT_FACTOR", "1"))
# Every process the tests start inherits this marker, so what outlives them can be found.
SESSION_MARKER = f"FARM_TEST_SESSION={uuid.uuid4().hex}"
os.environ["FARM_TEST_SESSION"] = SESSION_MARKER.split("=", 1)[1]
DATA = Path(__file__).parent / "data"
CAPTURES = Path(__file__).parent / "captures"
TEXTS: dict[str, Any] = json.loads((DATA / "texts.json").read_text()) if (DATA / "texts.json").exists() else {}


def pytest_configure(config: pytest.Config) -> None:
    """Start pytest again on the OpenBLAS kernels and the allocator a node runs Vosk with, as
    ``farm up`` does: the tests' reference decodings must round as the nodes' do, and Kaldi's
    results move with both (farm/native.py). xdist's workers and the nodes inherit them."""
    env = node_environ("auto", "auto", os.environ)
    if env is None:
        return
    capture = config.pluginmanager.getplugin("capturemanager")
    if capture is not None:
        capture.stop_global_capturing()  # give the terminal back before the exec
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "pytest", *config.invocation_params.args], env)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_ports(n: int) -> list[int]:
    """``n`` different free ports: each socket stays bound until all are chosen (one at a
    time, the kernel may hand the same port out twice: a node's two listeners then collide)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]


def metric_value(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample of a ``/metrics`` body (read with prometheus_client's
    parser), or None when it has no such sample."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return None


def http_get(node: Node, path: str, timeout: float = 10.0) -> tuple[int, str]:
    """``GET path`` on the node's HTTP port: the status and body, errors included;
    ``(0, "")`` while nothing listens there."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{node.port}{path}", timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


def farm_segments(pid: int | None = None) -> list[str]:
    names = [n for n in os.listdir("/dev/shm") if n.startswith("farm-")]
    return [n for n in names if pid is None or n.startswith(f"farm-{pid}-")]


def orphan_segments() -> set[str]:
    """Rings whose ingress is gone: left behind (rings of farms still running on the
    machine, other test runs' included, are theirs)."""
    owners = {n: n.split("-")[1] for n in farm_segments()}
    return {n for n, pid in owners.items() if not (pid.isdigit() and _alive(int(pid)))}


@dataclass
class Node:
    """A running ``farm up``: its ports, its log, its processes."""

    proc: subprocess.Popen[bytes]
    port: int
    events: str
    log_path: Path
    args: list[str] = field(default_factory=list)
    esl_port: int = 0  # outbound Event Socket server (mod_socket_audio)
    commands: str = ""  # play/flush command socket
    host: str = "127.0.0.1"
    netns: str = ""  # the network namespace it runs in (tests/netns.py), "" for this one

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def pids(self, role: str) -> list[int]:
        """Pids of one role, read from the node's own log lines."""
        if role == "worker":
            found = re.findall(r"worker \d+ \(pid (\d+)\) started", self.log())
        else:
            found = re.findall(rf"started {role} \(pid (\d+)\)", self.log())
        return [int(p) for p in found if _alive(int(p))]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 40_000 * MS) -> int:
        if self.proc.poll() is None:
            if sig == signal.SIGKILL:  # the supervisor cannot stop its children then: kill them all
                os.killpg(self.proc.pid, signal.SIGKILL)
            else:
                self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            raise


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def start_node(
    tmp_path: Path, *extra: str, workers: int = 2, wait: bool = True, netns: str = "", host: str = "127.0.0.1"
) -> Node:
    """A ``farm up`` on ``host``; in the network namespace ``netns`` (a host of its own,
    tests/netns.py) it listens on the default ports, as a node on its own machine does."""
    port, events_port, esl_port, commands_port = [8080, 5556, 8084, 5557] if netns else free_ports(4)
    log_path = tmp_path / f"farm-{port}.log"
    args = [
        *(["ip", "netns", "exec", netns] if netns else []),
        sys.executable,
        "-m",
        "farm.cli",
        "up",
        "--workers",
        str(workers),
        "--host",
        host,
        "--port",
        str(port),
        "--events",
        f"tcp://{host}:{events_port}",
        "--esl-host",
        host,
        "--esl-port",
        str(esl_port),
        "--commands",
        f"tcp://{host}:{commands_port}",
        # The vosk-server port has a fixed default (2700): off unless a test asks for it.
        *([] if "--vosk-port" in extra else ["--vosk-port", "0"]),
        # Admission refuses calls while recognition is behind or the CPUs are full at what a
        # call measurably costs, which depends on the machine: off unless a test is about it
        # (tests/test_capacity.py).
        *([] if "--admission-lag-ms" in extra else ["--admission-lag-ms", "0"]),
        *([] if "--admission-cpu" in extra else ["--admission-cpu", "0"]),
        # The canary is a call of the node's own every 30 s: off unless a test is about it
        # (tests/test_canary.py), so a test's node serves only the test's calls.
        *([] if "--canary-interval-s" in extra else ["--canary-interval-s", "0"]),
        # Warming recognizers halves a node's start (3 s of 6) and keeps a CPU busy after it;
        # a test's first utterance on a cold one is only slower. Off unless a test is about
        # it (tests/test_supervisor.py's readiness test warms as farm up does).
        *([] if "--recognizer-warm" in extra else ["--recognizer-warm", "0", "--recognizer-warm-later", "0"]),
        *extra,
    ]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    node = Node(
        proc,
        port,
        f"tcp://{host}:{events_port}",
        log_path,
        args,
        esl_port,
        f"tcp://{host}:{commands_port}",
        host,
        netns,
    )
    NODES.append(node)
    if wait:
        wait_ready(node, workers)
    return node


def wait_ready(node: Node, workers: int) -> None:
    """Wait until the node is up and its ``workers`` take calls (/readyz); a node that
    does not get there is killed and its log raised."""
    deadline = time.monotonic() + 60_000 * MS
    while "farm up (pid" not in node.log():
        if node.proc.poll() is not None or time.monotonic() > deadline:
            node.stop(signal.SIGKILL)
            raise RuntimeError(f"farm did not start:\n{node.log()[-3000:]}")
        time.sleep(0.1)
    # Workers register with the broker after warming up; then /readyz says so.
    while node.log().count(") ready") < workers or not _ready(node):
        if node.proc.poll() is not None or time.monotonic() > deadline:
            node.stop(signal.SIGKILL)
            raise RuntimeError(f"farm did not become ready:\n{node.log()[-3000:]}")
        time.sleep(0.05)


def _ready(node: Node) -> bool:
    if node.netns:
        with netns.inside(node.netns):
            return _ready_here(node)
    return _ready_here(node)


def _ready_here(node: Node) -> bool:
    import ssl
    import urllib.request

    scheme, context = "http", None
    if "--tls-cert" in node.args:  # the test's own certificate, for 127.0.0.1
        scheme, context = "https", ssl.create_default_context(cafile=node.args[node.args.index("--tls-cert") + 1])
    try:
        with urllib.request.urlopen(f"{scheme}://{node.host}:{node.port}/readyz", timeout=5, context=context) as r:
            return bool(r.status == 200)
    except OSError:
        return False


NODES: list[Node] = []  # every node this run started: their pids own their rings


def node_pids() -> set[int]:
    pids = set()
    for n in NODES:
        pids.add(n.proc.pid)
        with contextlib.suppress(OSError):
            pids.update(int(p) for p in re.findall(r"\(pid (\d+)\)", n.log()))
    return pids


def _check_leftovers(before: leftovers.Snapshot, what: str) -> None:
    """Fail if ``what`` left processes, rings, listening sockets or network namespaces; then clear them away."""
    left = leftovers.leftovers_since(before, SESSION_MARKER, node_pids(), wait=20_000 * MS)
    if not left:
        return
    for pid, _ in leftovers._marked_processes(SESSION_MARKER.encode()):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    for line in left:
        if line.startswith("ring "):
            with contextlib.suppress(OSError):
                os.unlink(line.split()[1])
        if line.startswith("network namespace "):
            subprocess.run(["ip", "netns", "del", line.split()[2]], capture_output=True, timeout=30)
    pytest.fail(f"{what} left behind:\n" + "\n".join(left), pytrace=False)


@pytest.fixture(scope="session", autouse=True)
def _the_run_leaves_nothing_behind() -> Iterator[None]:
    before = leftovers.snapshot()
    yield
    _check_leftovers(before, "the test run")


@pytest.fixture(scope="module", autouse=True)
def _each_module_stops_what_it_started(request: pytest.FixtureRequest) -> Iterator[None]:
    before = leftovers.snapshot()
    yield
    _check_leftovers(before, request.module.__name__)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """One default farm node shared by a test module."""
    n = start_node(tmp_path_factory.mktemp("farm"))
    yield n
    n.stop()


@dataclass
class CallRun:
    call_id: str
    events: list[Event]
    sent: SendResult | None

    def of(self, type: str) -> list[Event]:
        return [e for e in self.events if e.type == type]

    @property
    def finals(self) -> list[str]:
        return [e["text"] for e in self.of("final") if e["text"]]

    @property
    def text(self) -> str:
        return " ".join(self.finals)


async def run_call(
    node: Node,
    wav: str | Path,
    *,
    call_id: str | None = None,
    realtime: bool = True,
    path_suffix: str = "",
    timeout: float = 60_000 * MS,
    pcm: bytes | None = None,
    **send_kw: Any,
) -> CallRun:
    """Stream a WAV file (or ``pcm`` at its rate) like mod_audio_stream; collect the call's
    events until call_end."""
    audio, rate, channels = read_wav(str(wav))
    pcm = audio if pcm is None else pcm
    call_id = call_id or f"t-{uuid.uuid4()}"
    send_kw.setdefault("metadata", metadata_for(call_id, rate, channels))
    async with Subscription(node.events, call_id) as sub:
        sending = asyncio.create_task(
            send_pcm(
                f"{node.url}/{call_id}{path_suffix}", pcm, rate=rate, channels=channels, realtime=realtime, **send_kw
            )
        )
        events: list[Event] = []
        deadline = time.monotonic() + timeout
        while not events or events[-1].type != "call_end":
            if sending.done() and sending.exception() is not None:
                raise sending.exception()  # type: ignore[misc]  # refused, reset: say so now
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"call {call_id}: no call_end in {timeout:.0f} s ({len(events)} events)")
            try:
                events.append(await sub.next(timeout=min(1.0, left)))
            except TimeoutError:
                continue
        sent = await sending
    return CallRun(call_id, events, sent)


_MODEL: Any = None


def model() -> Any:
    """The default model as the farm loads it (dither 0: see workers/engines/vosk.py)."""
    import tempfile

    import vosk

    from workers.engines.vosk import model_view

    global _MODEL
    if _MODEL is None:
        vosk.SetLogLevel(-1)
        _MODEL = vosk.Model(model_view(default_model_dir() or "", tempfile.mkdtemp(prefix="farm-test-model-")))
    return _MODEL


@functools.lru_cache(maxsize=16)
def _samples16k(wav: str | Path) -> Any:
    """Channel 0 of a WAV file at 16 kHz, resampled with soxr exactly as the workers do."""
    import numpy as np
    import soxr

    with wave.open(str(wav), "rb") as w:
        pcm = w.readframes(w.getnframes())
        src, channels = w.getframerate(), w.getnchannels()
    samples = np.frombuffer(pcm, dtype="<i2").reshape(-1, channels)[:, 0]
    if src != 16000:
        # As a worker does: a stream, fed whole 20 ms blocks one call at a time.
        stream = soxr.ResampleStream(src, 16000, 1, dtype="int16", quality="QQ")
        block = src // 50
        whole = len(samples) - len(samples) % block
        parts = [stream.resample_chunk(samples[i : i + block]) for i in range(0, whole, block)]
        parts.append(stream.resample_chunk(samples[whole:], last=True))
        samples = np.concatenate(parts).astype("<i2")
    return samples


def decode_pcm(pcm: bytes, *, partial_every: int = 0, with_model: Any = None) -> list[str]:
    """Vosk on 16 kHz audio in 20 ms frames, whole frames only, as a worker feeds it.

    Vosk's output depends on where partials are asked for, so ``partial_every`` asks
    for one after every N frames (counting again after each endpoint), as a worker
    does. Returns the non-empty finals (endpoint results, then the last one).
    ``with_model``: a loaded model other than the default one.
    """
    import vosk

    step = 640
    rec = vosk.KaldiRecognizer(with_model or model(), 16000)
    out = []
    since = 0
    for i in range(0, len(pcm) - len(pcm) % step, step):
        if rec.AcceptWaveform(pcm[i : i + step]):
            out.append(json.loads(rec.Result())["text"])
            since = 0
            continue
        since += 1
        if partial_every and since >= partial_every:
            since = 0
            rec.PartialResult()
    out.append(json.loads(rec.FinalResult())["text"])
    return [t for t in out if t]


@functools.cache
def direct_decode(wav: str | Path, *, partial_every: int = 0) -> list[str]:
    """Decode a whole file straight with Vosk (no farm): the reference transcript.

    Repeatable (dither 0), so each file is decoded once per test session."""
    return decode_pcm(_samples16k(wav).tobytes(), partial_every=partial_every)


def decode_heard(wav: str | Path, run: CallRun, *, partial_every: int = 10, channel: int = 0) -> list[str]:
    """The reference for a VAD-gated call: each utterance decoded straight with Vosk
    from exactly the audio the farm says its recognizer heard (``audio_ms`` of the
    finals: the preroll, the speech and the quiet up to where its final was prepared),
    ended where the farm ended it: ``pieces_ms`` says where it was finalised at the
    caller's pauses (FinalResult: the next piece starts on fresh features) and how."""
    out: list[str] = []
    # One recognizer stream per utterance: Vosk's own endpoints (intermediate finals) and
    # the farm's cuts continue it; a closing final ends it.
    bounds: list[tuple[int, int, str]] = []
    for e in run.of("final"):
        if e.channel != channel:
            continue
        a, b = e["audio_ms"]
        pieces = [tuple(p) for p in e.data.get("pieces_ms", [])] or [
            (a, b, "endpoint" if e["reason"] == "endpoint" else "final")
        ]
        bounds += pieces  # type: ignore[arg-type]
        if e["reason"] != "endpoint":
            out += _decode_heard_utterance(str(wav), tuple(bounds), partial_every)
            bounds = []
    return out


def decode_heard_each(pairs: list[tuple[Path, CallRun]]) -> list[list[str]]:
    """:func:`decode_heard` of each ``(wav, run)``, on both CPUs (Vosk lets the GIL go while
    it decodes)."""
    from concurrent.futures import ThreadPoolExecutor

    model()  # loaded once, before the threads
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(lambda pair: decode_heard(*pair), pairs))


@functools.lru_cache(maxsize=512)
def _decode_heard_utterance(wav: str, bounds: tuple[tuple[int, int, str], ...], partial_every: int) -> tuple[str, ...]:
    """One utterance of :func:`decode_heard`: repeatable (dither 0), so calls that streamed
    the same file and were cut at the same places are decoded once per test session."""
    return tuple(_decode_stream(_samples16k(wav), list(bounds), partial_every))


def _decode_stream(samples: Any, bounds: list[tuple[int, int, str]], partial_every: int) -> list[str]:
    """Vosk on 16 kHz ``samples`` from the first bound's start, 20 ms frames, partials every
    ``partial_every`` frames (counting again after each result), and at each bound's end
    what the farm did there: ``final`` FinalResult(), ``endpoint`` nothing (Vosk's own
    endpoint fires there by itself). Returns the non-empty texts, one per final."""
    import vosk

    rec = vosk.KaldiRecognizer(model(), 16000)
    texts: list[str] = []
    since = 0
    for a, b, how in bounds:
        said = []
        pcm = samples[a * 16 : b * 16].tobytes()
        for i in range(0, len(pcm) - len(pcm) % 640, 640):
            if rec.AcceptWaveform(pcm[i : i + 640]):
                said.append(json.loads(rec.Result())["text"])
                since = 0
                continue
            since += 1
            if partial_every and since >= partial_every:
                since = 0
                rec.PartialResult()
        if how == "final":
            said.append(json.loads(rec.FinalResult())["text"])
            since = 0
        texts.append(" ".join(t for t in said if t))
    # a final joins the pieces since the previous one: Vosk's own endpoints close one, the
    # last bound (the utterance's end) closes the last
    out: list[str] = []
    current: list[str] = []
    for i, ((_, _, how), text) in enumerate(zip(bounds, texts)):
        current.append(text)
        if how == "endpoint" or i == len(bounds) - 1:
            joined = " ".join(t for t in current if t)
            if joined:
                out.append(joined)
            current = []
    return out


def same_transcript(got: list[str], want: list[str]) -> bool:
    """Utterance by utterance, the texts Vosk could have given (see test_transcripts).

    Same number of finals, each sharing at least half its words with the reference
    utterance in order, and 80% of the words overall: one or two words that Vosk
    itself flips between runs pass; a lost, added or swapped utterance does not.
    """
    return (
        len(got) == len(want)
        and all(similarity(g, w) >= 0.5 for g, w in zip(got, want))
        and similarity(" ".join(got), " ".join(want)) >= 0.8
    )


def similarity(a: str, b: str) -> float:
    """Word-level similarity 0..1 (difflib ratio over word sequences)."""
    import difflib

    return difflib.SequenceMatcher(None, a.split(), b.split()).ratio()
