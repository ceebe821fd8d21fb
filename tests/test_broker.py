"""The broker process against real ZeroMQ peers speaking FARMW02 (no farm workers).

The peers here are test stand-ins for workers and the ingress: plain DEALER sockets
that send the contract's frames, so the broker is exercised exactly as on a node.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import zmq

from farm.broker import wire
from farm.broker.broker import node_capacity
from farm.client import Subscription
from farm.config import CALL_CPU_MS_PRIOR, Config, default_workers
from farm.protocol.events import SUBSCRIBED, Event, topic_for

from .conftest import MS, free_port


def _run_broker(tmp_path: Path, **env: str) -> Iterator[Config]:
    config = Config(run_dir=str(tmp_path), events=f"tcp://127.0.0.1:{free_port()}")
    full_env = dict(os.environ, FARM_CONFIG=config.to_json(), **env)
    with open(tmp_path / "broker.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "farm.broker.broker"], env=full_env, start_new_session=True, stderr=log
        )
    deadline = time.monotonic() + 10_000 * MS
    while not (tmp_path / "workers.ipc").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    yield config
    proc.terminate()
    assert proc.wait(10) == 0


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Config]:
    yield from _run_broker(tmp_path)


@pytest.fixture
def restarted_broker(tmp_path: Path) -> Iterator[Config]:
    """A broker as the supervisor starts it again after its predecessor died."""
    yield from _run_broker(tmp_path, **{wire.RESTART_ENV: "1"})


WAIT_MS = int(10_000 * MS * 1000)  # zmq polls take milliseconds; MS is seconds per ms


class Peer:
    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def send(self, command: bytes, *body: str) -> None:
        self.sock.send_multipart(wire.message(command, *body))

    def expect(self, command: bytes, timeout: float = 10_000 * MS, skip: tuple[bytes, ...] = ()) -> list[str]:
        """Next message other than a heartbeat (and ``skip``); fails if none comes in time."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.sock.poll(50):
                got, body = wire.parse(self.sock.recv_multipart())
                if got == wire.B_HEARTBEAT or got in skip:
                    continue
                assert got == command, f"got {wire.name(got)}, expected {wire.name(command)}"
                return body
        raise AssertionError(f"no {wire.name(command)} within {timeout:.1f} s")

    def heartbeat_for(self, seconds: float, calls: int) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.send(wire.W_HEARTBEAT, wire.Load(calls).encode())
            time.sleep(wire.HEARTBEAT_INTERVAL / 2)


def wait_for_workers(ingress: Peer, n: int, timeout: float = 10_000 * MS) -> None:
    """Ask the broker (I_HEARTBEAT) until it says ``n`` workers are registered."""
    deadline = time.monotonic() + timeout
    while True:
        ingress.send(wire.I_HEARTBEAT)
        if wire.Status.decode(ingress.expect(wire.I_STATUS)[0]).workers == n:
            return
        assert time.monotonic() < deadline, f"the broker never had {n} workers"
        time.sleep(0.05)


@pytest.fixture
def ctx() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    c: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield c
    c.destroy(0)


