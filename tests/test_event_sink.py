"""Events a dialer cannot miss: a real node writes every event into a real Redis stream
(Debian's redis-server, started here on a free loopback port, no persistence), a dialer
reads it with a consumer group; Redis going away costs farm nothing but bounded, counted
drops, and its return is picked up."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from .conftest import DATA, MS, Node, free_port, metric_value, run_call, start_node


STREAM = "farm:test-events"
BUFFER = 5  # events kept while Redis is gone: a call says more than this


class RedisServer:
    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        exe = shutil.which("redis-server")
        assert exe, "redis-server is not installed (.ci/run installs Debian's package)"
        args = [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.proc = subprocess.Popen([*args, "--dir", str(self.workdir)], stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 20_000 * MS
        while True:
            try:
                redis.Redis(port=self.port).ping()
                return
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(20)
            self.proc = None


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    s = RedisServer(tmp_path_factory.mktemp("redis"))
    s.start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def node(server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    n = start_node(
        tmp_path_factory.mktemp("sink"),
        "--redis-url",
        f"redis://127.0.0.1:{server.port}/0",
        "--redis-stream",
        STREAM,
        "--redis-buffer",
        str(BUFFER),
        workers=1,
    )
    yield n
    assert n.stop() == 0


def stream_of(port: int, call_id: str, group: str) -> list[dict[str, object]]:
    """The call's entries, read as a dialer does: XREADGROUP with a consumer group."""
    r = redis.Redis(port=port)
    try:
        r.xgroup_create(STREAM, group, id="0")
    except redis.ResponseError:
        pass  # the group exists
    out = []
    while batch := r.xreadgroup(group, "dialer-1", {STREAM: ">"}, count=500):
        for _key, entries in batch:
            for entry_id, fields in entries:
                r.xack(STREAM, group, entry_id)
                if fields[b"call_id"].decode() == call_id:
                    assert fields[b"type"].decode() == json.loads(fields[b"event"])["type"]
                    out.append(json.loads(fields[b"event"]))
    return out


def metrics(node: Node) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{node.port}/metrics", timeout=30) as r:
        return str(r.read().decode())


def test_every_event_of_a_call_is_in_the_stream_in_order(node: Node, server: RedisServer) -> None:
    run = asyncio.run(run_call(node, DATA / "ko_01.wav", realtime=False))
    deadline = time.monotonic() + 20_000 * MS
    while len(stored := stream_of(server.port, run.call_id, "g1")) < len(run.events):
        assert time.monotonic() < deadline, (len(stored), len(run.events))
        time.sleep(0.1)
    # What ZeroMQ gave the subscriber, the stream holds: the same events, in the same order.
    assert [(e["type"], e["seq"]) for e in stored] == [(e.type, e.seq) for e in run.events]
    assert stored[-1]["type"] == "call_end" and run.text
    assert (metric_value(metrics(node), "farm_events_stored_total") or 0) >= len(stored)


def test_redis_gone_costs_farm_nothing_but_bounded_counted_drops(node: Node, server: RedisServer) -> None:
    server.stop()
    try:
        dropped_before = metric_value(metrics(node), "farm_events_dropped_total", reason="redis unreachable") or 0
        during = asyncio.run(run_call(node, DATA / "ko_01.wav", realtime=False))
        assert during.text and during.events[-1].type == "call_end"  # the call itself lost nothing
        dropped = metric_value(metrics(node), "farm_events_dropped_total", reason="redis unreachable") or 0
        assert dropped - dropped_before >= len(during.events) - BUFFER
    finally:
        server.start()  # same port: the node's client reconnects
    after = asyncio.run(run_call(node, DATA / "ko_01.wav", realtime=False))
    deadline = time.monotonic() + 30_000 * MS
    while len(stored := stream_of(server.port, after.call_id, "g2")) < len(after.events):
        assert time.monotonic() < deadline, (len(stored), len(after.events))
        time.sleep(0.1)
    assert [e["type"] for e in stored] == [e.type for e in after.events]
    # The first BUFFER events of the call during the outage were kept and written on return.
    kept = stream_of(server.port, during.call_id, "g3")
    assert [(e["type"], e["seq"]) for e in kept] == [(e.type, e.seq) for e in during.events[:BUFFER]]
    log = node.log()
    assert log.count("unreachable (") == 1 and log.count("reachable again") == 1, log[-3000:]
