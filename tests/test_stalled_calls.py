"""Stalled calls give their slot back: every kind of call that stops sending audio is closed.

A call holds one of ``--max-connections`` slots of its site from the moment it opens.
Connections that open a call (metadata, a vosk config and audio, a channel whose
socket_audio connected) and then send no audio must not hold it for ever: after
``--idle-timeout`` farm closes them with a reason the peer reads (WebSocket Close 1008,
an ``error`` event and ``call_end`` on the event stream; a mod_socket_audio channel is
hung up, the ``--socket-audio-fallback``), whatever they sent before, text included,
and the next good call is served.

Each test fills its site's 5 slots with calls that stream audio, sees a sixth refused,
then has all five stall at once (one of them keeps sending text): they are closed and
a good call is served. Calls that never send any audio at all (metadata only, a vosk
config only, a silent audio socket) are closed the same way beside that good call.
The peers stand in for FreeSWITCH byte for byte (tests/peers.py, bench/fs_peer.py) or
are plain vosk-server clients; the node, its workers and the model are real.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus

from bench.fs_peer import SocketAudioCall
from farm.client import Subscription
from farm.protocol.events import Event
from farm.sender import metadata_for

from .conftest import DATA, MS, Node, free_port, metric_value, run_call, start_node
from .peers import AudioStreamPeer, HandshakeRefused
from .test_socket_audio import pcm_of
from .test_vosk_protocol import session, texts


SLOTS = 5
IDLE_S = 4000 * MS
NO_AUDIO = f"no audio in {IDLE_S:g} s"


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    vosk_port = free_port()
    n = start_node(
        tmp_path_factory.mktemp("farm-stalled"),
        *("--max-connections", str(SLOTS), "--idle-timeout", f"{IDLE_S:g}", "--vosk-port", str(vosk_port)),
        workers=1,
    )
    n.vosk_url = f"ws://127.0.0.1:{vosk_port}"  # type: ignore[attr-defined]
    deadline = time.monotonic() + 20_000 * MS
    while "vosk-server protocol on" not in n.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    yield n
    assert n.stop() == 0


def active(node: Node, protocol: str) -> int:
    """The node's open calls of one protocol (/metrics): the slots taken on that site."""
    with urllib.request.urlopen(f"http://127.0.0.1:{node.port}/metrics", timeout=20) as r:
        text = r.read().decode()
    found = metric_value(text, "farm_calls_active_by_protocol", protocol=protocol)
    assert found is not None, text
    return int(found)


