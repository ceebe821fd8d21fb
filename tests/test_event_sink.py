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
BUFFER = 10  # events kept while Redis is gone: the outage's calls say more than this


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
                redis.Redis(port=self.port, socket_timeout=2).ping()
                return
            except redis.RedisError:
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


def stored(port: int) -> dict[str, list[dict[str, object]]]:
    """The stream's events by call id, in stream order."""
    out: dict[str, list[dict[str, object]]] = {}
    for _entry_id, fields in redis.Redis(port=port).xrange(STREAM):
        event = json.loads(fields[b"event"])
        assert (fields[b"call_id"].decode(), fields[b"type"].decode()) == (event["call_id"], event["type"])
        out.setdefault(event["call_id"], []).append(event)
    return out


def wait_stored(port: int, call_id: str, n: int) -> list[dict[str, object]]:
    deadline = time.monotonic() + 30_000 * MS
    while len(events := stored(port).get(call_id, [])) < n:
        assert time.monotonic() < deadline, (len(events), n)
        time.sleep(0.1)
    return events


def read_as_a_dialer(port: int, group: str) -> list[str]:
    """Entry ids as a consumer group hands them out (XREADGROUP), acknowledged one by one."""
    r = redis.Redis(port=port)
    r.xgroup_create(STREAM, group, id="0")
    ids = []
    while batch := r.xreadgroup(group, "dialer-1", {STREAM: ">"}, count=7):
        for _key, entries in batch:
            for entry_id, _fields in entries:
                ids.append(entry_id.decode())
                r.xack(STREAM, group, entry_id)
    assert r.xpending(STREAM, group)["pending"] == 0
    return ids


def metrics(node: Node) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{node.port}/metrics", timeout=30) as r:
        return str(r.read().decode())


def test_every_event_of_a_call_is_in_the_stream_in_order(node: Node, server: RedisServer) -> None:
    run = asyncio.run(run_call(node, DATA / "ko_01.wav", realtime=False))
    events = wait_stored(server.port, run.call_id, len(run.events))
    # What ZeroMQ gave the subscriber, the stream holds: the same events, in the same order.
    assert [(e["type"], e["seq"]) for e in events] == [(e.type, e.seq) for e in run.events]
    assert events[-1]["type"] == "call_end" and run.text
    assert (metric_value(metrics(node), "farm_events_stored_total") or 0) >= len(events)
    # A dialer's consumer group gets every entry once, in order.
    ids = read_as_a_dialer(server.port, "dialer")
    assert ids == [i.decode() for i, _ in redis.Redis(port=server.port).xrange(STREAM)]


def test_redis_gone_costs_farm_nothing_but_bounded_counted_drops(node: Node, server: RedisServer) -> None:
    server.stop()
    try:
        dropped_before = metric_value(metrics(node), "farm_events_dropped_total", reason="redis unreachable") or 0
        during = [asyncio.run(run_call(node, DATA / "ko_01.wav", realtime=False)) for _ in range(3)]
        for run in during:  # the calls themselves lost nothing
            assert run.text and run.events[-1].type == "call_end"
        said = sum(len(run.events) for run in during)
        assert said > BUFFER
        # The ingress's own subscriber may take the last call_end a moment after ours: wait for it.
        deadline = time.monotonic() + 20_000 * MS
        while (metric_value(metrics(node), "farm_events_dropped_total", reason="redis unreachable") or 0) - (
            dropped_before
        ) < said - BUFFER:
            assert time.monotonic() < deadline, "events past the buffer were not counted as dropped"
            time.sleep(0.1)
    finally:
        server.start()  # same port, empty (no persistence): the node's client reconnects
    deadline = time.monotonic() + 30_000 * MS  # within its retry interval (1 s)
    while "reachable again" not in node.log():
        assert time.monotonic() < deadline, "the sink never wrote to the restarted Redis"
        time.sleep(0.1)
    after = asyncio.run(run_call(node, DATA / "ko_01.wav", realtime=False))
    events = wait_stored(server.port, after.call_id, len(after.events))
    assert [(e["type"], e["seq"]) for e in events] == [(e.type, e.seq) for e in after.events]
    # What was kept during the outage was written on return: BUFFER events, each call's a
    # beginning of what it said (newer ones were the ones dropped).
    kept = stored(server.port)
    assert sum(len(kept.get(run.call_id, [])) for run in during) == BUFFER
    for run in during:
        mine = kept.get(run.call_id, [])
        assert [(e["type"], e["seq"]) for e in mine] == [(e.type, e.seq) for e in run.events[: len(mine)]]
    log = node.log()
    assert log.count("unreachable (") == 1 and log.count("reachable again") == 1, log[-3000:]
