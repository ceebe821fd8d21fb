"""Open-file limits (farm/limits.py): every process raises its soft limit to the hard one,
and a worker out of file descriptors anyway refuses the calls it cannot attach, by name,
instead of dying (and taking every call it serves with it); with room again, it serves."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import time
import uuid
import wave
from collections.abc import Iterator

import pytest
import websockets

from farm.client import Subscription
from farm.protocol.events import Event
from farm.sender import metadata_for

from .conftest import DATA, MS, Node, run_call, start_node


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    n = start_node(tmp_path_factory.mktemp("farm-limits"), workers=1)
    yield n
    assert n.stop() == 0


def test_every_farm_process_runs_with_its_soft_open_files_limit_raised_to_the_hard_one(node: Node) -> None:
    for role in ("supervisor", "broker", "ingress", "worker"):
        pids = [node.proc.pid] if role == "supervisor" else node.pids(role)
        for pid in pids:
            soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
            assert soft == hard, (role, soft, hard)
    assert "open files limit" in node.log()


def test_a_worker_out_of_file_descriptors_refuses_calls_by_name_and_keeps_serving(node: Node) -> None:
    [worker] = node.pids("worker")
    in_use = len(os.listdir(f"/proc/{worker}/fd"))
    # Room for a few more rings and no more, as a worker that did not raise its limit would
    # be after ~500 calls: a ring takes two descriptors (the segment's, and mmap's own dup).
    soft, hard = resource.prlimit(worker, resource.RLIMIT_NOFILE)
    resource.prlimit(worker, resource.RLIMIT_NOFILE, (in_use + 9, hard))
    with wave.open(str(DATA / "ko_02.wav")) as w:
        speech = w.readframes(w.getnframes())

    async def scenario() -> list[list[Event]]:
        ids = [f"fd-{i}-{uuid.uuid4()}" for i in range(12)]
        subs = [Subscription(node.events, call_id) for call_id in ids]
        for sub in subs:
            assert await sub.ready(timeout=30_000 * MS)
        calls = []
        for call_id in ids:
            ws = await websockets.connect(f"{node.url}/{call_id}", open_timeout=30)
            await ws.send(metadata_for(call_id, 16000, 1))
            calls.append(ws)
        for ws in calls:  # all open before any speech: each holds its ring
            for i in range(0, len(speech), 1280):
                await ws.send(speech[i : i + 1280])
        seen: list[list[Event]] = [[] for _ in ids]
        deadline = time.monotonic() + 20_000 * MS  # what the worker says about each, meanwhile
        while time.monotonic() < deadline:
            for events, sub in zip(seen, subs, strict=True):
                with contextlib.suppress(TimeoutError):
                    events.append(await sub.next(timeout=0.05))
        for ws in calls:
            await ws.close()
        for sub in subs:
            sub.close()
        return seen

    seen = asyncio.run(scenario())
    refused = [e for events in seen for e in events if e.type == "error"]
    assert refused, [[e.type for e in events] for events in seen]
    assert all("worker could not attach" in e["reason"] and "Too many open files" in e["reason"] for e in refused)
    assert node.pids("worker") == [worker]  # no crash, no respawn
    # Room again: the same worker serves a call to its final.
    resource.prlimit(worker, resource.RLIMIT_NOFILE, (soft, hard))
    run = asyncio.run(run_call(node, DATA / "ko_02.wav", realtime=False))
    assert run.finals and node.pids("worker") == [worker]
