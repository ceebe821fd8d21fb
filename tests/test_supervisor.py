"""``farm up`` as an operator meets it: start, bad model, crashes, stale rings, shutdown.

Nodes are real process trees started with ``start_new_session=True`` and driven with
real signals (gunicorn's ``test_signal_integration`` way).
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
import wave
from multiprocessing import shared_memory
from pathlib import Path

import pytest
import websockets

from farm.client import Subscription
from farm.heartbeats import HeartbeatTable
from farm.protocol.events import Event
from farm.ring import Ring, segment_name
from farm.sender import metadata_for, send_pcm

from .conftest import (
    DATA,
    MS,
    CallRun,
    direct_decode,
    farm_segments,
    free_port,
    metric_value,
    orphan_segments,
    run_call,
    similarity,
    start_node,
)


def _no_new_orphans(before: set[str], timeout: float = 20_000 * MS) -> None:
    """No ring whose ingress is gone appeared since ``before`` (one of another farm of the
    machine, stopping as this is checked, has this long to go away: other farms' are theirs)."""
    deadline = time.monotonic() + timeout
    while orphan_segments() - before:
        assert time.monotonic() < deadline, f"rings left behind: {sorted(orphan_segments() - before)}"
        time.sleep(0.1)


def _dead_pid() -> int:
    pid = 4_000_000
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        pid -= 1


def test_a_missing_model_stops_farm_at_once_with_a_clear_message(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "farm.cli", "up", "--model", str(tmp_path / "nope"), "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 4
    assert f"model directory {tmp_path / 'nope'} does not exist" in proc.stderr
    assert "started" not in proc.stderr  # no respawn loop: nothing was started


def test_a_broken_model_stops_farm_with_the_model_load_exit_code(tmp_path: Path) -> None:
    (tmp_path / "am").mkdir()
    (tmp_path / "am" / "final.mdl").write_bytes(b"not a model")
    proc = subprocess.run(
        [sys.executable, "-m", "farm.cli", "up", "--model", str(tmp_path), "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 4
    assert "cannot load the model" in proc.stderr


def test_a_port_in_use_stops_farm_with_the_start_error_code(tmp_path: Path) -> None:
    before = orphan_segments()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "farm.cli",
                "up",
                "--workers",
                "1",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--events",
                f"tcp://127.0.0.1:{free_port()}",
                "--esl-port",
                str(free_port()),
                "--commands",
                f"tcp://127.0.0.1:{free_port()}",
            ],
            capture_output=True,
            text=True,
            timeout=90,
        )
    assert proc.returncode == 5
    assert f"is port {port} in use?" in proc.stderr
    _no_new_orphans(before)


def test_an_event_socket_port_in_use_also_stops_farm_with_the_start_error_code(tmp_path: Path) -> None:
    before = orphan_segments()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        esl_port = taken.getsockname()[1]
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "farm.cli",
                "up",
                "--workers",
                "1",
                "--host",
                "127.0.0.1",
                "--port",
                str(free_port()),
                "--events",
                f"tcp://127.0.0.1:{free_port()}",
                "--esl-host",
                "127.0.0.1",
                "--esl-port",
                str(esl_port),
                "--commands",
                f"tcp://127.0.0.1:{free_port()}",
            ],
            capture_output=True,
            text=True,
            timeout=90,
        )
    assert proc.returncode == 5
    assert f"Event Socket port {esl_port}" in proc.stderr
    _no_new_orphans(before)


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--vad-hangover-ms", "150", "hangover_ms must be a non-negative multiple of 20 ms, got 150"),
        ("--socket-audio-ports", "5-1", "socket_audio_ports must be FIRST-LAST"),
        ("--partial-interval-ms", "30", "partial_interval_ms must be a non-negative multiple of 20 ms, got 30"),
        ("--auth-tokens", "@/nonexistent/tokens", "auth_tokens cannot read the tokens file"),
        ("--esl-allow", "10.0.0.0/33", "esl_allow not a network"),
        ("--tls-cert", "/nonexistent/cert.pem", "--tls-cert and --tls-key go together"),
        ("--curve-dir", "/nonexistent/keys", "curve_dir cannot read the CURVE keypair"),
    ],
)
def test_a_knob_farm_cannot_run_with_is_refused_before_anything_starts(flag: str, value: str, message: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "farm.cli", "up", flag, value], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert message in proc.stderr and "started" not in proc.stderr


