"""What a peer sends cannot grow the ingress without bound.

A dialer's ``play`` requests queue audio per call only up to ``--playback-max-queued-s``
(a play past it is refused, naming the limit; what was queued plays on), and an Event
Socket peer's message bodies are refused past ``--esl-max-body-bytes`` before they are
read (that connection closes with a logged reason, an ``error`` event and ``call_end``;
the node's other calls go on) and leave no memory behind.

FreeSWITCH here is the peer of bench/fs_peer.py; the node, its workers and the model
are real. Memory is the ingress's own resident set (/proc/<pid>/status), checked
against bounds that hold on any machine: far below what the peers sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.fs_peer import SocketAudioCall
from farm.client import CommandError, Commands, Subscription
from farm.protocol.events import Event

from .conftest import MS, Node, start_node
from .test_socket_audio import pcm_of, prompt


MAX_QUEUED_S = 2
BIG_BODY = 16 * 1024 * 1024  # FreeSWITCH's own limit (mes.c), which farm accepted
BODY_LIMIT = 1024 * 1024  # --esl-max-body-bytes's default
MIB = 1024 * 1024


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    n = start_node(tmp_path_factory.mktemp("farm-bounded"), "--playback-max-queued-s", str(MAX_QUEUED_S), workers=1)
    yield n
    assert n.stop() == 0


class Call:
    """One peer call and its events."""

    def __init__(self, node: Node, **peer: object) -> None:
        self.node = node
        self.peer = SocketAudioCall(**peer)  # type: ignore[arg-type]
        self.sub = Subscription(node.events, self.peer.uuid)
        self.events: list[Event] = []

    async def start(self) -> Call:
        assert await self.sub.ready(timeout=30_000 * MS)
        await self.peer.connect("127.0.0.1", self.node.esl_port, timeout=30_000 * MS)
        await asyncio.wait_for(self.peer.audio_connected.wait(), 30_000 * MS)
        return self

    async def until(self, type: str, timeout: float = 60_000 * MS, **match: object) -> Event:
        found = [e for e in self.events if e.type == type and all(e.get(k) == v for k, v in match.items())]
        deadline = time.monotonic() + timeout
        while not found:
            try:
                e = await self.sub.next(timeout=max(0.01, deadline - time.monotonic()))
            except TimeoutError:
                raise AssertionError(f"no {type} {match} in {timeout:.0f} s: {[e.type for e in self.events]}") from None
            self.events.append(e)
            if e.type == type and all(e.get(k) == v for k, v in match.items()):
                found.append(e)
        return found[0]

    def of(self, type: str) -> list[Event]:
        return [e for e in self.events if e.type == type]

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.peer.aclose()
        self.sub.close()


def memory_kib(pid: int) -> tuple[int, int]:
    """(resident now, resident peak) of a process, KiB."""
    status = Path(f"/proc/{pid}/status").read_text()
    now = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
    peak = re.search(r"^VmHWM:\s+(\d+) kB", status, re.M)
    assert now and peak, status
    return int(now.group(1)), int(peak.group(1))


def reset_peak(pid: int) -> bool:
    """Start the peak resident set (VmHWM) again from now; False where the kernel will not."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def test_a_play_past_the_queued_audio_limit_is_refused_with_the_limit_and_the_queue_plays_on(node: Node) -> None:
    async def scenario() -> tuple[Call, str]:
        call = await Call(node).start()
        try:
            async with Commands(node.commands, timeout=60_000 * MS) as farm:
                await farm.play(call.peer.uuid, prompt(1.5), rate=22050, play_id="first")
                with pytest.raises(CommandError) as refused:
                    # 1.5 s queued (or less, as it plays) + 2.5 s: always over 2 s
                    await farm.play(call.peer.uuid, prompt(2.5), rate=22050, play_id="too-much")
                await farm.play(call.peer.uuid, prompt(0.4), rate=22050, play_id="then")
                for play_id in ("first", "then"):
                    await call.until("playback_stop", id=play_id)
                state = await farm.state(call.peer.uuid)
                assert state["queued"] == [] and state["queued_ms"] == 0
            # FreeSWITCH plays it all, at its own pace (24 kHz int16: 48 bytes a millisecond).
            deadline = time.monotonic() + 60_000 * MS
            while sum(len(frame) for _, frame in call.peer.played) < (1500 + 400) * 48:
                assert time.monotonic() < deadline, "FreeSWITCH never played the queued clips"
                await asyncio.sleep(0.05)
            await call.peer.hangup()
            await call.until("call_end")
        finally:
            await call.close()
        return call, str(refused.value)

    call, refused = asyncio.run(scenario())
    assert re.fullmatch(
        r"\d+ ms are queued and this clip is 2500 ms: over the limit of 2000 ms of queued audio "
        r"\(--playback-max-queued-s\)",
        refused,
    ), refused
    # What was queued before and after the refusal played whole; the refused clip never started.
    stops = [(e["id"], e["reason"], e["played_ms"]) for e in call.of("playback_stop")]
    assert stops == [("first", "complete", 1500), ("then", "complete", 400)]
    assert [e["id"] for e in call.of("playback_start")] == ["first", "then"]


