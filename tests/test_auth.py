"""Who may stream: tokens on the WebSocket, vosk and HTTP ports, an allow-list on the Event
Socket port (farm/auth.py), on one real node. The Event Socket clients here connect from
127.0.0.1 (not allowed) and from 127.0.0.2 (allowed): both loopback addresses."""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator

import pytest
import websockets

from farm.auth import AllowList, Tokens, fingerprint, without_token
from farm.client import Subscription
from farm.protocol.events import Event
from farm.sender import metadata_for

from .conftest import DATA, MS, Node, free_port, metric_value, run_call, start_node
from .peers import AudioStreamPeer, HandshakeRefused


TOKENS = ("s3cret-token", "0ther-token")


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    n = start_node(
        tmp_path_factory.mktemp("auth"),
        "--auth-tokens",
        ",".join(TOKENS),
        "--esl-allow",
        "10.9.9.0/24,127.0.0.2",
        "--vosk-port",
        str(free_port()),
        "--http-port",
        str(free_port()),
        workers=1,
    )
    yield n
    assert n.stop() == 0


def port_of(node: Node, flag: str) -> int:
    return int(node.args[node.args.index(flag) + 1])


def metrics(node: Node) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{node.port}/metrics", timeout=30) as r:
        return str(r.read().decode())


def test_a_stream_without_a_valid_token_gets_401_before_the_upgrade(node: Node) -> None:
    async def refused(path: str) -> int:
        with pytest.raises(HandshakeRefused) as refusal:
            await AudioStreamPeer("127.0.0.1", node.port, path).connect(timeout=30_000 * MS)
        assert refusal.value.headers.get("www-authenticate") == "Bearer"
        assert b"a valid token is required" in refusal.value.body
        return refusal.value.status

    async def main() -> list[int]:
        return [await refused(p) for p in ("/stream/a1", "/stream/a2?token=wrong-token", "/stream/a3?token=")]

    assert asyncio.run(main()) == [401, 401, 401]
    assert (metric_value(metrics(node), "farm_connections_refused_total", reason="unauthorized") or 0) >= 3
    # Logged once for the address, not once per attempt.
    assert node.log().count("refused 127.0.0.1: no valid token on the mod_audio_stream port") == 1
    # Health and metrics stay open for the balancer and Prometheus.
    with urllib.request.urlopen(f"http://127.0.0.1:{node.port}/healthz", timeout=30) as r:
        assert r.status == 200


def test_a_token_in_the_url_or_a_bearer_header_lets_the_call_through(node: Node) -> None:
    wav = DATA / "ko_01.wav"
    run = asyncio.run(run_call(node, wav, path_suffix=f"?rate=16000&token={TOKENS[1]}", realtime=False))
    assert run.text and run.of("call_end")[0]["reason"] == "hangup"
    # The token is not published: call_start shows the path without it.
    start = run.of("call_start")[0]
    assert start["path"].endswith("?rate=16000") and TOKENS[1] not in json.dumps(start.data)

    async def bearer() -> None:
        headers = {"Authorization": f"Bearer {TOKENS[0]}"}
        async with websockets.connect(f"{node.url}/bearer-call", additional_headers=headers) as ws:
            await ws.close()

    asyncio.run(bearer())


def test_the_vosk_and_http_ports_ask_for_the_token_too(node: Node) -> None:
    vosk = f"ws://127.0.0.1:{port_of(node, '--vosk-port')}"

    async def vosk_status(url: str) -> int:
        try:
            async with websockets.connect(url, open_timeout=30_000 * MS) as ws:
                await ws.send('{"eof" : 1}')
                await asyncio.wait_for(ws.recv(), 30_000 * MS)
                return 101
        except websockets.InvalidStatus as exc:
            return exc.response.status_code

    assert asyncio.run(vosk_status(vosk)) == 401
    assert asyncio.run(vosk_status(f"{vosk}/?token={TOKENS[0]}")) == 101
    http = f"http://127.0.0.1:{port_of(node, '--http-port')}/transcribe"
    with pytest.raises(urllib.error.HTTPError) as refusal:
        urllib.request.urlopen(urllib.request.Request(http, data=b"RIFF", method="POST"), timeout=30)
    assert refusal.value.code == 401


