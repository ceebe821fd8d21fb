"""Recorded FreeSWITCH 1.10.12 mod_audio_stream traffic, replayed against a real node.

The captures in tests/captures (PROTOCOLS.md §7) are what a live FreeSWITCH sent:
handshake headers, text frames, binary frame sizes and times, and the audio bytes.
They are replayed by :class:`tests.peers.AudioStreamPeer`, a peer that stands in for
FreeSWITCH byte for byte (it is not FreeSWITCH), into a real ``farm up`` with the
real Korean model; what the farm transcribes is compared with a direct Vosk decode of
the same audio, and the call's ring must be gone from /dev/shm afterwards.

How the texts are compared: the farm recognizes repeatably (MFCC dither 0, one
``AcceptWaveform`` per 20 ms frame, partials asked for every 200 ms of audio; see
workers/asr.py), so the nodes here run ``--no-gating --no-recognizer-reuse`` (Vosk
hears the whole call with a fresh recognizer, as the direct decode does) and the
reference is conftest's ``direct_decode`` with the same partial schedule. The finals
must be equal. The 8 kHz capture is held to conftest's ``same_transcript`` instead:
the worker resamples it as a stream, in chunks of whatever size the ring held when it
looked, and soxr's streamed output depends on those chunk sizes (up to 2 LSB), which
moves a word or two from run to run on this audio. The capture audio is band-limited
speech the Korean model hears with low confidence, so its words are fragile: a
dropped, repeated, swapped or misaligned 20 ms frame changes them.
"""

from __future__ import annotations

import asyncio
import base64
import json
import tempfile
import time
import wave
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from farm.client import Subscription
from farm.protocol.events import Event

from .conftest import MS, Node, direct_decode, farm_segments, same_transcript, start_node
from .peers import (
    DEFLATE_OFFER,
    HEARTBEAT,
    IX_USER_AGENT,
    AudioStreamPeer,
    Capture,
    accept_for,
    new_key,
    upgrade_request,
)


CAPTURES = Path(__file__).parent / "captures" / "freeswitch-1.10.12"
AMIGNITER_16K = CAPTURES / "audio_stream_amigniter_8kcall_16k" / "conn1.jsonl"
SPTMRU = CAPTURES / "audio_stream_sptmru_8kcall_16k" / "conn1.jsonl"
STEREO = CAPTURES / "audio_stream_amigniter_stereo" / "conn1.jsonl"
BUFFER100MS = CAPTURES / "audio_stream_amigniter_buffer100ms" / "conn1.jsonl"
ALL = [AMIGNITER_16K, SPTMRU, STEREO, BUFFER100MS]
EXACT = ("--no-gating", "--no-recognizer-reuse")
PARTIAL_FRAMES = 10  # the default --partial-interval-ms 200, in 20 ms frames


