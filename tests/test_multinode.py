"""A farm of three nodes behind a real HAProxy, each node a host of its own.

Each node runs in a network namespace of its own (tests/netns.py: 10.0.0.11-13 on a
bridge, as deploy/haproxy/haproxy.cfg names them), and Debian's HAProxy runs that very
file, with shorter check intervals, in a hub namespace where the FreeSWITCH stand-ins
and the dialer (this test's clients) run too: calls come through HAProxy from the
mod_audio_stream sender (farm/sender.py), a mod_socket_audio call from the FreeSWITCH
peer (bench/fs_peer.py, which follows PROTOCOLS.md) straight to a node's Event Socket, as
a dialplan names it. The dialer subscribes to every node's events with one
:class:`farm.client.Subscription` and sends commands with one
:class:`farm.client.Commands` that routes each by the node named in the call's
``call_start``.

The checks run in order on the same three nodes: calls spread (leastconn, and the agent's
weight keeps them off a full node), a command reaches the node that holds the call,
SIGTERM drains a node while its call finishes and new calls go elsewhere, and kill -9
of a node loses only its own calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import subprocess
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import zmq.asyncio

from bench.fs_peer import SocketAudioCall
from farm.client import Commands, Subscription
from farm.protocol.events import Event
from farm.sender import SendResult, metadata_for, read_wav, send_pcm

from . import netns
from .conftest import DATA, MS, Node, farm_segments, start_node, wait_ready
from .haproxy import HAProxy, wait_for
from .test_agent import buzz


DEPLOY_CFG = Path(__file__).parent.parent / "deploy" / "haproxy" / "haproxy.cfg"
NAMES = ("farm1", "farm2", "farm3")
# farm1 holds one call (a pinned cost per call, not this machine's measure): the agent
# gives it maxconn 1 and weight 0 once it has it.
FARM1_CAPACITY = ("--admission-cpu", "0.01", "--admission-call-cpu-ms", "1000")
# How long farm1's drain waits for a caller in mid-utterance.
FARM1_DRAIN_S = 4


def adapted_config() -> str:
    """deploy/haproxy/haproxy.cfg with quicker checks (and no slow start) and room for a
    test's calls (its maxconn needs 200k file descriptors, more than a test may have)."""
    text = DEPLOY_CFG.read_text()
    for old, new in (
        (
            "check inter 2s fall 2 rise 2 slowstart 30s agent-check agent-port 8086 agent-inter 2s",
            "check inter 500ms fall 2 rise 2 agent-check agent-port 8086 agent-inter 300ms",
        ),
        ("    maxconn 100000\n", "    maxconn 1000\n"),
    ):
        assert old in text, f"deploy/haproxy/haproxy.cfg changed: no {old!r} to adapt"
        text = text.replace(old, new)
    return text


@dataclass
class Farm:
    lan: netns.Lan
    nodes: dict[str, Node]
    haproxy: HAProxy

    @property
    def balancer(self) -> str:
        return "ws://10.0.0.1:8080"  # the frontend's `bind :8080`, in the hub

    def live(self) -> list[str]:
        return [name for name, node in self.nodes.items() if node.proc.poll() is None]


@pytest.fixture(scope="module")
def farm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Farm]:
    why = netns.missing() or ("" if DEPLOY_CFG.exists() else "no deploy/haproxy/haproxy.cfg")
    if why:
        pytest.skip(why)
    import shutil

    if not shutil.which("haproxy"):
        pytest.skip("haproxy is not installed (.ci/run installs Debian's package)")
    tmp = tmp_path_factory.mktemp("multinode")
    lan = netns.Lan(list(NAMES))
    nodes: dict[str, Node] = {}
    haproxy = None
    try:
        for name in NAMES:
            (tmp / name).mkdir()
            nodes[name] = start_node(
                tmp / name,
                "--node-id",
                name,
                "--agent-port",
                "8086",
                # A cold recognizer is dearer, but nothing here measures: start sooner.
                "--recognizer-warm",
                "0",
                "--recognizer-warm-later",
                "0",
                *((*FARM1_CAPACITY, "--drain-timeout", str(FARM1_DRAIN_S)) if name == "farm1" else ()),
                workers=1,
                wait=False,
                netns=lan.namespaces[name],
                host=lan.addresses[name],
            )
        for node in nodes.values():
            wait_ready(node, 1)
        haproxy = HAProxy(tmp, adapted_config(), netns=lan.hub)
        wait_for(lambda: all(haproxy.stat(n)["status"] == "UP" for n in NAMES), "every node UP in HAProxy")
        yield Farm(lan, nodes, haproxy)
    finally:
        if haproxy is not None:
            haproxy.stop()
        for node in nodes.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.stop()
            _unlink_rings_of(node)
        lan.remove()