def test_the_event_socket_port_takes_only_the_allowed_addresses(node: Node) -> None:
    port = node.esl_port

    def first_bytes(source: str) -> bytes:
        """What farm says to an Event Socket client from ``source`` (FreeSWITCH waits for it)."""
        with socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0)) as s:
            s.settimeout(30)
            return s.recv(100)

    assert first_bytes("127.0.0.1") == b""  # closed at once
    assert first_bytes("127.0.0.1") == b""
    assert first_bytes("127.0.0.2").startswith(b"connect")  # farm takes control of the channel
    assert node.log().count("refused 127.0.0.1: not in --esl-allow") == 1
    assert (metric_value(metrics(node), "farm_connections_refused_total", reason="not allowed") or 0) >= 2


def test_token_and_network_specs_parse_or_say_why(tmp_path: object) -> None:
    assert Tokens.from_spec("").allows("/x", None)  # no tokens: none required
    assert Tokens.from_spec("abcdefgh").allows("/x?token=abcdefgh", None)
    assert not Tokens.from_spec("abcdefgh").allows("/x?token=abcdefgx", "Bearer nope-nope")
    assert Tokens.from_spec("abcdefgh").allows("/x", "bearer  abcdefgh ")
    with pytest.raises(ValueError, match="at least 8"):
        Tokens.from_spec("short")
    with pytest.raises(ValueError, match="cannot read"):
        Tokens.from_spec("@/nonexistent/tokens")
    allowed = AllowList.from_spec("10.0.0.0/8, 192.0.2.7, 2001:db8::/32")
    assert allowed.allows("10.1.2.3") and allowed.allows("::ffff:192.0.2.7") and allowed.allows("2001:db8::1")
    assert not allowed.allows("192.0.2.8") and not allowed.allows("not-an-address")
    assert AllowList.from_spec("").allows("203.0.113.9")
    with pytest.raises(ValueError, match="not a network"):
        AllowList.from_spec("10.0.0.0/33")
    assert without_token("/stream/c1?token=abcdefgh&rate=8000") == "/stream/c1?rate=8000"
    assert without_token("/stream/c1?rate=8000") == "/stream/c1?rate=8000"


def test_a_call_id_belongs_to_the_token_that_opened_it(node: Node) -> None:
    """Another token cannot take a call's id, live or ended: 1008 and nothing published
    under the id; the owner's token continues it (leg 2). call_start says who is who."""
    call_id = f"owned-{uuid.uuid4()}"
    owner, intruder = f"/{call_id}?rate=16000&token={TOKENS[0]}", f"/{call_id}?rate=16000&token={TOKENS[1]}"

    async def stream(path: str, frames: int = 10) -> AudioStreamPeer:
        peer = await AudioStreamPeer("127.0.0.1", node.port, path).connect(timeout=30_000 * MS)
        await peer.send_text(metadata_for(call_id, 16000, 1))
        for _ in range(frames):
            await peer.send_binary(bytes(640))
        return peer

    async def refused(path: str) -> AudioStreamPeer:
        peer = await stream(path, frames=1)
        await asyncio.wait_for(peer.closed.wait(), 30_000 * MS)
        peer.abort()
        return peer

    async def main() -> tuple[list[Event], list[AudioStreamPeer], list[Event]]:
        async with Subscription(node.events, call_id) as sub:
            first = await stream(owner)
            start = await sub.next(timeout=30)
            taken_live = await refused(intruder)  # while the owner streams
            await first.close()
            events = [start, *await until_end(sub)]
            taken_ended = await refused(intruder)  # after it ended
            again = await stream(owner)  # the owner's reconnect: the call's next leg
            await again.close()
            return events, [taken_live, taken_ended], await until_end(sub)

    first_leg, intruders, second_leg = asyncio.run(main())
    for peer in intruders:
        assert peer.close_code == 1008 and peer.close_reason.startswith("call id taken by another token"), peer
    # Nothing of the intruders reached the call's subscribers: one call_start and one
    # call_end per leg, no error.
    assert [e.type for e in first_leg if e.type in ("call_start", "call_end", "error")] == ["call_start", "call_end"]
    assert [e.type for e in second_leg if e.type in ("call_start", "call_end", "error")] == ["call_start", "call_end"]
    start1, start2 = first_leg[0], second_leg[0]
    assert start1["leg"] == 1 and start2["leg"] == 2
    assert start1["credential"] == start2["credential"] == fingerprint(TOKENS[0].encode())
    assert start1["peer"].startswith("127.0.0.1:") and start1["peer"] != start2["peer"]
    assert TOKENS[0] not in json.dumps(start1.data)
    refusals = metric_value(metrics(node), "farm_connections_refused_total", reason="call id taken by another token")
    assert (refusals or 0) >= 2


async def until_end(sub: Subscription) -> list[Event]:
    events = [await sub.next(timeout=60)]
    while events[-1].type != "call_end":
        events.append(await sub.next(timeout=60))
    return events