@pytest.fixture(scope="module")
def node16k(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """Assumes 16 kHz when neither URL nor metadata says, as for amigniter ``mono 16k``."""
    n = start_node(tmp_path_factory.mktemp("farm16k"), "--default-rate", "16000", *EXACT)
    yield n
    assert n.stop() == 0


@pytest.fixture(scope="module")
def node8k(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """The default --default-rate (8000), as sptmru needs: it says no rate anywhere."""
    n = start_node(tmp_path_factory.mktemp("farm8k"), *EXACT)
    yield n
    assert n.stop() == 0


_references: dict[tuple[Path, int, int], list[str]] = {}


def reference(jsonl: Path, rate: int, channels: int) -> list[str]:
    """direct_decode of the capture's raw audio, channel 0, written as a WAV at ``rate``."""
    key = (jsonl, rate, channels)
    if key not in _references:
        pcm = np.frombuffer(jsonl.with_suffix(".raw").read_bytes(), dtype="<i2").reshape(-1, channels)[:, 0]
        with tempfile.TemporaryDirectory() as tmp:
            wav = Path(tmp) / "capture.wav"
            with wave.open(str(wav), "wb") as w:
                w.setnchannels(1)
                w.setsampwidth(2)
                w.setframerate(rate)
                w.writeframes(pcm.tobytes())
            _references[key] = direct_decode(wav, partial_every=PARTIAL_FRAMES)
    return _references[key]


# -- replaying ----------------------------------------------------------------------


@dataclass
class Replayed:
    capture: Capture
    peer: AudioStreamPeer
    events: list[Event]
    arrived: list[float]  # monotonic arrival time of each event
    close_sent_at: float
    reference: list[str]

    def of(self, type: str) -> list[Event]:
        return [e for e in self.events if e.type == type]

    @property
    def finals(self) -> list[str]:
        return [e["text"] for e in self.of("final") if e["text"] and e.channel == 0]


async def replay(
    node: Node,
    jsonl: Path,
    *,
    rate: int,
    channels: int = 1,
    speed: float = 1.0,
    query: str = "",
    deflate: bool = False,
    heartbeat: bool = False,
) -> Replayed:
    """Replay ``jsonl`` at ``speed``; with ``heartbeat``, also ping once halfway through
    as the module does when STREAM_HEART_BEAT is set (the Pong lands in ``peer.pongs``)."""
    capture = Capture.load(jsonl)
    async with Subscription(node.events, capture.call_id) as sub:
        # The reference decode runs meanwhile in a thread (Vosk releases the GIL).
        ref = asyncio.create_task(asyncio.to_thread(reference, jsonl, rate, channels))
        peer = AudioStreamPeer("127.0.0.1", node.port, capture.path + query, flavor=capture.flavor, deflate=deflate)
        await peer.connect()
        events: list[Event] = []
        arrived: list[float] = []

        async def collect() -> None:
            while not events or events[-1].type != "call_end":
                events.append(await sub.next())
                arrived.append(time.monotonic())

        collector = asyncio.create_task(collect())
        duration = capture.schedule()[-1].at / speed

        async def heartbeat_halfway() -> None:
            await asyncio.sleep(duration / 2)
            await peer.ping(timeout=10_000 * MS)

        pinging = asyncio.create_task(heartbeat_halfway()) if heartbeat else None
        await asyncio.wait_for(peer.replay(capture, speed=speed, close=False), duration + 10_000 * MS)
        if pinging is not None:
            await pinging
        close_sent_at = time.monotonic()
        await peer.close(capture.schedule()[-1].code, capture.schedule()[-1].text, timeout=20_000 * MS)
        await asyncio.wait_for(collector, 30_000 * MS)
        reference_text = await ref
    return Replayed(capture, peer, events, arrived, close_sent_at, reference_text)


def ingress_pid(node: Node) -> int:
    (pid,) = node.pids("ingress")
    return pid


def assert_ring_gone(node: Node, timeout: float = 30_000 * MS) -> None:
    """The call's ring is unlinked from /dev/shm once the worker finished it."""
    pid = ingress_pid(node)
    deadline = time.monotonic() + timeout
    while farm_segments(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert farm_segments(pid) == []


def check_call(r: Replayed, node: Node, *, rate: int, channels: int) -> None:
    """What every replay must show: identity, format, transcript, a clean end."""
    start = r.of("call_start")
    assert len(start) == 1 and r.events[0].type == "call_start"
    assert start[0].call_id == r.capture.call_id  # the uuid in the last path segment
    assert (start[0]["protocol"], start[0]["rate"], start[0]["channels"]) == ("audio_stream", rate, channels)
    assert r.events[-1].type == "call_end"
    assert r.events[-1]["duration_ms"] == len(r.capture.raw) // (2 * channels) * 1000 // rate
    assert not r.of("error"), r.of("error")
    assert not r.of("overrun"), r.of("overrun")
    seqs = [e.seq for e in r.events]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "the call's event sequence has gaps"
    assert len(" ".join(r.reference).split()) >= 5, "no speech in the reference: the comparison would prove nothing"
    if rate == 16000:
        assert r.finals == r.reference
    else:
        # Resampled as a stream in chunks as the ring was read: ±2 LSB from run to run.
        assert same_transcript(r.finals, r.reference), (r.finals, r.reference)
    # The peer's Close 1000 was answered with Close 1000 (the closing handshake completed).
    assert r.peer.close_code == 1000
    assert r.peer.protocol_errors == []
    assert r.peer.sent_audio_bytes == len(r.capture.raw)
    assert node.proc.poll() is None


# -- the replay itself ------------------------------------------------------------------


@pytest.mark.parametrize("jsonl", ALL, ids=lambda p: p.parent.name)
def test_the_rebuilt_schedule_matches_what_the_recorder_summarised(jsonl: Path) -> None:
    """Unlogged frames are rebuilt from the summary: counts, bytes, span and gaps must agree."""
    capture = Capture.load(jsonl)
    steps = capture.schedule()
    summary = capture.summary
    binary = [s for s in steps if s.kind == "binary"]
    assert len(binary) == summary["bin_frames"]
    assert sum(s.size for s in binary) == summary["bin_bytes"] == len(capture.raw)
    assert [s.text for s in steps if s.kind == "text"] == capture.texts
    assert len(capture.texts) == summary["text_frames"]
    assert steps[-1].kind == "close" and steps[-1].code == 1000 and steps[-1].text == "Normal closure"
    assert [s.at for s in steps] == sorted(s.at for s in steps)
    gaps = [(b.at - a.at) * 1000 for a, b in zip(binary, binary[1:], strict=False)]
    assert abs(max(gaps) - summary["gap_ms_max"]) < 50  # the pause/resume gap stays where it was
    assert abs((binary[-1].at - binary[0].at) - summary["first_to_last_bin_s"]) < 0.05
    for r in capture.records:  # logged frames keep their recorded times exactly
        if r["ev"] == "binary":
            assert binary[r["n"] - 1].at == r["rel_s"] and binary[r["n"] - 1].logged


@pytest.mark.parametrize("jsonl", ALL, ids=lambda p: p.parent.name)
def test_the_peer_writes_the_upgrade_request_with_the_captured_headers_in_order(jsonl: Path) -> None:
    capture = Capture.load(jsonl)
    request = upgrade_request(capture.flavor, "127.0.0.1", 8080, capture.path, capture.headers["Sec-WebSocket-Key"])
    lines = request.decode("ascii").split("\r\n")
    assert lines[-2:] == ["", ""]  # CRLF line ends, blank line last
    assert lines[0] == capture.request_line
    sep = ": " if capture.flavor == "sptmru" else ":"  # libwsc writes no space after the colon
    assert lines[1:-2] == [f"{k}{sep}{v}" for k, v in capture.headers.items()]
    if capture.flavor == "sptmru":
        assert capture.headers["User-Agent"] == IX_USER_AGENT


def test_the_peer_makes_keys_like_each_generation_and_checks_the_accept_header() -> None:
    ix = base64.b64decode(new_key("sptmru"), validate=True)
    assert len(ix) == 16 and ix.isalnum()  # IXWebSocket: 16 alphanumerics, like the capture's
    assert base64.b64decode(Capture.load(SPTMRU).headers["Sec-WebSocket-Key"]).isalnum()
    assert len(base64.b64decode(new_key("amigniter"), validate=True)) == 16
    assert new_key("amigniter") != new_key("amigniter")
    assert accept_for("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="  # RFC 6455 §1.3


def test_the_amigniter_deflate_offer_is_the_one_of_tv_mas_2() -> None:
    lines = upgrade_request("amigniter", "127.0.0.1", 8765, "/fs/x", "k" * 24, deflate=True).decode().split("\r\n")
    assert lines[6] == "Sec-WebSocket-Extensions:" + DEFLATE_OFFER
    assert lines[7] == "Origin:http://127.0.0.1:8765"


# -- against a node ---------------------------------------------------------------------


def test_the_amigniter_16k_capture_replayed_in_real_time_transcribes_like_a_direct_decode(node16k: Node) -> None:
    """amigniter (libwsc) peer in real time: metadata first, 640 B / 20 ms, send_text
    mid-call, a 2 s pause gap, then a stop text and Close 1000 (PROTOCOLS.md §7). No
    rate anywhere: the node's --default-rate 16000 applies."""
    r = asyncio.run(replay(node16k, AMIGNITER_16K, rate=16000))
    check_call(r, node16k, rate=16000, channels=1)
    start = r.of("call_start")[0]
    assert start["metadata"] == {"event": "start", "uuid": r.capture.call_id}
    assert start["path"] == f"/stream/{r.capture.call_id}"
    assert not r.peer.deflate_negotiated
    # Streaming recognition: partials as the audio goes on, in the order of the audio they
    # heard (how soon they come is a bench figure, not something a busy machine can vouch for).
    partials = [e for e in r.events if e.type == "partial" and e["text"]]
    assert len(partials) >= 5
    heard = [e.stamps["recv"] for e in partials if "recv" in e.stamps]
    assert len(heard) >= 5 and heard == sorted(heard)
    # Events also came back on the WebSocket (read as mod_audio_stream::json), as JSON.
    assert any(json.loads(t).get("type") == "call_start" for t in r.peer.texts)
    assert_ring_gone(node16k)


def test_the_sptmru_capture_without_metadata_is_read_as_8k_by_default(node8k: Node) -> None:
    """sptmru (IXWebSocket) peer, 4x real time to keep the test short: IX handshake
    headers, no metadata, 1280 B every 80 ms of unresampled 8 kHz audio; the default
    --default-rate 8000 applies. One IX heart-beat ping halfway (STREAM_HEART_BEAT set)."""
    r = asyncio.run(replay(node8k, SPTMRU, rate=8000, speed=4, heartbeat=True))
    check_call(r, node8k, rate=8000, channels=1)
    # IXWebSocket closes with 1011 "Ping timeout" unless its heart-beat is answered (§1.6).
    assert r.peer.pongs == [HEARTBEAT["sptmru"]]
    assert r.of("call_start")[0]["metadata"] == {}
    assert_ring_gone(node8k)


def test_the_stereo_capture_is_transcribed_on_the_caller_channel(node16k: Node) -> None:
    """amigniter peer, 4x real time: ``stereo 16k``, 1280 B interleaved frames only while
    the channel plays audio (4 s of nothing first). The URL says rate and channels."""
    r = asyncio.run(replay(node16k, STEREO, rate=16000, channels=2, speed=4, query="?rate=16000&channels=2"))
    check_call(r, node16k, rate=16000, channels=2)
    assert r.of("final") and all(e.channel == 0 for e in r.of("final"))  # --transcribe caller (default)
    assert_ring_gone(node16k)


def test_the_100ms_buffer_capture_is_transcribed_like_a_direct_decode(node16k: Node) -> None:
    """amigniter peer with STREAM_BUFFER_SIZE=100, 4x real time: 3200 B every 100 ms."""
    r = asyncio.run(replay(node16k, BUFFER100MS, rate=16000, speed=4))
    check_call(r, node16k, rate=16000, channels=1)
    assert_ring_gone(node16k)


def test_the_amigniter_capture_with_deflate_offered_negotiates_it_and_gives_the_same_text(node16k: Node) -> None:
    """amigniter peer offering permessage-deflate as in TV-MAS-2 (builds without
    STREAM_MESSAGE_DEFLATE=true), 4x real time: frames are compressed both ways. One
    libwsc heart-beat ping halfway (STREAM_HEART_BEAT set)."""
    r = asyncio.run(replay(node16k, AMIGNITER_16K, rate=16000, speed=4, deflate=True, heartbeat=True))
    assert r.peer.deflate_negotiated
    assert r.peer.pongs == [b"ping"]  # libwsc's heart-beat, answered uncompressed
    ext = r.peer.response_headers["sec-websocket-extensions"]
    assert ext.startswith("permessage-deflate") and "client_max_window_bits=9" in ext
    check_call(r, node16k, rate=16000, channels=1)
    assert any(json.loads(t).get("type") == "call_start" for t in r.peer.texts)  # compressed events, decoded
    assert_ring_gone(node16k)
