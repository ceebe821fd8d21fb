"""HAProxy's agent-check (farm/ingress/agent.py): the line for each state, and a real
HAProxy (Debian's package, started here on loopback ports) that weights two real nodes
by their free capacity and stops sending calls to the one that drains."""

from __future__ import annotations

import asyncio
import shutil
import signal
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import websockets

from farm.client import Subscription
from farm.ingress.agent import agent_reply
from farm.protocol.events import Event
from farm.sender import metadata_for, send_pcm

from .conftest import MS, Node, free_port, start_node
from .haproxy import HAProxy, wait_for


class TestReply:
    def test_a_node_without_a_capacity_takes_calls_at_full_weight(self) -> None:
        assert agent_reply(False, False, False, 7, 0) == "ready up 100%\n"

    def test_the_weight_is_the_share_of_the_capacity_still_free(self) -> None:
        assert agent_reply(False, False, False, 0, 12) == "ready up 100% maxconn:12\n"
        assert agent_reply(False, False, False, 3, 12) == "ready up 75% maxconn:12\n"
        assert agent_reply(False, False, False, 299, 300) == "ready up 1% maxconn:300\n"  # one more fits
        assert agent_reply(False, False, False, 12, 12) == "ready up 0% maxconn:12\n"

    def test_a_refusing_node_gets_no_new_calls_and_a_draining_one_is_drained(self) -> None:
        assert agent_reply(False, False, True, 2, 12) == "ready up 0% maxconn:12\n"
        assert agent_reply(False, True, False, 0, 12) == "ready down\n"
        assert agent_reply(True, True, True, 5, 12) == "drain\n"


def ask_agent(port: int) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"garbage HAProxy might send with agent-send\n")
        return s.makefile().readline()


def buzz(seconds: float, rate: int = 16000) -> bytes:
    """A loud harmonic buzz: the VAD hears speech for as long as it lasts (the call is mid-utterance)."""
    t = np.arange(int(seconds * rate)) / rate
    wave = sum(np.sin(2 * np.pi * 150 * k * t) / k for k in range(1, 12))
    return (6000 * wave * (1 + 0.3 * np.sin(2 * np.pi * 4 * t))).astype("<i2").tobytes()


def loopback_haproxy(tmp: Path, nodes: dict[str, tuple[Node, int]]) -> tuple[HAProxy, int]:
    """HAProxy in front of the nodes, as deploy/haproxy/haproxy.cfg has it, on loopback; and its port."""
    port = free_port()
    servers = "\n".join(
        f"    server {name} 127.0.0.1:{node.port} weight 100 check inter 500ms "
        f"agent-check agent-port {agent} agent-inter 300ms"
        for name, (node, agent) in nodes.items()
    )
    config = f"""global
defaults
    mode http
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    timeout tunnel 1h
frontend calls
    bind 127.0.0.1:{port}
    default_backend farm_nodes
backend farm_nodes
    balance leastconn
    option httpchk GET /readyz
{servers}
"""
    return HAProxy(tmp, config), port


@pytest.fixture
def two_nodes(tmp_path: Path) -> Iterator[tuple[dict[str, tuple[Node, int]], HAProxy, int]]:
    if not shutil.which("haproxy"):
        pytest.fail("haproxy is not installed (.ci/run installs Debian's package)")
    nodes: dict[str, tuple[Node, int]] = {}
    haproxy = None
    try:
        for name in ("a", "b"):
            agent = free_port()
            # A fixed cost per call, not this machine's measure: node a holds a known few calls.
            capacity = (
                ("--admission-cpu", "0.5", "--admission-call-cpu-ms", "250", "--drain-timeout", "30")
                if name == "a"
                else ()
            )
            (tmp_path / name).mkdir()
            node = start_node(tmp_path / name, "--agent-port", str(agent), *capacity, workers=1)
            nodes[name] = (node, agent)
        haproxy, port = loopback_haproxy(tmp_path, nodes)
        yield nodes, haproxy, port
    finally:
        if haproxy is not None:
            haproxy.stop()
        for node, _ in nodes.values():
            node.stop()


def test_haproxy_weights_nodes_by_free_capacity_and_drains_a_stopping_one(
    two_nodes: tuple[dict[str, tuple[Node, int]], HAProxy, int],
) -> None:
    nodes, haproxy, port = two_nodes
    (a, a_agent), (b, b_agent) = nodes["a"], nodes["b"]
    wait_for(lambda: ask_agent(a_agent).startswith("ready up 100% maxconn:"), "node a ready with a capacity")
    capacity = int(ask_agent(a_agent).split("maxconn:")[1])
    assert ask_agent(b_agent) == "ready up 100%\n"  # no capacity set: no limit
    wait_for(lambda: haproxy.stat("a")["status"] == "UP" and haproxy.stat("b")["status"] == "UP", "both nodes UP")

    async def scenario() -> tuple[list[str], list[Event]]:
        lines: list[str] = []
        # One call held on node a (directly): its weight drops to the free share.
        held_id = f"held-{uuid.uuid4()}"
        watch = Subscription(a.events, held_id)
        assert await watch.ready(timeout=30_000 * MS)
        held = asyncio.create_task(
            send_pcm(f"{a.url}/{held_id}", buzz(30), rate=16000, metadata=metadata_for(held_id, 16000, 1))
        )
        expect = 0 if capacity == 1 else max(1, round(100 * (capacity - 1) / capacity))
        await asyncio.to_thread(
            wait_for, lambda: ask_agent(a_agent).startswith(f"ready up {expect}%"), "node a's weight down"
        )
        await asyncio.to_thread(wait_for, lambda: haproxy.stat("a")["weight"] == str(expect), "HAProxy's weight for a")
        lines.append(ask_agent(a_agent))
        # SIGTERM: node a drains while its caller is mid-utterance; HAProxy drains it.
        while (await watch.next(timeout=30_000 * MS)).type != "speech_start":
            pass
        a.proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(wait_for, lambda: ask_agent(a_agent) == "drain\n", "node a saying drain")
        await asyncio.to_thread(wait_for, lambda: haproxy.drained("a"), "node a drained in HAProxy")
        # A new call through HAProxy goes to node b.
        new_id = f"new-{uuid.uuid4()}"
        async with Subscription(b.events, new_id) as sub:
            assert await sub.ready(timeout=30_000 * MS)
            await send_pcm(
                f"ws://127.0.0.1:{port}/{new_id}",
                bytes(16000),
                rate=16000,
                realtime=False,
                metadata=metadata_for(new_id, 16000, 1),
            )
            events = [await sub.next(timeout=30_000 * MS)]
        watch.close()
        held.cancel()
        try:
            await held
        except (asyncio.CancelledError, websockets.ConnectionClosed):
            pass
        return lines, events

    lines, events = asyncio.run(scenario())
    assert events[0].type == "call_start", events  # node b took the call HAProxy had
    assert a.proc.wait(timeout=60) == 0