def _unlink_rings_of(node: Node) -> None:
    """A node killed with -9 leaves its calls' rings (its next start would sweep them)."""
    for pid in re.findall(r"started ingress \(pid (\d+)\)", node.log()):
        for ring in farm_segments(int(pid)):
            with contextlib.suppress(FileNotFoundError):
                Path("/dev/shm", ring).unlink()


class Dialer:
    """What a dialer holds: one subscription to every node's events, one Commands for
    every node; events are kept by call and shown to the Commands (its routes)."""

    def __init__(self, farm: Farm) -> None:
        # This thread's namespace (the hub): a context made here connects from here.
        self.ctx = zmq.asyncio.Context()
        names = farm.live()  # a stopped node would never confirm the subscription
        self.sub = Subscription([farm.nodes[n].events for n in names], ctx=self.ctx)
        self.commands = Commands({n: farm.nodes[n].commands for n in names}, ctx=self.ctx, timeout=30_000 * MS)
        self.calls: defaultdict[str, list[Event]] = defaultdict(list)
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Dialer:
        assert await self.sub.ready(timeout=30_000 * MS), "a node did not confirm the subscription"
        self.task = asyncio.create_task(self._take())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        self.sub.close()
        self.commands.close()
        self.ctx.destroy(linger=0)

    async def _take(self) -> None:
        async for event in self.sub:
            self.calls[event.call_id].append(event)
            self.commands.learn(event)

    def node_of(self, call_id: str) -> str | None:
        starts = [e for e in self.calls[call_id] if e.type == "call_start"]
        return str(starts[0]["node"]) if starts else None

    def end_of(self, call_id: str) -> Event | None:
        ends = [e for e in self.calls[call_id] if e.type == "call_end"]
        return ends[0] if ends else None

    def of(self, call_id: str, type: str) -> list[Event]:
        return [e for e in self.calls[call_id] if e.type == type]

    async def until(self, condition: Callable[[], object], what: str, timeout: float = 60_000 * MS) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, f"never happened: {what}"
            await asyncio.sleep(0.05)


def call_through(farm: Farm, call_id: str, pcm: bytes, **kw: object) -> asyncio.Task[SendResult]:
    """A mod_audio_stream call (16 kHz mono) through HAProxy."""
    return asyncio.create_task(
        send_pcm(f"{farm.balancer}/{call_id}", pcm, rate=16000, metadata=metadata_for(call_id, 16000, 1), **kw)  # type: ignore[arg-type]
    )


async def hang_up(calls: list[asyncio.Task[SendResult]]) -> None:
    """The held calls hang up (their WebSocket closes as the sender stops)."""
    for task in calls:
        task.cancel()
    await asyncio.gather(*calls, return_exceptions=True)


def run_in_hub(farm: Farm, scenario: Callable[[], object]) -> object:
    with netns.inside(farm.lan.hub):
        return asyncio.run(scenario())  # type: ignore[arg-type]


SILENCE_60S = bytes(16000 * 2 * 60)