def test_start_removes_rings_of_a_crashed_farm_and_only_those(tmp_path: Path) -> None:
    foreign = shared_memory.SharedMemory(f"farm-{_dead_pid()}-notours", create=True, size=64)
    foreign.buf[:8] = b"NOTARING"
    try:
        # Any farm that starts on this machine sweeps a crashed farm's rings, the other half
        # of a parallel test run's included: if one swept this ring before this node could,
        # make another (the node must then have swept nothing of ours, and the ring is gone).
        for attempt in range(3):
            stale = Ring.create(segment_name(_dead_pid(), 1), capacity=64, rate=8000, channels=1)
            stale.close()
            (tmp_path / str(attempt)).mkdir()
            n = start_node(tmp_path / str(attempt), workers=1)
            n.stop()
            assert stale.name not in farm_segments()
            assert foreign.name.lstrip("/") in os.listdir("/dev/shm")
            swept = re.search(r"removed \d+ shared-memory rings left by a crashed farm: (.*)", n.log())
            if swept and stale.name.lstrip("/") in swept.group(1).split():
                break
        else:
            pytest.fail("three rings of a crashed farm, each swept by another farm before this node started")
    finally:
        foreign.close()
        foreign.unlink()


def test_a_killed_worker_is_replaced_and_the_node_keeps_serving(tmp_path: Path) -> None:
    n = start_node(tmp_path, workers=2)
    try:
        # SIGKILL, then a real-time signal (no name in Python's signal.Signals: its death
        # once crashed the supervisor's reaping).
        for started, sig, name in ((3, signal.SIGKILL, "SIGKILL"), (4, signal.SIGRTMIN + 1, "SIGRTMIN+1")):
            victim = n.pids("worker")[0]
            os.kill(victim, sig)
            deadline = time.monotonic() + 30_000 * MS
            while n.log().count(") started on cpu") < started and time.monotonic() < deadline:
                time.sleep(0.1)
            assert n.log().count(") started on cpu") == started, f"no replacement worker started:\n{n.log()[-3000:]}"
            assert f"killed by {name} (pid {victim})" in n.log()
            assert victim not in n.pids("worker") and len(n.pids("worker")) == 2
        assert n.proc.poll() is None
        wav = DATA / "ko_01.wav"
        run = asyncio.run(run_call(n, wav, realtime=False))
        assert similarity(run.text, " ".join(direct_decode(wav))) >= 0.8
    finally:
        assert n.stop() == 0


def test_a_killed_broker_is_replaced_and_the_calls_in_flight_lose_no_words(tmp_path: Path) -> None:
    """kill -9 the broker mid-utterance of two calls: the supervisor starts another, the
    workers register again naming the calls they serve, the ingress announces them again,
    and the events of the gap reach the subscribers once the new relay is up (the
    contract's Restarts): each call ends with the finals of an undisturbed run."""
    n = start_node(tmp_path, workers=2)
    try:
        wav = DATA / "ko_dialog_16k.wav"
        # The reference needs no pacing: finals do not depend on it (tests/test_transcripts.py).
        undisturbed = asyncio.run(run_call(n, wav, realtime=False))

        async def disturbed() -> list[CallRun]:
            async with Subscription(n.events) as watch:
                tasks = [asyncio.create_task(run_call(n, wav, realtime=True, call_id=f"b-{i}")) for i in range(2)]
                starts = 0
                while starts < 3:  # the second call's first utterance, or the first's second
                    starts += (await watch.next(timeout=20_000 * MS)).type == "speech_start"
                os.kill(broker, signal.SIGKILL)
                return await asyncio.gather(*tasks)

        (broker,) = [int(p) for p in re.findall(r"started broker \(pid (\d+)\)", n.log())]
        runs = asyncio.run(disturbed())
        log = n.log()
        assert f"broker 0 killed by SIGKILL (pid {broker})" in log, log[-3000:]
        assert re.search(r"the broker restarted \(pid \d+, was \d+\): announcing \d+ calls again", log)
        for run in runs:
            assert run.finals == undisturbed.finals, log[-4000:]
            assert [e["reason"] for e in run.of("call_end")] == ["hangup"]
        assert n.proc.poll() is None
    finally:
        assert n.stop() == 0