def test_an_oversized_event_socket_body_closes_that_connection_only_and_leaves_no_memory_behind(node: Node) -> None:
    """Five peers send a 16 MiB api/response body: four on live calls, one on a channel whose
    socket_audio stopped (farm keeps its Event Socket until FreeSWITCH hangs up). A good
    call streams speech meanwhile."""
    message = b"Content-Type: api/response\nContent-Length: %d\n\n" % BIG_BODY + bytes(BIG_BODY)
    reason = f"bad Event Socket input: content-length {BIG_BODY} exceeds the limit of {BODY_LIMIT} bytes"

    async def send(call: Call) -> None:
        with contextlib.suppress(ConnectionError):  # farm closes before the body is through
            await call.peer.send_raw(message)

    async def scenario() -> tuple[Call, list[Call], Call, tuple[int, int], tuple[int, int], bool]:
        (ingress,) = node.pids("ingress")
        good = await Call(node).start()
        bad = [await Call(node).start() for _ in range(4)]
        stopped = await Call(node).start()
        calls = [good, *bad, stopped]
        try:
            speaking = asyncio.create_task(good.peer.stream(pcm_of("ko_02.wav")))
            await stopped.peer.stop_audio()  # uuid_socket_audio_stop: the call ends, the channel stays
            await stopped.until("call_end")
            peak_reset = reset_peak(ingress)
            before = memory_kib(ingress)
            await asyncio.gather(*(send(c) for c in [*bad, stopped]))
            for call in bad:
                await call.until("error")
                await call.until("call_end")
            for call in [*bad, stopped]:
                await asyncio.wait_for(call.peer.closed.wait(), 60_000 * MS)
            after = memory_kib(ingress)
            await asyncio.wait_for(speaking, 60_000 * MS)
            await good.until("final")
            await good.peer.hangup()
            await good.until("call_end")
            return good, bad, stopped, before, after, peak_reset
        finally:
            for call in calls:
                await call.close()

    good, bad, stopped, before, after, peak_reset = asyncio.run(scenario())
    for call in bad:
        assert [e["reason"] for e in call.of("error")] == [f"Event Socket: {reason}"]
    log = node.log()
    assert f"call {stopped.peer.uuid}: Event Socket closed: {reason}" in log, log[-3000:]
    assert [e.type for e in good.of("error")] == [] and good.of("final")[0]["text"]
    # 80 MiB were sent; the ingress refused each body at its header, so neither its peak
    # nor what it holds afterwards grew by anything like one of them.
    if peak_reset:
        assert after[1] - before[0] < 32 * MIB // 1024, (before, after)
    assert after[0] - before[0] < 32 * MIB // 1024, (before, after)
