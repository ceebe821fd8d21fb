"""The broker process against real ZeroMQ peers speaking FARMW01 (no farm workers).

The peers here are test stand-ins for workers and the ingress: plain DEALER sockets
that send the contract's frames, so the broker is exercised exactly as on a node.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from farm.broker import wire
from farm.config import Config
from farm.protocol.events import Event

from .conftest import MS, free_port


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Config]:
    config = Config(run_dir=str(tmp_path), events=f"tcp://127.0.0.1:{free_port()}")
    env = dict(os.environ, FARM_CONFIG=config.to_json())
    proc = subprocess.Popen([sys.executable, "-m", "farm.broker.broker"], env=env, start_new_session=True)
    deadline = time.monotonic() + 10_000 * MS
    while not (tmp_path / "workers.ipc").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    yield config
    proc.terminate()
    assert proc.wait(10) == 0


class Peer:
    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def send(self, command: bytes, *body: str) -> None:
        self.sock.send_multipart(wire.message(command, *body))

    def expect(self, command: bytes, timeout: float = 2000 * MS) -> list[str]:
        """Next message other than a heartbeat; fails if none comes in time."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.sock.poll(50):
                got, body = wire.parse(self.sock.recv_multipart())
                if got == wire.B_HEARTBEAT:
                    continue
                assert got == command, f"got {wire.name(got)}, expected {wire.name(command)}"
                return body
        raise AssertionError(f"no {wire.name(command)} within {timeout:.1f} s")

    def heartbeat_for(self, seconds: float, calls: int) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.send(wire.W_HEARTBEAT, str(calls))
            time.sleep(wire.HEARTBEAT_INTERVAL / 2)


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
    time.sleep(0.1)
    for n in range(4):
        ingress.send(wire.I_OPEN, f"call-{n}", f"ring-{n}", "{}")
    got0 = [w0.expect(wire.B_ASSIGN)[0] for _ in range(2)]
    got1 = [w1.expect(wire.B_ASSIGN)[0] for _ in range(2)]
    assert sorted(got0 + got1) == [f"call-{n}" for n in range(4)]


def test_a_call_waits_for_a_worker_when_none_is_ready(broker: Config, ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    ingress = Peer(ctx, broker.endpoint("ingress"))
    ingress.send(wire.I_OPEN, "early", "ring-e", '{"protocol": "audio_stream"}')
    time.sleep(0.3)
    w = Peer(ctx, broker.endpoint("workers"))
    w.send(wire.W_READY, "0", "100")
    assert w.expect(wire.B_ASSIGN) == ["early", "ring-e", '{"protocol": "audio_stream"}']


def test_a_silent_worker_loses_its_calls_within_about_a_second(broker: Config, ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    quiet, alive = Peer(ctx, broker.endpoint("workers")), Peer(ctx, broker.endpoint("workers"))
    ingress = Peer(ctx, broker.endpoint("ingress"))
    quiet.send(wire.W_READY, "0", "100")
    time.sleep(0.1)
    ingress.send(wire.I_OPEN, "c1", "ring-1", "{}")
    assert quiet.expect(wire.B_ASSIGN)[0] == "c1"
    alive.send(wire.W_READY, "1", "101")
    t0 = time.monotonic()
    # `alive` keeps beating; `quiet` says nothing from now on.
    while True:
        alive.send(wire.W_HEARTBEAT, "0")
        if alive.sock.poll(int(wire.HEARTBEAT_INTERVAL * 500)):
            command, body = wire.parse(alive.sock.recv_multipart())
            if command == wire.B_ASSIGN:
                break
        assert time.monotonic() - t0 < 3000 * MS, "the call was not reassigned"
    assert body[:2] == ["c1", "ring-1"]
    assert time.monotonic() - t0 < 2000 * MS
    # The silent worker, back from the dead, is told to start over.
    quiet.send(wire.W_HEARTBEAT, "1")
    quiet.expect(wire.B_DISCONNECT)


def test_worker_done_reaches_the_ingress(broker: Config, ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    w = Peer(ctx, broker.endpoint("workers"))
    ingress = Peer(ctx, broker.endpoint("ingress"))
    w.send(wire.W_READY, "0", "100")
    time.sleep(0.1)
    ingress.send(wire.I_OPEN, "c9", "ring-9", "{}")
    w.expect(wire.B_ASSIGN)
    w.send(wire.W_DONE, "c9")
    assert ingress.expect(wire.I_DONE) == ["c9"]


def test_a_disconnecting_worker_hands_its_calls_over_at_once(broker: Config, ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    w0, w1 = Peer(ctx, broker.endpoint("workers")), Peer(ctx, broker.endpoint("workers"))
    ingress = Peer(ctx, broker.endpoint("ingress"))
    w0.send(wire.W_READY, "0", "100")
    time.sleep(0.1)
    ingress.send(wire.I_OPEN, "c1", "r1", "{}")
    w0.expect(wire.B_ASSIGN)
    w1.send(wire.W_READY, "1", "101")
    time.sleep(0.1)
    w0.send(wire.W_DISCONNECT)
    assert w1.expect(wire.B_ASSIGN, timeout=500 * MS)[0] == "c1"


def test_events_are_relayed_to_subscribers_by_call_id(broker: Config, ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    pub = ctx.socket(zmq.PUB)
    pub.connect(broker.endpoint("events_in"))
    sub_one = ctx.socket(zmq.SUB)
    sub_all = ctx.socket(zmq.SUB)
    for s in (sub_one, sub_all):
        s.connect(broker.events)
    sub_one.setsockopt(zmq.SUBSCRIBE, Event("final", "abc").to_frames()[0])
    sub_all.setsockopt(zmq.SUBSCRIBE, b"")
    time.sleep(0.3)
    for call_id in ("abcd", "abc"):
        pub.send_multipart(Event("final", call_id, 1, 0, {"text": call_id}).to_frames())
    got_all = [Event.from_json(sub_all.recv_multipart()[1]).call_id for _ in range(2)]
    assert got_all == ["abcd", "abc"]
    assert sub_one.poll(int(2000 * MS))
    assert Event.from_json(sub_one.recv_multipart()[1]).call_id == "abc"
    assert not sub_one.poll(200)
    for s in (pub, sub_one, sub_all):
        s.close(0)


def test_garbage_does_not_stop_the_broker(broker: Config, ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    junk = ctx.socket(zmq.DEALER)
    junk.connect(broker.endpoint("workers"))
    junk.send_multipart([b"", b"HTTP/1.1", b"GET"])
    junk.send_multipart([b"nonsense"])
    w = Peer(ctx, broker.endpoint("workers"))
    ingress = Peer(ctx, broker.endpoint("ingress"))
    ingress.sock.send_multipart([b"", wire.HEADER, b"\x55"])
    w.send(wire.W_READY, "0", "100")
    time.sleep(0.1)
    ingress.send(wire.I_OPEN, "ok", "r", "{}")
    assert w.expect(wire.B_ASSIGN)[0] == "ok"
    junk.close(0)


def test_the_ingress_heartbeat_is_answered_with_the_number_of_live_workers(
    broker: Config, ctx: zmq.Context[zmq.Socket[bytes]]
) -> None:
    ingress = Peer(ctx, broker.endpoint("ingress"))
    ingress.send(wire.I_HEARTBEAT)
    assert ingress.expect(wire.I_STATUS) == ["0"]
    w = Peer(ctx, broker.endpoint("workers"))
    w.send(wire.W_READY, "0", "100")
    time.sleep(0.1)
    ingress.send(wire.I_HEARTBEAT)
    assert ingress.expect(wire.I_STATUS) == ["1"]