def test_a_killed_ingress_ends_its_calls_as_lost_and_workers_let_their_rings_go(tmp_path: Path) -> None:
    """SIGKILL to the ingress mid-utterance: its connections are gone with it. Each call ends
    with a call_end saying so (reason ``lost``), after the words that came before; no worker
    keeps a dead ring mapped; the restarted ingress serves new calls."""
    n = start_node(tmp_path, workers=2)
    (ingress,) = n.pids("ingress")
    wav = DATA / "ko_dialog_16k.wav"
    with wave.open(str(wav), "rb") as w:
        pcm = w.readframes(w.getnframes())

    async def stream(call_id: str) -> None:
        try:
            await send_pcm(f"{n.url}/{call_id}", pcm, rate=16000, metadata=metadata_for(call_id, 16000, 1))
        except (OSError, websockets.ConnectionClosed):
            pass  # the ingress died under it

    async def scenario() -> dict[str, list[Event]]:
        got: dict[str, list[Event]] = {f"lost-{i}": [] for i in range(2)}
        async with Subscription(n.events) as watch:
            senders = [asyncio.create_task(stream(call_id)) for call_id in got]
            ended: set[str] = set()
            while len(ended) < len(got):
                e = await watch.next(timeout=60_000 * MS)
                if e.call_id not in got:
                    continue
                got[e.call_id].append(e)
                if e.type == "final" and ingress in n.pids("ingress"):
                    os.kill(ingress, signal.SIGKILL)  # after a final: words that came before
                if e.type == "call_end":
                    ended.add(e.call_id)
            await asyncio.gather(*senders)
        return got

    try:
        calls = asyncio.run(scenario())
        for call_id, events in calls.items():
            end = events[-1]
            assert end.type == "call_end" and end["reason"] == "lost", (call_id, end.data)
            assert f"ingress (pid {ingress})" in end["detail"]
            assert len(events[:-1]) == len({(e.type, e.seq) for e in events[:-1]})
        assert any(e.type == "final" and e["text"] for events in calls.values() for e in events)
        for worker in n.pids("worker"):
            deadline = time.monotonic() + 10_000 * MS
            while "farm-" in (maps := Path(f"/proc/{worker}/maps").read_text()) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert "/dev/shm/farm-" not in maps, f"worker {worker} still maps a ring"
        assert not farm_segments(ingress)
        deadline = time.monotonic() + 30_000 * MS
        while not re.search(rf"ingress ready \(pid (?!{ingress}\))\d+\): mod_audio_stream", n.log()):
            assert time.monotonic() < deadline, f"no new ingress:\n{n.log()[-3000:]}"
            time.sleep(0.1)
        run = asyncio.run(run_call(n, DATA / "ko_01.wav", realtime=False))
        assert run.text and run.of("call_end")[0]["reason"] == "hangup"
    finally:
        assert n.stop() == 0


def test_a_starting_worker_is_not_taken_for_a_hung_one(tmp_path: Path) -> None:
    """A replacement worker whose start stalls (here: stopped for 3 s, as a Vosk call of its
    warm-up can stall on a loaded machine) is given time, though the loop timeout is 1 s."""
    n = start_node(tmp_path, "--worker-timeout", "1", workers=1)
    try:
        os.kill(n.pids("worker")[0], signal.SIGKILL)
        deadline = time.monotonic() + 30_000 * MS
        while n.log().count(") started on cpu") < 2:
            assert time.monotonic() < deadline, "no replacement worker started"
            time.sleep(0.01)
        replacement = n.pids("worker")[0]
        os.kill(replacement, signal.SIGSTOP)
        time.sleep(3)
        os.kill(replacement, signal.SIGCONT)
        while len(re.findall(r"farm\.broker: worker 0 \(pid \d+\) ready", n.log())) < 2:
            assert time.monotonic() < deadline + 30_000 * MS, "the replacement never registered"
            time.sleep(0.1)
        assert "SIGABRT" not in n.log() and n.pids("worker") == [replacement]
    finally:
        assert n.stop() == 0