async def wait_until(condition: Callable[[], bool], what: str, timeout: float = 60_000 * MS) -> None:
    """Wait for a state with a generous deadline (a busy machine is slow, not wrong)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        await asyncio.sleep(0.05)


async def every(period: float, send: Callable[[], Awaitable[Any]]) -> None:
    """``send`` every ``period`` seconds until cancelled or the connection is gone."""
    with contextlib.suppress(ConnectionError, ConnectionClosed):
        while True:
            await send()
            await asyncio.sleep(period)


async def events_until_end(sub: Subscription, timeout: float = 60_000 * MS) -> list[Event]:
    events: list[Event] = []
    deadline = time.monotonic() + timeout
    while not events or events[-1].type != "call_end":
        events.append(await sub.next(timeout=max(0.01, deadline - time.monotonic())))
    return events


def closed_for_no_audio(events: list[Event]) -> bool:
    return [e["reason"] for e in events if e.type == "error"] == [NO_AUDIO] and events[-1].type == "call_end"


def test_stalled_mod_audio_stream_calls_are_closed_and_a_good_call_takes_their_slot(node: Node) -> None:
    """Five calls stream, then stall (one keeps sending text); two more send only metadata."""
    ids = [f"stalled-{i}-{uuid.uuid4()}" for i in range(SLOTS + 2)]

    async def open_peer(cid: str) -> AudioStreamPeer:
        peer = await AudioStreamPeer("127.0.0.1", node.port, f"/stream/{cid}?rate=16000").connect()
        await peer.send_text(metadata_for(cid, 16000, 1))
        return peer

    async def scenario() -> tuple[list[AudioStreamPeer], list[list[Event]], HandshakeRefused | None, Any]:
        subs = [Subscription(node.events, cid) for cid in ids]
        try:
            for sub in subs:
                assert await sub.ready(timeout=30_000 * MS)
            peers = [await open_peer(cid) for cid in ids[:SLOTS]]
            streams = [asyncio.create_task(every(IDLE_S / 10, lambda p=p: p.send_binary(bytes(640)))) for p in peers]
            await wait_until(lambda: active(node, "audio_stream") == SLOTS, "every slot taken")
            refused = None
            try:
                extra = await AudioStreamPeer("127.0.0.1", node.port, f"/stream/{uuid.uuid4()}").connect()
                extra.abort()
            except HandshakeRefused as exc:
                refused = exc
            for stream in streams:  # the audio stops; the last call keeps sending text
                stream.cancel()
            talker = asyncio.create_task(every(IDLE_S / 5, lambda: peers[-1].send_text('{"type": "mark"}')))
            events = [await events_until_end(sub) for sub in subs[:SLOTS]]
            talker.cancel()
            for peer in peers:
                await asyncio.wait_for(peer.closed.wait(), 30_000 * MS)
                peer.abort()  # FreeSWITCH closes its socket after the closing handshake
            await wait_until(lambda: active(node, "audio_stream") == 0, "the stalled calls' slots free")
            silent = [await open_peer(cid) for cid in ids[SLOTS:]]
            good = await run_call(node, DATA / "ko_02.wav")
            events += [await events_until_end(sub) for sub in subs[SLOTS:]]
            for peer in silent:
                await asyncio.wait_for(peer.closed.wait(), 30_000 * MS)
                peer.abort()
            return [*peers, *silent], events, refused, good
        finally:
            for sub in subs:
                sub.close()

    peers, events, refused, good = asyncio.run(scenario())
    # The slots were full: a sixth call was refused while the five held them.
    assert refused is not None and refused.status == 503 and b"call limit" in refused.body
    for peer, evs in zip(peers, events, strict=True):
        assert (peer.close_code, peer.close_reason) == (1008, NO_AUDIO), peer.path
        assert evs[0].type == "call_start" and closed_for_no_audio(evs), [e.type for e in evs]
    assert good.finals and not good.of("error") and good.sent is not None and good.sent.close_code == 1000


def test_stalled_vosk_clients_are_closed_and_a_good_client_takes_their_slot(node: Node) -> None:
    """Five clients stream (two without a config), then stall (one keeps sending a config);
    two more send a config and never any audio (they take no slot: no call opens)."""
    vosk_url = node.vosk_url  # type: ignore[attr-defined]
    config = json.dumps({"config": {"sample_rate": 16000}})

    async def client(with_config: bool = True) -> Any:
        ws = await websockets.connect(vosk_url)
        if with_config:
            await ws.send(config)
        return ws

    async def audio(ws: Any) -> None:
        await ws.send(bytes(640))
        await asyncio.wait_for(ws.recv(), 30_000 * MS)  # one reply to each audio message

    async def closed(ws: Any) -> Any:
        with pytest.raises(ConnectionClosed) as exc:
            while True:
                await asyncio.wait_for(ws.recv(), 60_000 * MS)
        return exc.value.rcvd

    async def errors(sub: Subscription, n: int) -> list[Event]:
        events: list[Event] = []
        deadline = time.monotonic() + 60_000 * MS
        while sum(e.type == "error" for e in events) < n:
            events.append(await sub.next(timeout=max(0.01, deadline - time.monotonic())))
        return events

    async def scenario() -> tuple[list[Any], list[Event], int, tuple[list[str], str, Any]]:
        async with Subscription(node.events) as sub:
            clients = [await client(with_config=i >= 2) for i in range(SLOTS)]
            streams = [asyncio.create_task(every(IDLE_S / 10, lambda ws=ws: audio(ws))) for ws in clients]
            await wait_until(lambda: active(node, "vosk") == SLOTS, "every slot taken")
            with pytest.raises(InvalidStatus) as refused:
                await websockets.connect(vosk_url)
            for stream in streams:
                stream.cancel()
            talker = asyncio.create_task(every(IDLE_S / 5, lambda: clients[-1].send(config)))
            rcvd = [await closed(ws) for ws in clients]
            talker.cancel()
            events = await errors(sub, SLOTS)
            await wait_until(lambda: active(node, "vosk") == 0, "the stalled clients' slots free")
            silent = [await client() for _ in range(2)]
            good = await session(node, DATA / "ko_02.wav", chunk_bytes=3200)
            rcvd += [await closed(ws) for ws in silent]
            events += await errors(sub, 2)
            return rcvd, events, refused.value.response.status_code, good

    rcvd, events, status, (replies, final, code) = asyncio.run(scenario())
    assert status == 503
    assert [(r.code, r.reason) for r in rcvd] == [(1008, NO_AUDIO)] * (SLOTS + 2)
    assert [e["reason"] for e in events if e.type == "error"] == [NO_AUDIO] * (SLOTS + 2)
    assert all(e.call_id.startswith("vosk-") for e in events if e.type == "error")
    assert code == 1000 and texts(replies, final)


def test_stalled_socket_audio_calls_are_hung_up_and_a_good_call_takes_their_slot(node: Node) -> None:
    """Five channels stream the caller's silence, then their audio stops; two more connect
    their audio socket and never send a byte."""

    async def start(peer: SocketAudioCall) -> SocketAudioCall:
        await peer.connect("127.0.0.1", node.esl_port, timeout=30_000 * MS)
        await asyncio.wait_for(peer.audio_connected.wait(), 30_000 * MS)
        return peer

    async def scenario() -> tuple[list[SocketAudioCall], list[list[Event]], Exception, SocketAudioCall, list[Event]]:
        peers = [SocketAudioCall() for _ in range(SLOTS)] + [SocketAudioCall(idle_silence=False) for _ in range(2)]
        good = SocketAudioCall()
        subs = [Subscription(node.events, p.uuid) for p in [*peers, good]]
        try:
            for sub in subs:
                assert await sub.ready(timeout=30_000 * MS)
            for peer in peers[:SLOTS]:
                await start(peer)
            await wait_until(lambda: active(node, "socket_audio") == SLOTS, "every slot taken")
            extra = SocketAudioCall()
            with pytest.raises((ConnectionError, asyncio.IncompleteReadError)) as refused:
                await extra.connect("127.0.0.1", node.esl_port, timeout=30_000 * MS)
            await extra.aclose()
            for peer in peers[:SLOTS]:
                peer.idle_silence = False  # the mic stream stops
            events = [await events_until_end(sub) for sub in subs[:SLOTS]]
            await wait_until(lambda: active(node, "socket_audio") == 0, "the stalled calls' slots free")
            for peer in peers[SLOTS:]:
                await start(peer)
            await start(good)
            await good.stream(pcm_of("ko_02.wav"))
            good_events: list[Event] = []
            while not any(e.type == "final" and e["text"] for e in good_events):
                good_events.append(await subs[-1].next(timeout=60_000 * MS))
            await good.hangup()
            good_events += await events_until_end(subs[-1])
            events += [await events_until_end(sub) for sub in subs[SLOTS:-1]]
            for peer in peers:
                await wait_until(lambda peer=peer: peer.hung_up and peer.closed.is_set(), "the call hung up")
            return peers, events, refused.value, good, good_events
        finally:
            for peer in [*peers, good]:
                await peer.aclose()
            for sub in subs:
                sub.close()

    peers, events, refused, good, good_events = asyncio.run(scenario())
    assert refused is not None  # farm closed the Event Socket of a sixth call at once
    for peer, evs in zip(peers, events, strict=True):
        assert evs[0].type == "call_start" and closed_for_no_audio(evs), [e.type for e in evs]
        assert peer.hangup_cause == "SERVICE_UNAVAILABLE"  # the fallback: farm hung it up
    assert not [e for e in good_events if e.type == "error"] and good_events[-1].type == "call_end"
    assert good.hangup_cause == "NORMAL_CLEARING"