def test_calls_spread_by_leastconn_and_by_agent_weight_and_every_node_is_heard(farm: Farm) -> None:
    async def scenario() -> tuple[Dialer, list[str], str, str]:
        async with Dialer(farm) as dialer:
            ids, held = [], []
            for i in range(6):  # one after the other: each sees the calls before it
                call_id = f"spread-{i}-{uuid.uuid4()}"
                ids.append(call_id)
                held.append(call_through(farm, call_id, SILENCE_60S))
                await dialer.until(lambda: dialer.node_of(call_id), f"call_start of {call_id}")  # noqa: B023
            # farm1 is full: its agent says weight 0, HAProxy takes it.
            await asyncio.to_thread(wait_for, lambda: farm.haproxy.stat("farm1")["weight"] == "0", "farm1 weight 0")
            # farm1 has the fewest calls, so leastconn alone would pick it: its weight says no.
            extra = f"spread-extra-{uuid.uuid4()}"
            held.append(call_through(farm, extra, SILENCE_60S))
            await dialer.until(lambda: dialer.node_of(extra), f"call_start of {extra}")
            # A command reaches the node holding the call: only that node knows it.
            for call_id in ids:
                reply = await dialer.commands.stats(call_id)
                assert reply["ok"] and dialer.commands.node_of[call_id] == dialer.node_of(call_id)
            await hang_up(held)
            for call_id in [*ids, extra]:
                await dialer.until(lambda: dialer.end_of(call_id), f"call_end of {call_id}")  # noqa: B023
            return dialer, ids, extra, str(dialer.node_of(extra))

    dialer, ids, extra, extra_node = run_in_hub(farm, scenario)  # type: ignore[misc]
    counts = Counter(dialer.node_of(c) for c in ids)
    assert counts["farm1"] == 1, counts  # its capacity: maxconn 1 from the agent
    assert sorted([counts["farm2"], counts["farm3"]]) == [2, 3], counts  # leastconn between equals
    assert extra_node != "farm1", (counts, extra_node)
    # One subscription heard every node's calls from start to end.
    assert {dialer.node_of(c) for c in ids} == set(NAMES)
    assert all(dialer.end_of(c)["reason"] == "hangup" for c in [*ids, extra])  # type: ignore[index]


def test_a_command_reaches_the_node_that_holds_the_call(farm: Farm) -> None:
    """mod_socket_audio calls come straight to a node's Event Socket (the dialplan names
    it): the dialer's one Commands plays to and flushes the call on that node."""
    prompt = (DATA / "ko_02.wav").read_bytes()

    async def scenario() -> tuple[Dialer, str, dict, dict, dict, int]:
        async with Dialer(farm) as dialer:
            peer = SocketAudioCall()
            await peer.connect(farm.lan.addresses["farm3"], 8084, timeout=30_000 * MS)
            call_id = peer.uuid
            await dialer.until(lambda: dialer.node_of(call_id), "call_start")
            played = await dialer.commands.play_wav(call_id, prompt)
            await dialer.until(lambda: dialer.of(call_id, "playback_start"), "playback_start")
            await dialer.until(lambda: peer.played, "the peer playing the prompt")
            flushed = await dialer.commands.flush(call_id)
            # A Commands never shown the call_start asks every node where the call is.
            fresh = Commands({n: farm.nodes[n].commands for n in NAMES}, ctx=dialer.ctx, timeout=30_000 * MS)
            state = await fresh.state(call_id)
            fresh.close()
            await dialer.until(lambda: dialer.of(call_id, "playback_stop"), "playback_stop")
            await peer.hangup()
            await dialer.until(lambda: dialer.end_of(call_id), "call_end")
            await peer.aclose()
            return dialer, call_id, played, flushed, state, len(peer.played)

    dialer, call_id, played, flushed, state, frames = run_in_hub(farm, scenario)  # type: ignore[misc]
    assert dialer.node_of(call_id) == "farm3" and dialer.commands.node_of.get(call_id) is None  # forgotten at its end
    assert played["ok"] and flushed["ok"] and flushed["flushed"] and state["ok"], (played, flushed, state)
    assert frames > 0
    [stop] = dialer.of(call_id, "playback_stop")
    assert stop["reason"] == "flush", stop.data