@pytest.mark.parametrize(
    "to_group, sig",
    [(False, signal.SIGTERM), (True, signal.SIGTERM), (True, signal.SIGINT)],
    ids=["supervisor-sigterm", "group-sigterm", "group-sigint"],
)
def test_sigterm_lets_utterances_in_flight_finish_and_leaves_no_ring(tmp_path: Path, to_group: bool, sig: int) -> None:
    """The supervisor drains a node however it is told: SIGTERM to it (systemd, ``docker stop``
    of a farm that is PID 1), or to its whole process group (``kill -- -PGID``, a shell
    script's ``docker stop``), or a terminal's Ctrl-C (SIGINT to the foreground group): its
    children obey the supervisor only."""
    n = start_node(tmp_path, workers=2)
    ingress = n.pids("ingress")
    wav = DATA / "ko_dialog_16k.wav"

    async def calls_then_sigterm() -> tuple[list, int]:
        async with Subscription(n.events) as watch:
            tasks = [asyncio.create_task(run_call(n, wav, realtime=True)) for _ in range(3)]
            while (await watch.next(timeout=20_000 * MS)).type != "speech_start":
                pass
            sent_at = time.monotonic_ns()
            if to_group:
                os.killpg(n.proc.pid, sig)
            else:
                n.proc.send_signal(sig)
            return await asyncio.gather(*tasks, return_exceptions=True), sent_at

    runs, sigterm_ns = asyncio.run(calls_then_sigterm())
    assert n.proc.wait(60) == 0
    in_flight = 0
    for run in runs:
        assert not isinstance(run, BaseException), run
        starts, ends = run.of("speech_start"), run.of("speech_end")
        closing = [e for e in run.of("final") if e["reason"] != "endpoint"]
        # Every utterance was closed and finalised, the one under way at SIGTERM included
        # (a call that was between utterances then is simply closed: how far each call
        # had got depends on how busy the machine was).
        assert len(starts) == len(ends) == len(closing)
        for start, end, final in zip(starts, ends, closing):
            if start.stamps["publish"] < sigterm_ns < end.stamps["vad"]:
                in_flight += 1
                assert final["text"]
        assert run.sent is not None and run.sent.close_code == 1001
        assert run.events[-1]["reason"] == "drain", run.events[-1].data
    assert in_flight >= 1  # the speech_start that triggered the SIGTERM, at least
    assert "ingress draining" in n.log() and "farm stopped" in n.log()
    assert not any(farm_segments(pid) for pid in ingress)


def test_new_connections_are_refused_while_draining(tmp_path: Path) -> None:
    n = start_node(tmp_path, "--drain-timeout", "5", workers=1)
    wav = DATA / "ko_dialog_16k.wav"

    async def scenario() -> tuple[int | None, CallRun]:
        first = asyncio.create_task(run_call(n, wav, realtime=True))
        async with Subscription(n.events) as watch:
            while (await watch.next(timeout=20_000 * MS)).type != "speech_start":
                pass
        n.proc.send_signal(signal.SIGTERM)
        import urllib.request

        # The ingress gets the signal a moment later: poll until it stops saying ready.
        deadline = time.monotonic() + 20_000 * MS
        status: int | None = 200
        while status == 200 and time.monotonic() < deadline:
            try:
                await asyncio.to_thread(urllib.request.urlopen, f"http://127.0.0.1:{n.port}/readyz", timeout=5)
                await asyncio.sleep(0.05)
            except OSError as exc:
                status = getattr(exc, "code", None)
        return status, await first

    status, first = asyncio.run(scenario())
    assert status in (503, None)  # draining answers 503, or the listener is already closed
    assert (first.events[-1].type, first.events[-1]["reason"]) == ("call_end", "drain")
    assert n.proc.wait(60) == 0


def test_a_node_stopped_with_recognition_behind_still_ends_every_call_with_its_words(tmp_path: Path) -> None:
    """20 s of dialog sent at once to one worker with one recognition thread: when the node
    stops right after, recognition is behind the audio (by how much depends on the machine).
    The ingress drains and, if the worker is still busy past its wait, exits; the worker is
    stopped next and finishes what the ring holds; the broker, whose relay carries the
    worker's events, stops last. Every utterance gets its final, the call its call_end."""
    n = start_node(tmp_path, "--drain-timeout", "5", "--asr-threads", "1", workers=1)
    wav = DATA / "ko_dialog_16k.wav"
    with wave.open(str(wav), "rb") as w:
        pcm = w.readframes(w.getnframes()) * 2

    async def scenario() -> CallRun:
        call = asyncio.create_task(run_call(n, wav, pcm=pcm, realtime=False, linger_s=30, timeout=180_000 * MS))
        async with Subscription(n.events) as watch:
            while (await watch.next(timeout=30_000 * MS)).type != "speech_start":
                pass
        await asyncio.sleep(1)  # the audio is all in the ring by now (sent faster than real time)
        n.proc.send_signal(signal.SIGTERM)
        return await call

    run = asyncio.run(scenario())
    assert n.proc.wait(90) == 0
    end = run.events[-1]
    assert end.type == "call_end" and end["reason"] in ("drain", "hangup"), end.data
    closing = [e for e in run.of("final") if e["reason"] != "endpoint"]
    assert len(run.of("speech_start")) == len(run.of("speech_end")) == len(closing) >= 1


