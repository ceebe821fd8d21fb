"""Bad input on the mod_audio_stream port must hurt nobody else.

Every test streams a GOOD call (tests/data speech, sent in real time as
mod_audio_stream would) while something bad happens beside it on the same node:
plain HTTP, odd chunks, a 10 MB message, broken metadata, an unknown rate, silent
and idle sockets, a client that vanishes. The good call's finals must be those of
an undisturbed direct decode, it must end with call_end, and the node — the same
ingress process — must still be alive afterwards. Bad connections that stand in for
FreeSWITCH use :class:`tests.peers.AudioStreamPeer`, a byte-exact peer of
mod_audio_stream (not FreeSWITCH itself).

The node runs like the capture tests' (test_captures.py says why): ``--no-gating
--no-recognizer-reuse``, and the reference is conftest's ``direct_decode`` with the
worker's partial schedule, so an undisturbed call gives exactly its finals.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import struct
import threading
import time
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.frames import Opcode

from farm.client import Subscription
from farm.protocol.events import Event
from farm.sender import metadata_for, read_wav

from .conftest import (
    DATA,
    MS,
    CallRun,
    Node,
    direct_decode,
    farm_segments,
    metric_value,
    run_call,
    similarity,
    start_node,
)
from .peers import AudioStreamPeer, HandshakeRefused
from .test_captures import EXACT, PARTIAL_FRAMES


GOOD = DATA / "ko_01.wav"  # the good call beside every bad input
OTHER = DATA / "ko_02.wav"  # audio for bad connections that must still be transcribed


@dataclass
class Farm:
    node: Node
    ingress: int  # the ingress pid at start: it must never change


@pytest.fixture(scope="module")
def farm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Farm]:
    for wav in (GOOD, OTHER):
        assert wav.is_file(), f"{wav} is missing (tests/data is populated with the speech files)"
    # The reference decodes run while the node starts.
    refs = threading.Thread(target=lambda: [reference(wav) for wav in (GOOD, OTHER)])
    refs.start()
    node = start_node(tmp_path_factory.mktemp("farm-bad"), *EXACT)
    refs.join()
    (ingress,) = node.pids("ingress")
    yield Farm(node, ingress)
    assert node.stop() == 0


# -- helpers ----------------------------------------------------------------------

_refs: dict[Path, list[str]] = {}


def reference(wav: Path) -> list[str]:
    """The undisturbed direct decode of ``wav``, fed as a worker feeds Vosk (cached)."""
    if wav not in _refs:
        _refs[wav] = direct_decode(wav, partial_every=PARTIAL_FRAMES)
    return _refs[wav]


def assert_transcribed(events: list[Event], wav: Path) -> None:
    """The call began, ended with call_end, and its finals are those of a direct decode."""
    assert events and events[0].type == "call_start", [e.type for e in events[:3]]
    assert events[-1].type == "call_end"
    finals = [e["text"] for e in events if e.type == "final" and e["text"]]
    ref = reference(wav)
    assert ref, f"no speech in the direct decode of {wav}: the comparison would prove nothing"
    assert finals == ref or similarity(" ".join(finals), " ".join(ref)) >= 0.9, (finals, ref)


def assert_good(farm: Farm, run: CallRun) -> None:
    assert not run.of("error"), run.of("error")
    assert not run.of("overrun"), run.of("overrun")
    assert_transcribed(run.events, GOOD)
    assert run.sent is not None and run.sent.close_code == 1000
    end = run.events[-1]
    assert end["reason"] == "hangup" and end["detail"].startswith("close 1000"), end.data  # the sender's Close


def assert_alive(farm: Farm) -> None:
    assert farm.node.proc.poll() is None, farm.node.log()[-3000:]
    assert farm.node.pids("ingress") == [farm.ingress], "the ingress was restarted"
    assert "ingress exited" not in farm.node.log()
    status, _, body = asyncio.run(http_get(farm.node.port, "/healthz"))
    assert (status, body) == (200, b"ok\n")


def rings_gone(farm: Farm, timeout: float = 30_000 * MS) -> list[str]:
    deadline = time.monotonic() + timeout
    while farm_segments(farm.ingress) and time.monotonic() < deadline:
        time.sleep(0.05)
    return farm_segments(farm.ingress)


async def http_get(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    """A plain HTTP/1.1 GET on a raw socket (what curl or a load balancer sends)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: curl/8.5.0\r\nAccept: */*\r\n\r\n".encode()
    )
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 20_000 * MS)
    status_line, *lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    body = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", "0"))), 20_000 * MS)
    writer.close()
    return int(status_line.split()[1]), headers, body


async def beside_good_call(
    farm: Farm, bad: Callable[[], Awaitable[Any]], *, start_after_s: float = 0.5
) -> tuple[CallRun, Any]:
    """Run the good call in real time and, ``start_after_s`` into it, the bad thing."""

    async def later() -> Any:
        await asyncio.sleep(start_after_s)
        return await bad()

    good, result = await asyncio.gather(run_call(farm.node, GOOD, call_id=f"good-{uuid.uuid4()}"), later())
    return good, result


async def events_until_end(sub: Subscription, timeout: float = 30_000 * MS) -> list[Event]:
    events: list[Event] = []
    deadline = time.monotonic() + timeout
    while not events or events[-1].type != "call_end":
        events.append(await sub.next(timeout=max(0.01, deadline - time.monotonic())))
    return events


def wav_pcm(wav: Path) -> bytes:
    pcm, rate, channels = read_wav(str(wav))
    assert (rate, channels) == (16000, 1)
    return pcm


# -- the tests ------------------------------------------------------------------------


def test_a_plain_http_get_is_answered_426_and_health_and_metrics_answer_while_a_call_streams(farm: Farm) -> None:
    async def bad() -> tuple[Any, ...]:
        refused = await http_get(farm.node.port, f"/stream/{uuid.uuid4()}")
        health = await http_get(farm.node.port, "/healthz")
        ready = await http_get(farm.node.port, "/readyz")
        metrics = await http_get(farm.node.port, "/metrics")
        return refused, health, ready, metrics

    good, (refused, health, ready, metrics) = asyncio.run(beside_good_call(farm, bad, start_after_s=1.0))
    status, headers, body = refused
    assert status == 426
    assert headers["content-type"].startswith("text/plain")
    assert b"WebSocket" in body and b"mod_audio_stream" in body and b"/healthz" in body
    assert (health[0], health[2]) == (200, b"ok\n")
    assert (ready[0], ready[2]) == (200, b"ready: 2 workers\n")
    assert metrics[0] == 200 and metrics[1]["content-type"].startswith("text/plain; version=0.0.4")
    text = metrics[2].decode()
    assert (metric_value(text, "farm_calls_total") or 0) >= 1
    assert (metric_value(text, "farm_calls_active") or 0) >= 1
    assert (metric_value(text, "farm_connections_refused_total", reason="not a websocket request") or 0) >= 1
    assert "refused a plain HTTP request for /stream/" in farm.node.log()
    assert_good(farm, good)
    assert_alive(farm)


def test_binary_messages_with_odd_byte_counts_are_carried_and_transcribe_correctly(farm: Farm) -> None:
    """An amigniter peer sends OTHER in alternating 641/639-byte messages (every other
    message ends mid-sample), paced at 20 ms per 640 bytes."""
    call_id = f"odd-{uuid.uuid4()}"

    async def bad() -> list[Event]:
        async with Subscription(farm.node.events, call_id) as sub:
            peer = await AudioStreamPeer("127.0.0.1", farm.node.port, f"/stream/{call_id}?rate=16000").connect()
            pcm = wav_pcm(OTHER)
            await peer.send_pcm(pcm, [641, 639], 0.020)
            await peer.close()
            assert peer.close_code == 1000
            return await events_until_end(sub)

    good, odd = asyncio.run(beside_good_call(farm, bad, start_after_s=0.0))
    assert not [e for e in odd if e.type == "error"]
    assert odd[-1]["duration_ms"] == len(wav_pcm(OTHER)) // 32
    assert_transcribed(odd, OTHER)
    assert_good(farm, good)
    assert_alive(farm)


def test_a_10_mb_message_is_refused_with_1009_and_logged(farm: Farm) -> None:
    call_id = f"big-{uuid.uuid4()}"

    async def bad() -> tuple[AudioStreamPeer, list[Event]]:
        async with Subscription(farm.node.events, call_id) as sub:
            peer = await AudioStreamPeer("127.0.0.1", farm.node.port, f"/stream/{call_id}?rate=16000").connect()
            await peer.send_text(metadata_for(call_id, 16000, 1))
            for _ in range(10):
                await peer.send_binary(bytes(640))
            try:
                await peer.send_binary(bytes(10 * 1024 * 1024))
            except ConnectionError:
                pass  # the server may reset while the 10 MB are still on their way
            await asyncio.wait_for(peer.closed.wait(), 20_000 * MS)
            await asyncio.wait_for(peer.eof.wait(), 20_000 * MS)
            peer.abort()
            return peer, await events_until_end(sub)

    good, (peer, big) = asyncio.run(beside_good_call(farm, bad))
    assert peer.close_code == 1009, (peer.close_code, peer.close_reason)
    assert big[0].type == "call_start" and big[-1].type == "call_end"
    assert big[-1]["reason"] == "error" and big[-1]["detail"] == f"closed with 1009 {peer.close_reason}"
    log = farm.node.log()
    assert f"call {call_id}: closed with 1009 {peer.close_reason}" in log, log[-2000:]
    assert "10485760" in peer.close_reason  # the reason names the size
    assert_good(farm, good)
    assert_alive(farm)


def test_invalid_json_metadata_is_reported_and_the_call_goes_on(farm: Farm) -> None:
    """Garbage metadata (sptmru's use-after-free, amigniter#53) first, then audio: the
    call is served with what the URL says and an error event says why. JSON Python
    cannot hold (nested 100 000 deep, a 5000-digit number) is garbage too."""
    call_id = f"garbage-{uuid.uuid4()}"
    garbage = {
        call_id: '{"event":"start","uuid":"\x13\x00\xff',
        f"{call_id}-deep": "[" * 100_000,
        f"{call_id}-digits": '{"rate": ' + "9" * 5000 + "}",
    }

    async def one(cid: str, text: str, audio: bool) -> list[Event]:
        async with Subscription(farm.node.events, cid) as sub:
            peer = await AudioStreamPeer("127.0.0.1", farm.node.port, f"/stream/{cid}?rate=16000").connect()
            await peer.send_text(text)
            await peer.send_pcm(wav_pcm(OTHER) if audio else bytes(16000), [640], 0.020)
            await peer.close()
            assert peer.close_code == 1000
            return await events_until_end(sub)

    async def bad() -> list[list[Event]]:
        return await asyncio.gather(*(one(cid, text, cid == call_id) for cid, text in garbage.items()))

    good, runs = asyncio.run(beside_good_call(farm, bad))
    for (cid, _), events in zip(garbage.items(), runs, strict=True):
        errors = [e for e in events if e.type == "error"]
        assert len(errors) == 1 and errors[0].call_id == cid, [e.type for e in events]
        assert re.match(r"metadata is not (usable )?JSON \(.+\), ignored$", errors[0]["reason"]), errors[0]["reason"]
        start = events[0]
        assert (start.type, start["rate"], start["channels"], start["metadata"]) == ("call_start", 16000, 1, {})
        assert events[-1].type == "call_end"
    transcribed = runs[0]
    assert_transcribed([e for e in transcribed if e.type != "error"], OTHER)
    assert "metadata is not JSON" in farm.node.log()
    assert_good(farm, good)
    assert_alive(farm)


def test_an_unknown_rate_in_the_url_is_closed_with_1003_naming_the_rate(farm: Farm) -> None:
    """uuid_audio_stream refuses 44100 and "24k" (parsed as 24) itself (§1.2); a URL that
    says so anyway gets Close 1003 with the reason, right after the upgrade. So do rates
    that are no number at all, quotes and newlines included, without breaking /metrics."""
    cases = {
        "?rate=44100": "unsupported sample rate 44100",
        "?rate=24k": "unsupported sample rate 24 ",
        "?rate=12345": "unsupported sample rate 12345",
        "?sample_rate=inf": "sample rate 'inf' is not a number",
        "?rate=a%22b%0Ac": "sample rate 'a\"b\\nc' is not a number",
        "?channels=3": "unsupported channel count 3",
    }

    async def one(query: str) -> tuple[AudioStreamPeer, list[Event]]:
        call_id = str(uuid.uuid4())
        async with Subscription(farm.node.events, call_id) as sub:
            peer = await AudioStreamPeer("127.0.0.1", farm.node.port, f"/stream/{call_id}{query}").connect()
            await peer.send_binary(bytes(640))  # audio already on its way, as libwsc queues it
            await asyncio.wait_for(peer.closed.wait(), 20_000 * MS)
            await asyncio.wait_for(peer.eof.wait(), 20_000 * MS)
            peer.abort()
            return peer, await events_until_end(sub)

    async def bad() -> list[tuple[AudioStreamPeer, list[Event]]]:
        return await asyncio.gather(*(one(q) for q in cases))

    good, results = asyncio.run(beside_good_call(farm, bad))
    for (query, reason), (peer, events) in zip(cases.items(), results, strict=True):
        assert peer.status == 101
        assert peer.close_code == 1003, (query, peer.close_code, peer.close_reason)
        assert reason in peer.close_reason, (query, peer.close_reason)
        assert len(peer.close_reason.encode()) <= 123
        # The call never began, and its subscribers hear why it ended all the same.
        [end] = events
        assert (end.type, end["reason"], end.seq, end["duration_ms"]) == ("call_end", "refused", 0, 0)
        assert reason in end["detail"], (query, end.data)
    log = farm.node.log()
    assert "closing: unsupported sample rate 44100" in log
    assert "connection handler failed" not in log
    # /metrics stays parseable and bounded: one label per kind of refusal, no client text.
    status, _, body = asyncio.run(http_get(farm.node.port, "/metrics"))
    assert status == 200
    refused = {
        s.labels["reason"]: s.value
        for f in text_string_to_metric_families(body.decode())  # raises on a line it cannot parse
        for s in f.samples
        if s.name == "farm_connections_refused_total"
    }
    assert refused["unsupported sample rate N"] >= 3  # 44100, 24 and 12345 share it
    assert all(not re.search(r"[\d\n\"']", reason) for reason in refused), refused
    assert_good(farm, good)
    assert_alive(farm)


def test_a_client_that_connects_and_sends_nothing_is_harmless_and_closed_by_the_server(farm: Farm) -> None:
    """One bare TCP connection (no upgrade) and one amigniter peer that upgrades and
    then sends nothing: the good call is served meanwhile; the server closes both once
    its first-message timeout (10 s) has run, not before."""

    async def bad() -> tuple[bytes, float, AudioStreamPeer, float, list[Event]]:
        call_id = str(uuid.uuid4())
        async with Subscription(farm.node.events, call_id) as sub:
            t0 = time.monotonic()
            reader, writer = await asyncio.open_connection("127.0.0.1", farm.node.port)
            peer = await AudioStreamPeer("127.0.0.1", farm.node.port, f"/stream/{call_id}").connect()
            # Harmless while the good call streams: still open after 3 s.
            await asyncio.sleep(3.0)
            assert not reader.at_eof() and not peer.closed.is_set()
            data = await asyncio.wait_for(reader.read(), 60_000 * MS)
            tcp_closed = time.monotonic() - t0
            writer.close()
            await asyncio.wait_for(peer.eof.wait(), 60_000 * MS)
            peer_closed = time.monotonic() - t0
            peer.abort()
            return data, tcp_closed, peer, peer_closed, await events_until_end(sub)

    good, (data, tcp_closed, peer, peer_closed, events) = asyncio.run(beside_good_call(farm, bad, start_after_s=0.0))
    assert [(e.type, e["reason"]) for e in events] == [("call_end", "idle")]
    assert data == b""  # closed without an answer
    assert tcp_closed >= 9.9 and peer_closed >= 9.9  # the 10 s timeout (timers round to ms), from after t0
    assert peer.close_code == 1008, (peer.close_code, peer.close_reason)
    assert "no message in" in peer.close_reason
    assert_good(farm, good)
    assert_alive(farm)


def test_500_idle_tcp_connections_do_not_keep_a_call_from_its_transcript(farm: Farm) -> None:
    async def main() -> tuple[CallRun, int]:
        conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        for _ in range(10):
            conns += await asyncio.gather(*(asyncio.open_connection("127.0.0.1", farm.node.port) for _ in range(50)))
        try:
            good = await run_call(farm.node, GOOD, call_id=f"good-{uuid.uuid4()}")
            health = await http_get(farm.node.port, "/healthz")
            assert health[0] == 200
            still_open = sum(1 for r, _ in conns if not r.at_eof())
        finally:
            for _, w in conns:
                w.transport.abort()
        return good, still_open

    good, still_open = asyncio.run(main())
    assert still_open > 0  # they really were there while the call streamed
    assert_good(farm, good)
    assert_alive(farm)


def test_a_client_that_vanishes_mid_call_still_gets_call_end_and_its_ring_unlinked(farm: Farm) -> None:
    """An amigniter peer streams OTHER for 1 s, then its TCP connection is aborted
    without a Close frame (FreeSWITCH killed, network gone) while the good call streams."""
    call_id = f"vanish-{uuid.uuid4()}"

    async def bad() -> list[Event]:
        async with Subscription(farm.node.events, call_id) as sub:
            peer = await AudioStreamPeer("127.0.0.1", farm.node.port, f"/stream/{call_id}").connect()
            await peer.send_text(metadata_for(call_id, 16000, 1))
            await peer.send_pcm(wav_pcm(OTHER)[:32000], [640], 0.020)
            peer.abort()
            return await events_until_end(sub)

    good, gone = asyncio.run(beside_good_call(farm, bad, start_after_s=0.0))
    assert gone[0].type == "call_start" and gone[-1].type == "call_end"
    assert gone[-1]["duration_ms"] == 1000
    assert (gone[-1]["reason"], gone[-1]["detail"]) == ("hangup", "no close frame")
    assert f"call {call_id}: connection lost (no close frame)" in farm.node.log()
    assert_good(farm, good)
    assert rings_gone(farm) == []
    assert_alive(farm)


def test_a_call_id_or_metadata_with_a_newline_writes_no_line_of_its_own_into_the_log(farm: Farm) -> None:
    """Two calls name themselves with a newline and a fake log line: one in the URL path
    (percent-encoded, as FreeSWITCH would pass it), one in its metadata. The ingress,
    the broker and a worker all log about them; not one line of the log is the peer's."""
    fake = "CRITICAL fake"
    in_path = f"path-{uuid.uuid4()}\n{fake} line from the path"
    in_meta = f"meta-{uuid.uuid4()}\r\n{fake} line from the metadata"

    async def call(call_id: str, path: str, metadata: str) -> list[Event]:
        async with Subscription(farm.node.events, call_id) as sub:
            peer = await AudioStreamPeer("127.0.0.1", farm.node.port, path).connect()
            await peer.send_text(metadata)
            await peer.send_pcm(wav_pcm(OTHER)[:32000], [640], 0.020)
            await peer.close()
            return await events_until_end(sub)

    async def bad() -> list[list[Event]]:
        return await asyncio.gather(
            call(in_path, f"/stream/{urllib.parse.quote(in_path, safe='')}?rate=16000", "{}"),
            call(in_meta, "/?rate=16000", json.dumps({"call_id": in_meta, "note": f"\n{fake} note"})),
        )

    good, runs = asyncio.run(beside_good_call(farm, bad, start_after_s=0.0))
    for call_id, events in zip((in_path, in_meta), runs, strict=True):
        assert events[0].type == "call_start" and events[-1].type == "call_end"
        assert all(e.call_id == call_id for e in events)  # the id itself is the peer's, unchanged
    log = farm.node.log()
    injected = [line for line in log.splitlines() if line.startswith(fake)]
    assert injected == [], injected
    # Each is logged, escaped, as the call's field by every process that served it.
    for call_id in (in_path, in_meta):
        field = "call " + json.dumps(call_id) + ": "
        assert f"farm.ingress.ws: {field}mod_audio_stream from" in log
        assert f"farm.broker: {field}assigned to worker" in log
        assert f"workers.worker: {field}done," in log
    assert_good(farm, good)
    assert_alive(farm)


# -- a seeded fuzz run ------------------------------------------------------------------

FUZZ_CASES = 300
FUZZ_SEED = 20261206


def _raw_frame(rng: random.Random) -> bytes:
    """One client frame with a random first byte (FIN, RSV bits, any opcode, reserved ones
    included) and a random payload, masked as a client must."""
    payload = rng.randbytes(rng.choice([0, 1, 2, 3, 125, 126, 200, 641]))
    length = len(payload)
    head = bytes([rng.randrange(256)])
    head += bytes([0x80 | length]) if length < 126 else bytes([0x80 | 126]) + struct.pack("!H", length)
    mask = rng.randbytes(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def _bad_metadata(rng: random.Random) -> str:
    value = rng.choice([-1, 0, 3.5, "16000", None, [], {}, True, 2**70, "x" * 5000])
    key = rng.choice(["rate", "sample_rate", "channels", "call_id", "farm_amd", "farm_intents", "farm_tones"])
    return rng.choice([json.dumps({key: value}), json.dumps([key, value]), json.dumps(value), "{" + key])


async def _fuzz_one(port: int, rng: random.Random) -> tuple[str, int | None]:
    """One malformed connection; (what it was, the server's close code or None)."""
    kind = rng.choice(["tcp", "frame", "text", "metadata", "binary-first", "close"])
    if kind == "tcp":  # not even an upgrade
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(rng.choice([rng.randbytes(rng.randrange(1, 3000)), b"GET /x HTTP/1.1\r\n" + rng.randbytes(300)]))
        writer.write_eof()
        await asyncio.wait_for(reader.read(), 30_000 * MS)
        writer.close()
        return kind, None
    call_id = f"fuzz-{rng.randrange(10**9)}"
    try:
        peer = await AudioStreamPeer("127.0.0.1", port, f"/stream/{call_id}?rate=16000").connect(timeout=30_000 * MS)
    except HandshakeRefused:
        return kind, None
    try:
        if kind == "frame":
            peer.writer.write(_raw_frame(rng))  # type: ignore[union-attr]
        elif kind == "text":  # not UTF-8, or no JSON
            raw = rng.randbytes(rng.randrange(1, 300))
            peer._send_frame(Opcode.TEXT, raw)
        elif kind == "metadata":
            await peer.send_text(_bad_metadata(rng))
            await peer.send_binary(rng.randbytes(rng.choice([1, 3, 639, 641])))
        elif kind == "binary-first":
            await peer.send_binary(rng.randbytes(rng.choice([1, 641, 1279])))
            peer._send_frame(Opcode.TEXT, rng.randbytes(20))
        else:  # a Close with any code, and maybe a reason that is not UTF-8
            code = rng.choice([999, 1004, 1005, 1006, 1016, 2999, 5000, 1000])
            peer._send_frame(Opcode.CLOSE, struct.pack("!H", code) + rng.randbytes(rng.randrange(0, 4)))
            peer._close_sent = True
        await peer._drain()
        # Then FreeSWITCH hangs up (a Close, unless one went already): the connection ends.
        await peer.close(timeout=30_000 * MS)
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        peer.abort()
    return kind, peer.close_code


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_a_few_hundred_seeded_malformed_connections_cost_only_themselves(farm: Farm) -> None:
    """300 malformed connections (seeded: the same ones every run), eight at a time, while
    the good call streams: no close says 1011 (an exception of ours), every one ends, the
    good call gets its finals, and the workers hold no more file descriptors than before."""
    workers = farm.node.pids("worker")
    fds_before = {pid: _open_fds(pid) for pid in workers}
    rng = random.Random(FUZZ_SEED)
    seeds = [rng.randrange(2**32) for _ in range(FUZZ_CASES)]

    async def bad() -> list[tuple[str, int | None]]:
        gate = asyncio.Semaphore(8)

        async def one(seed: int) -> tuple[str, int | None]:
            async with gate:
                return await _fuzz_one(farm.node.port, random.Random(seed))

        return await asyncio.gather(*(one(s) for s in seeds))

    good, results = asyncio.run(beside_good_call(farm, bad, start_after_s=0.0))
    assert len(results) == FUZZ_CASES
    assert {kind for kind, _ in results} == {"tcp", "frame", "text", "metadata", "binary-first", "close"}
    internal = [(kind, code) for kind, code in results if code == 1011]
    assert not internal, internal
    assert_good(farm, good)
    assert rings_gone(farm) == []
    assert_alive(farm)
    deadline = time.monotonic() + 30_000 * MS
    while any(_open_fds(pid) > fds_before[pid] + 2 for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert {pid: _open_fds(pid) for pid in workers} == pytest.approx(fds_before, abs=2)