def test_calls_go_to_the_least_loaded_worker(broker: Config, ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    w0, w1 = Peer(ctx, broker.endpoint("workers")), Peer(ctx, broker.endpoint("workers"))
    ingress = Peer(ctx, broker.endpoint("ingress"))
    w0.send(wire.W_READY, "0", "100")
    w1.send(wire.W_READY, "1", "101")
    wait_for_workers(ingress, 2)
    for n in range(4):
        ingress.send(wire.I_OPEN, f"call-{n}", f"ring-{n}", "{}")
    got0 = [w0.expect(wire.B_ASSIGN)[0] for _ in range(2)]
    got1 = [w1.expect(wire.B_ASSIGN)[0] for _ in range(2)]
    assert sorted(got0 + got1) == [f"call-{n}" for n in range(4)]


def test_a_call_waits_for_a_worker_when_none_is_ready(broker: Config, ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    ingress = Peer(ctx, broker.endpoint("ingress"))
    ingress.send(wire.I_OPEN, "early", "ring-e", '{"protocol": "audio_stream"}')
    wait_for_workers(ingress, 0)  # answered after the I_OPEN before it: the call is queued
    w = Peer(ctx, broker.endpoint("workers"))
    w.send(wire.W_READY, "0", "100")
    assert w.expect(wire.B_ASSIGN) == ["early", "ring-e", '{"protocol": "audio_stream"}']


def dead_pid() -> str:
    """The pid of a process that has exited: a worker the broker cannot watch."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return str(proc.pid)


def test_a_silent_worker_loses_its_calls_after_its_liveness_runs_out(
    broker: Config, ctx: zmq.Context[zmq.Socket[bytes]]
) -> None:
    quiet, alive = Peer(ctx, broker.endpoint("workers")), Peer(ctx, broker.endpoint("workers"))
    ingress = Peer(ctx, broker.endpoint("ingress"))
    quiet.send(wire.W_READY, "0", dead_pid())  # not watched: heartbeats alone say it lives
    last_word = time.monotonic()  # `quiet` says nothing from now on
    wait_for_workers(ingress, 1)
    ingress.send(wire.I_OPEN, "c1", "ring-1", "{}")
    assert quiet.expect(wire.B_ASSIGN)[0] == "c1"
    alive.send(wire.W_READY, "1", "101")
    deadline = time.monotonic() + 20_000 * MS
    # `alive` keeps beating until the call comes its way.
    while True:
        alive.send(wire.W_HEARTBEAT, wire.Load().encode())
        if alive.sock.poll(int(wire.HEARTBEAT_INTERVAL * 500)):
            command, body = wire.parse(alive.sock.recv_multipart())
            if command == wire.B_ASSIGN:
                break
        assert time.monotonic() < deadline, "the call was not reassigned"
    assert body[:2] == ["c1", "ring-1"]
    # Not before the contract's liveness (interval x liveness) ran out: a busy machine
    # can only make this later.
    assert time.monotonic() - last_word >= wire.HEARTBEAT_INTERVAL * wire.HEARTBEAT_LIVENESS
    # The silent worker, back from the dead, is told to start over.
    quiet.send(wire.W_HEARTBEAT, wire.Load(1).encode())
    quiet.expect(wire.B_DISCONNECT)


def test_an_idle_worker_beating_once_a_second_stays_registered(
    broker: Config, ctx: zmq.Context[zmq.Socket[bytes]]
) -> None:
    """With no call, a worker beats every IDLE_HEARTBEAT_INTERVAL (an idle node's CPU), and
    the broker, not watching its process here, gives it its liveness in those beats."""
    idle = Peer(ctx, broker.endpoint("workers"))
    ingress = Peer(ctx, broker.endpoint("ingress"))
    idle.send(wire.W_READY, "0", dead_pid())
    wait_for_workers(ingress, 1)
    busy_patience = wire.beat_interval(True, broker.worker_timeout) * wire.HEARTBEAT_LIVENESS
    idle_patience = wire.beat_interval(False, broker.worker_timeout) * wire.HEARTBEAT_LIVENESS
    gap = 1.5 * busy_patience  # between beats: more than a worker with calls is given
    assert gap < idle_patience / 2
    for _ in range(3):
        time.sleep(gap)
        idle.send(wire.W_HEARTBEAT, wire.Load().encode())
    wait_for_workers(ingress, 1, timeout=0)  # still there
    # Its calls take the busy beat: a call assigned, the silent worker loses it after its liveness.
    ingress.send(wire.I_OPEN, "c1", "ring-1", "{}")
    assert idle.expect(wire.B_ASSIGN)[0] == "c1"
    wait_for_workers(ingress, 0, timeout=30_000 * MS)


def test_a_watched_worker_is_given_time_while_its_process_lives_and_none_once_it_exits(
    broker: Config, ctx: zmq.Context[zmq.Socket[bytes]], tmp_path: Path
) -> None:
    """The broker watches a worker's process (pidfd): silence from a live one is a starved
    loop, given WATCHED_LIVENESS; an exit moves its calls at once, whatever the heartbeats."""
    process = subprocess.Popen(["sleep", "120"])  # stands for the worker's process
    try:
        quiet, alive = Peer(ctx, broker.endpoint("workers")), Peer(ctx, broker.endpoint("workers"))
        ingress = Peer(ctx, broker.endpoint("ingress"))
        quiet.send(wire.W_READY, "0", str(process.pid))
        last_word = time.monotonic()
        wait_for_workers(ingress, 1)
        ingress.send(wire.I_OPEN, "c1", "ring-1", "{}")
        assert quiet.expect(wire.B_ASSIGN)[0] == "c1"
        alive.send(wire.W_READY, "1", str(os.getpid()))
        # Silent for twice the unwatched liveness: the call stays (checked only if this
        # machine kept the silence shorter than the watched liveness, as it should).
        silence = 2 * wire.HEARTBEAT_INTERVAL * wire.HEARTBEAT_LIVENESS
        end = last_word + silence
        moved = False
        while time.monotonic() < end:
            alive.send(wire.W_HEARTBEAT, wire.Load().encode())
            if alive.sock.poll(int(wire.HEARTBEAT_INTERVAL * 500)):
                moved = moved or wire.parse(alive.sock.recv_multipart())[0] == wire.B_ASSIGN
        if time.monotonic() - last_word < wire.HEARTBEAT_INTERVAL * wire.WATCHED_LIVENESS * 0.8:
            assert not moved, "a live worker's call moved after the unwatched liveness"
        process.kill()
        process.wait()
        if not moved:  # (it moves on its exit, told by the pidfd, not by a missed heartbeat)
            alive.send(wire.W_HEARTBEAT, wire.Load().encode())
            assert alive.expect(wire.B_ASSIGN)[:2] == ["c1", "ring-1"]
            log = (tmp_path / "broker.log").read_text()
            assert f"worker 0 (pid {process.pid}) exited; reassigning 1 calls" in log, log
    finally:
        process.kill()
        process.wait()


def test_a_flush_and_a_given_up_call_reach_the_ingress_and_a_done_call_says_nothing(
    broker: Config, ctx: zmq.Context[zmq.Socket[bytes]]
) -> None:
    """A call its worker ended reaches the ingress as its call_end, on the event path: no
    control message may overtake it. A barge-in and a call given up are the ingress's to act on."""
    w = Peer(ctx, broker.endpoint("workers"))
    ingress = Peer(ctx, broker.endpoint("ingress"))
    w.send(wire.W_READY, "0", "100")
    ingress.send(wire.I_OPEN, "c9", "ring-9", "{}")
    ingress.send(wire.I_OPEN, "c8", "ring-8", "{}")
    assert sorted(w.expect(wire.B_ASSIGN)[0] for _ in range(2)) == ["c8", "c9"]
    request = wire.FlushRequest(1200, 60, 1100, (("recv", 5),)).encode()
    w.send(wire.W_FLUSH, "c9", request)
    assert ingress.expect(wire.I_FLUSH, skip=(wire.I_STATUS,)) == ["c9", request]
    w.send(wire.W_FLUSH, "not-its-call", request)  # not relayed: the worker does not serve it
    w.send(wire.W_DONE, "c9")  # not relayed: its call_end ends it at the ingress
    w.send(wire.W_DONE, "c8", "worker could not attach: no such ring")
    reason = "worker could not attach: no such ring"
    assert ingress.expect(wire.I_GAVE_UP, skip=(wire.I_STATUS,)) == ["c8", reason]


def test_a_disconnecting_worker_hands_its_calls_over_at_once(broker: Config, ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    w0, w1 = Peer(ctx, broker.endpoint("workers")), Peer(ctx, broker.endpoint("workers"))
    ingress = Peer(ctx, broker.endpoint("ingress"))
    w0.send(wire.W_READY, "0", "100")
    ingress.send(wire.I_OPEN, "c1", "r1", "{}")
    w0.expect(wire.B_ASSIGN)
    w1.send(wire.W_READY, "1", "101")
    wait_for_workers(ingress, 2)
    w0.send(wire.W_DISCONNECT)
    assert w1.expect(wire.B_ASSIGN)[0] == "c1"
    wait_for_workers(ingress, 1)  # gone at once, not after its liveness


def assigned_while_beating(peer: Peer, n: int, *beating: Peer) -> list[str]:
    """The call ids of the next ``n`` B_ASSIGNs to ``peer``, while ``beating`` send heartbeats
    (so their liveness cannot run out however slow the machine is)."""
    got: list[str] = []
    deadline = time.monotonic() + 10_000 * MS
    while len(got) < n:
        assert time.monotonic() < deadline, f"only {got} assigned"
        for b in beating:
            b.send(wire.W_HEARTBEAT, wire.Load(n).encode())
        if peer.sock.poll(int(wire.HEARTBEAT_INTERVAL * 400)):
            command, body = wire.parse(peer.sock.recv_multipart())
            if command == wire.B_ASSIGN:
                got.append(body[0])
    return sorted(got)


def test_a_worker_registering_under_a_held_index_replaces_it_and_takes_its_calls_at_once(
    broker: Config, ctx: zmq.Context[zmq.Socket[bytes]]
) -> None:
    """A respawned worker 1 can register before the killed one's liveness runs out: its
    W_READY is the news that the old worker 1 is gone, so its calls move now."""
    old, ingress = Peer(ctx, broker.endpoint("workers")), Peer(ctx, broker.endpoint("ingress"))
    old.send(wire.W_READY, "1", "101")
    for n in range(3):
        ingress.send(wire.I_OPEN, f"c{n}", f"r{n}", "{}")
    assert assigned_while_beating(old, 3, old) == ["c0", "c1", "c2"]
    new = Peer(ctx, broker.endpoint("workers"))
    new.send(wire.W_READY, "1", "102")
    # The old registration keeps beating, so only the index can retire it (a rebalance
    # would move one call, by a B_RELEASE that this peer never answers).
    assert assigned_while_beating(new, 3, old) == ["c0", "c1", "c2"]
    old.expect(wire.B_DISCONNECT)
    wait_for_workers(ingress, 1)


def test_a_restarted_broker_leaves_calls_with_the_workers_that_hold_them(
    restarted_broker: Config, ctx: zmq.Context[zmq.Socket[bytes]]
) -> None:
    """The contract's Restarts: workers register again naming their calls, the ingress
    announces them again; nothing moves, nothing is assigned twice, and a call nobody
    claims goes to a worker once the grace is over."""
    broker = restarted_broker
    w0, w1 = Peer(ctx, broker.endpoint("workers")), Peer(ctx, broker.endpoint("workers"))
    ingress = Peer(ctx, broker.endpoint("ingress"))
    w0.send(wire.W_READY, "0", "100", wire.encode_held([("a", "ring-a", "{}"), ("b", "ring-b", "{}")]))
    w1.send(wire.W_READY, "1", "101", wire.encode_held([("c", "ring-c", '{"x":1}')]))
    wait_for_workers(ingress, 2)
    for call_id in ("a", "b", "c", "orphan"):  # "orphan": its worker died with the broker
        ingress.send(wire.I_OPEN, call_id, f"ring-{call_id}", "{}")
    ingress.send(wire.I_HEARTBEAT)
    status = wire.Status.decode(ingress.expect(wire.I_STATUS)[0])
    assert status.calls == 3  # a, b, c where they were; the orphan waits for the grace
    # After the grace the orphan goes to the least loaded worker, and only it is assigned.
    got = assigned_while_beating(w1, 1, w0, w1)
    assert got == ["orphan"]
    assert not w0.sock.poll(200) or wire.parse(w0.sock.recv_multipart())[0] == wire.B_HEARTBEAT


def test_a_worker_declared_dead_is_told_to_drop_the_calls_that_moved(
    broker: Config, ctx: zmq.Context[zmq.Socket[bytes]]
) -> None:
    """A hung worker comes back naming calls the broker gave to another meanwhile, and one
    that ended meanwhile: it must drop them (B_DROP), not serve them twice."""
    hung, alive = Peer(ctx, broker.endpoint("workers")), Peer(ctx, broker.endpoint("workers"))
    ingress = Peer(ctx, broker.endpoint("ingress"))
    hung.send(wire.W_READY, "0", "100")
    wait_for_workers(ingress, 1)
    ingress.send(wire.I_OPEN, "moved", "ring-m", "{}")
    ingress.send(wire.I_OPEN, "ended", "ring-e", "{}")
    assert sorted(hung.expect(wire.B_ASSIGN)[0] for _ in range(2)) == ["ended", "moved"]
    alive.send(wire.W_READY, "1", "101")
    assert assigned_while_beating(alive, 2, alive) == ["ended", "moved"]  # hung went silent
    alive.send(wire.W_DONE, "ended", "gave up")
    assert ingress.expect(wire.I_GAVE_UP, skip=(wire.I_STATUS,)) == ["ended", "gave up"]  # a status as workers went
    hung.send(wire.W_HEARTBEAT, wire.Load(2).encode())
    hung.expect(wire.B_DISCONNECT, skip=(wire.B_RELEASE,))  # asked to balance with alive, before it went
    again = Peer(ctx, broker.endpoint("workers"))  # a new DEALER, as the worker reconnects
    again.send(wire.W_READY, "0", "100", wire.encode_held([("moved", "ring-m", "{}"), ("ended", "ring-e", "{}")]))
    assert sorted(again.expect(wire.B_DROP)[0] for _ in range(2)) == ["ended", "moved"]


def test_a_call_given_up_by_a_worker_the_broker_never_knew_still_reaches_the_ingress(
    restarted_broker: Config, ctx: zmq.Context[zmq.Socket[bytes]]
) -> None:
    """A worker's W_DONE queued while no broker ran reaches the new one before the worker
    registers, and maybe before the ingress has said a word: kept, then relayed."""
    w = Peer(ctx, restarted_broker.endpoint("workers"))
    w.send(wire.W_DONE, "finished", "worker failed on this call: boom")
    w.expect(wire.B_DISCONNECT)
    ingress = Peer(ctx, restarted_broker.endpoint("ingress"))
    ingress.send(wire.I_HEARTBEAT)
    assert ingress.expect(wire.I_GAVE_UP) == ["finished", "worker failed on this call: boom"]


def producer(ctx: zmq.Context[zmq.Socket[bytes]], config: Config) -> zmq.Socket[bytes]:
    """An event producer as workers make it: an XPUB that waits for the relay's subscription."""
    pub = ctx.socket(zmq.XPUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.connect(config.endpoint("events_in"))
    assert pub.poll(WAIT_MS), "the relay never subscribed"
    assert pub.recv() == b"\x01"  # everything: the relay filters for its subscribers
    return pub


def subscriber(ctx: zmq.Context[zmq.Socket[bytes]], config: Config, topic: bytes) -> zmq.Socket[bytes]:
    """A SUB that waits for the relay's answer to its subscription: then it misses nothing."""
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.connect(config.events)
    sub.setsockopt(zmq.SUBSCRIBE, topic)
    assert sub.poll(WAIT_MS), "the relay never answered the subscription"
    assert sub.recv_multipart() == [topic, SUBSCRIBED]
    return sub


def test_events_are_relayed_to_subscribers_by_call_id(broker: Config, ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    pub = producer(ctx, broker)
    sub_one = subscriber(ctx, broker, topic_for("abc"))
    sub_all = subscriber(ctx, broker, b"")
    for call_id in ("abcd", "abc"):
        pub.send_multipart(Event("final", call_id, 1, 0, {"text": call_id}).to_frames())
    # sub_all subscribed after sub_one was answered: it hears only the two events
    got_all = [Event.from_json(sub_all.recv_multipart()[1]).call_id for _ in range(2)]
    assert got_all == ["abcd", "abc"]
    assert sub_one.poll(WAIT_MS)
    assert Event.from_json(sub_one.recv_multipart()[1]).call_id == "abc"
    assert not sub_one.poll(200)
    for s in (pub, sub_one, sub_all):
        s.close(0)


def test_a_confirmed_client_subscription_misses_not_even_the_first_event(broker: Config, ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    pub = producer(ctx, broker)

    async def scenario() -> list[Event]:
        got = []
        for n in range(20):  # new subscribers, each publishing right after it is confirmed
            async with Subscription(broker.events, f"call-{n}") as sub:
                assert sub.subscribed
                pub.send_multipart(Event("call_start", f"call-{n}", 0, 0, {}).to_frames())
                got.append(await sub.next(timeout=10_000 * MS))
        return got

    got = asyncio.run(scenario())
    assert [e.call_id for e in got] == [f"call-{n}" for n in range(20)]
    pub.close(0)


def test_garbage_does_not_stop_the_broker(broker: Config, ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    junk = ctx.socket(zmq.DEALER)
    junk.connect(broker.endpoint("workers"))
    junk.send_multipart([b"", b"HTTP/1.1", b"GET"])
    junk.send_multipart([b"nonsense"])
    w = Peer(ctx, broker.endpoint("workers"))
    ingress = Peer(ctx, broker.endpoint("ingress"))
    ingress.sock.send_multipart([b"", wire.HEADER, b"\x55"])
    w.send(wire.W_READY, "0", "100")
    ingress.send(wire.I_OPEN, "ok", "r", "{}")
    assert w.expect(wire.B_ASSIGN)[0] == "ok"
    junk.close(0)


def test_the_ingress_heartbeat_is_answered_with_the_number_of_live_workers(
    broker: Config, ctx: zmq.Context[zmq.Socket[bytes]]
) -> None:
    ingress = Peer(ctx, broker.endpoint("ingress"))
    ingress.send(wire.I_HEARTBEAT)
    # Before any worker measured what a call costs, the capacity comes from the prior.
    prior = node_capacity(default_workers(), broker.admission_cpu, CALL_CPU_MS_PRIOR)
    status = wire.Status.decode(ingress.expect(wire.I_STATUS)[0])
    assert replace(status, broker_pid=0) == wire.Status(0, 0, 0, prior, CALL_CPU_MS_PRIOR)
    # Which broker answers (a new pid tells the ingress of a restart): this one.
    assert Path(f"/proc/{status.broker_pid}/cmdline").read_bytes().startswith(b"farm: broker")
    w = Peer(ctx, broker.endpoint("workers"))
    w.send(wire.W_READY, "0", "100")
    wait_for_workers(ingress, 1)


def test_the_capacity_follows_what_the_workers_measured_and_keeps_it_when_they_stop_measuring(
    broker: Config, ctx: zmq.Context[zmq.Socket[bytes]]
) -> None:
    ingress = Peer(ctx, broker.endpoint("ingress"))
    w = Peer(ctx, broker.endpoint("workers"))
    w.send(wire.W_READY, "0", "100")
    wait_for_workers(ingress, 1)
    w.send(wire.W_HEARTBEAT, wire.Load(calls=2, call_cpu_ms=400).encode())
    w.send(wire.W_HEARTBEAT, wire.Load(calls=0, call_cpu_ms=0).encode())  # a restarted worker: nothing yet
    w.send(wire.W_DONE, "none", "x")  # relayed as I_GAVE_UP once both heartbeats are handled (one socket, in order)
    deadline = time.monotonic() + 10_000 * MS
    while ingress.sock.poll(int(10_000 * MS * 1000)):
        got, body = wire.parse(ingress.sock.recv_multipart())
        if got == wire.I_GAVE_UP:
            break
        assert got == wire.I_STATUS and time.monotonic() < deadline  # pushed when the worker came
    ingress.send(wire.I_HEARTBEAT)
    status = wire.Status.decode(ingress.expect(wire.I_STATUS)[0])
    assert (status.call_cpu_ms, status.capacity) == (400, node_capacity(default_workers(), 0.85, 400))


def test_a_malformed_ready_or_heartbeat_is_dropped_and_the_broker_serves_on(
    broker: Config, ctx: zmq.Context[zmq.Socket[bytes]]
) -> None:
    bad = Peer(ctx, broker.endpoint("workers"))
    bad.send(wire.W_READY, "zero", "100")  # int() of this used to end the broker
    bad.send(wire.W_READY, "-1", "100")
    good = Peer(ctx, broker.endpoint("workers"))
    good.send(wire.W_READY, "0", "100")
    good.send(wire.W_HEARTBEAT, "{not json")
    good.send(wire.W_HEARTBEAT, '{"calls": -3}')
    ingress = Peer(ctx, broker.endpoint("ingress"))
    wait_for_workers(ingress, 1)  # only the good one registered
    ingress.send(wire.I_OPEN, "ok", "r", "{}")
    assert good.expect(wire.B_ASSIGN)[0] == "ok"


def test_the_status_carries_the_least_loaded_workers_lag_and_the_calls(
    broker: Config, ctx: zmq.Context[zmq.Socket[bytes]]
) -> None:
    w0, w1 = Peer(ctx, broker.endpoint("workers")), Peer(ctx, broker.endpoint("workers"))
    ingress = Peer(ctx, broker.endpoint("ingress"))
    w0.send(wire.W_READY, "0", "100")
    w1.send(wire.W_READY, "1", "101")
    wait_for_workers(ingress, 2)
    ingress.send(wire.I_OPEN, "c", "r", "{}")
    busy = w0 if w0.sock.poll(int(WAIT_MS)) else w1
    assert busy.expect(wire.B_ASSIGN)[0] == "c"
    w0.send(wire.W_HEARTBEAT, wire.Load(1 if busy is w0 else 0, 1500, 1).encode())
    w1.send(wire.W_HEARTBEAT, wire.Load(1 if busy is w1 else 0, 300, 0).encode())
    deadline = time.monotonic() + 10_000 * MS
    while True:
        ingress.send(wire.I_HEARTBEAT)
        status = wire.Status.decode(ingress.expect(wire.I_STATUS)[0])
        if status.lag_ms == 300:
            break
        assert time.monotonic() < deadline, status
    assert (status.workers, status.lag_ms, status.calls) == (2, 300, 1)


def test_calls_queued_before_the_second_worker_spread_when_it_registers(
    broker: Config, ctx: zmq.Context[zmq.Socket[bytes]]
) -> None:
    """Six calls all went to the only worker ready; when the second registers, the broker
    moves calls over one at a time (B_RELEASE, then B_ASSIGN once released) until they
    differ by at most one."""
    first, late = Peer(ctx, broker.endpoint("workers")), Peer(ctx, broker.endpoint("workers"))
    ingress = Peer(ctx, broker.endpoint("ingress"))
    first.send(wire.W_READY, "0", "100")
    wait_for_workers(ingress, 1)
    for n in range(6):
        ingress.send(wire.I_OPEN, f"call-{n}", f"ring-{n}", "{}")
    held = {first.expect(wire.B_ASSIGN)[0] for _ in range(6)}
    late.send(wire.W_READY, "1", "101")
    moved: set[str] = set()
    deadline = time.monotonic() + 20_000 * MS
    while len(moved) < 3:
        assert time.monotonic() < deadline, f"moved {moved}"
        first.send(wire.W_HEARTBEAT, wire.Load(len(held)).encode())
        late.send(wire.W_HEARTBEAT, wire.Load(len(moved)).encode())
        if first.sock.poll(100):
            command, body = wire.parse(first.sock.recv_multipart())
            if command == wire.B_RELEASE:
                held.discard(body[0])
                first.send(wire.W_RELEASED, body[0])  # at its next pause
                moved.add(late.expect(wire.B_ASSIGN)[0])
    assert len(held) == len(moved) == 3
    # balanced: no further release comes
    for _ in range(6):
        first.send(wire.W_HEARTBEAT, wire.Load(3).encode())
        late.send(wire.W_HEARTBEAT, wire.Load(3).encode())
        assert not any(
            wire.parse(first.sock.recv_multipart())[0] == wire.B_RELEASE for _ in range(10) if first.sock.poll(50)
        )