def test_readyz_says_ready_only_with_live_workers_and_metrics_count_them(tmp_path: Path) -> None:
    import urllib.request

    # Warmed as `farm up` warms (one recognizer before a worker registers, more after), on less speech.
    warming = ("--recognizer-warm", "1", "--recognizer-warm-later", "1", "--recognizer-warm-s", "2")
    n = start_node(tmp_path, *warming, workers=2)
    try:
        # 503 until the ingress has heard from the broker; then the count rises as workers
        # register. Wait for the state, then check it.
        deadline = time.monotonic() + 30_000 * MS
        body = ""
        while body != "ready: 2 workers\n":
            assert time.monotonic() < deadline, f"/readyz never said 2 workers (last: {body!r})"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{n.port}/readyz", timeout=5) as r:
                    body = r.read().decode()
            except OSError:
                body = ""
            time.sleep(0.1)
        with urllib.request.urlopen(f"http://127.0.0.1:{n.port}/metrics", timeout=2) as r:
            metrics = r.read().decode()
        assert "farm_workers_live 2" in metrics
        # Each worker warmed a recognizer before it registered and warms another after, kept
        # idle in its pool; the metrics show them (from the workers' heartbeats: wait for it).
        deadline = time.monotonic() + 60_000 * MS
        warm: list[float | None] = []
        while warm != [2, 2]:
            assert time.monotonic() < deadline, f"idle recognizers {warm}, not 2 per worker:\n{n.log()[-2000:]}"
            time.sleep(0.2)
            with urllib.request.urlopen(f"http://127.0.0.1:{n.port}/metrics", timeout=2) as r:
                scrape = r.read().decode()
            warm = [metric_value(scrape, "farm_recognizers", worker=w, state="idle") for w in ("0", "1")]
        assert n.log().count("warmed in the background") == 2
        assert r.headers.get_all("Content-Type") == ["text/plain; version=0.0.4"]
        # ps tells the processes apart, and their environment is intact (SPT_NOENV).
        titles = {pid: _cmdline(pid) for role in ("broker", "ingress", "worker") for pid in n.pids(role)}
        titles[n.proc.pid] = _cmdline(n.proc.pid)
        assert sorted(titles.values()) == [
            "farm: broker",
            "farm: ingress",
            "farm: supervisor",
            "farm: worker 0",
            "farm: worker 1",
        ]
        for pid in titles:
            assert f"FARM_TEST_SESSION={os.environ['FARM_TEST_SESSION']}".encode() in _environ(pid)
    finally:
        assert n.stop() == 0


def _cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().split(b"\0")[0].decode()


def _environ(pid: int) -> bytes:
    with open(f"/proc/{pid}/environ", "rb") as f:
        return f.read()


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's reaper may be slow to reap it, or never)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_every_farm_process_exits_when_the_supervisor_is_killed(tmp_path: Path) -> None:
    n = start_node(tmp_path, workers=2)
    children = {role: n.pids(role) for role in ("broker", "ingress", "worker")}
    assert [len(pids) for pids in children.values()] == [1, 1, 2], children
    os.kill(n.proc.pid, signal.SIGKILL)  # the supervisor alone: no chance to stop anything
    assert n.proc.wait(10) == -signal.SIGKILL
    deadline = time.monotonic() + 15_000 * MS
    while (left := [p for pids in children.values() for p in pids if _running(p)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not left, f"still running without their supervisor: {left}"
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as a listener would: TIME_WAIT is no owner
        s.bind(("127.0.0.1", n.port))  # the ingress's port is free again


class TestHeartbeatTable:
    """The supervisor's view of each worker's loop, shared with the workers by fork."""

    def test_it_has_a_slot_for_any_number_of_workers(self) -> None:
        table = HeartbeatTable()
        many = 4 * HeartbeatTable.PAGE_SLOTS + 3  # more workers than one page holds (64 did once)
        for index in (0, HeartbeatTable.PAGE_SLOTS - 1, HeartbeatTable.PAGE_SLOTS, many):
            assert table.age(index) == 0.0  # never beaten
            table.beat(index)
            assert 0.0 <= table.age(index) < 5
            table.clear(index)
            assert table.age(index) == 0.0
        assert table.slots > many

    def test_a_worker_forked_after_the_table_grew_beats_where_the_supervisor_looks(self) -> None:
        table = HeartbeatTable()
        index = 2 * HeartbeatTable.PAGE_SLOTS + 5
        table.beat(index)  # as the supervisor does before it forks the worker
        table.clear(index)
        pid = os.fork()
        if pid == 0:  # the worker: beats its own slot, nothing else
            table.beat(index)
            os._exit(0)
        assert os.waitpid(pid, 0)[1] == 0
        assert 0.0 < table.age(index) < 5