def test_sigterm_drains_a_node_while_its_call_finishes_and_new_calls_go_elsewhere(farm: Farm) -> None:
    farm1 = farm.nodes["farm1"]
    mid_utterance = buzz(20)

    async def scenario() -> tuple[Dialer, str, list[str], str]:
        async with Dialer(farm) as dialer:
            held: list[asyncio.Task[SendResult]] = []
            on_farm1, others = "", []
            # The calls before have ended: once the agent says farm1 has room again (its weight,
            # 0 while it was full, is read every check interval, later on a busy machine) ...
            await asyncio.to_thread(wait_for, lambda: farm.haproxy.stat("farm1")["weight"] != "0", "farm1 weight > 0")
            while not on_farm1:  # ... leastconn gives farm1 (empty) one of the first three
                call_id = f"drain-{uuid.uuid4()}"
                held.append(call_through(farm, call_id, mid_utterance))
                await dialer.until(lambda: dialer.node_of(call_id), f"call_start of {call_id}")  # noqa: B023
                if dialer.node_of(call_id) == "farm1":
                    on_farm1 = call_id
                else:
                    others.append(call_id)
                assert len(held) <= len(NAMES)
            await dialer.until(lambda: dialer.of(on_farm1, "speech_start"), "farm1's caller speaking")
            farm1.proc.send_signal(signal.SIGTERM)
            await asyncio.to_thread(wait_for, lambda: farm.haproxy.drained("farm1"), "farm1 drained in HAProxy")
            new = f"after-drain-{uuid.uuid4()}"
            await call_through(farm, new, bytes(16000 * 2), realtime=False)
            await dialer.until(lambda: dialer.end_of(new), "the new call's end")
            await dialer.until(lambda: dialer.end_of(on_farm1), "farm1's call's end")
            # The other nodes' calls went on through farm1's stop.
            assert not any(dialer.end_of(c) for c in others)
            await hang_up(held)
            for call_id in others:
                await dialer.until(lambda: dialer.end_of(call_id), f"call_end of {call_id}")  # noqa: B023
            return dialer, on_farm1, others, new

    dialer, on_farm1, others, new = run_in_hub(farm, scenario)  # type: ignore[misc]
    assert dialer.node_of(new) != "farm1"
    assert dialer.end_of(on_farm1)["reason"] == "drain", dialer.end_of(on_farm1)  # type: ignore[index]
    assert all(dialer.end_of(c)["reason"] == "hangup" for c in others)  # type: ignore[index]
    assert farm1.proc.wait(timeout=60) == 0


def test_kill_9_of_a_node_loses_only_its_own_calls_and_haproxy_stops_sending_to_it(farm: Farm) -> None:
    victim = "farm2"
    speech, rate, _ = read_wav(str(DATA / "ko_dialog_16k.wav"))
    assert rate == 16000
    live = farm.live()
    assert victim in live and len(live) >= 2, live

    async def scenario() -> tuple[Dialer, dict[str, SendResult | BaseException], list[str], float]:
        async with Dialer(farm) as dialer:
            ids = [f"kill-{i}-{uuid.uuid4()}" for i in range(2 * len(live))]
            calls = {}
            for call_id in ids:
                calls[call_id] = call_through(farm, call_id, speech)
                await dialer.until(lambda: dialer.node_of(call_id), f"call_start of {call_id}")  # noqa: B023
            spread = Counter(dialer.node_of(c) for c in ids)
            assert spread[victim] and len(spread) >= 2, spread
            killed_at = time.monotonic()
            farm.nodes[victim].stop(signal.SIGKILL)
            await asyncio.to_thread(
                wait_for, lambda: farm.haproxy.stat(victim)["status"].startswith("DOWN"), f"{victim} DOWN in HAProxy"
            )
            down_after = time.monotonic() - killed_at
            # New calls go to the nodes that are left.
            new = [f"after-kill-{i}-{uuid.uuid4()}" for i in range(2)]
            for call_id in new:
                await call_through(farm, call_id, bytes(16000 * 2), realtime=False)
                await dialer.until(lambda: dialer.end_of(call_id), f"call_end of {call_id}")  # noqa: B023
            sent = dict(zip(ids, await asyncio.gather(*calls.values(), return_exceptions=True), strict=True))
            survivors = [c for c in ids if dialer.node_of(c) != victim]
            for call_id in survivors:
                await dialer.until(lambda: dialer.end_of(call_id), f"call_end of {call_id}")  # noqa: B023
            return dialer, sent, new, down_after

    dialer, sent, new, down_after = run_in_hub(farm, scenario)  # type: ignore[misc]
    print(f"{victim} DOWN in HAProxy {down_after:.2f} s after kill -9 (inter 500ms fall 2)")
    for call_id, result in sent.items():
        end = dialer.end_of(call_id)
        if dialer.node_of(call_id) == victim:
            # Lost with its node: the stream cut, no call_end from a node that is gone.
            assert end is None and (isinstance(result, BaseException) or result.close_code != 1000), (end, result)
        else:
            assert isinstance(result, SendResult), result
            assert end is not None and end["reason"] == "hangup" and result.close_code == 1000, (end, result)
            assert any(e["text"] for e in dialer.of(call_id, "final")), dialer.calls[call_id]
    assert all(dialer.node_of(c) != victim for c in new)
