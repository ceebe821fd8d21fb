"""vosk-server clients against a real node: the message sequences of alphacep/vosk-server.

A plain ``websockets`` client does what vosk-server's own test clients do
(``websocket/test.py``, ``test_words.py``, ``test_alternatives.py``, vosk-asterisk):
an optional config message, binary audio with one reply read after each message,
``{"eof" : 1}`` and the final result, then the server closes. The node runs without
VAD gating, so farm's finals must equal Vosk's own decode of the same audio
(tests/test_transcripts.py says why).
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import websockets
from websockets.exceptions import ConnectionClosed

from farm.client import Subscription
from farm.protocol.events import Event

from .conftest import (
    DATA,
    MS,
    TEXTS,
    Node,
    _samples16k,
    decode_pcm,
    direct_decode,
    farm_segments,
    free_port,
    similarity,
    start_node,
)


PARTIAL_FRAMES = 10  # the default --partial-interval-ms 200, in 20 ms frames


@pytest.fixture(scope="module")
def vnode(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    port = free_port()
    n = start_node(tmp_path_factory.mktemp("vosk"), "--no-gating", "--vosk-port", str(port), workers=1)
    n.vosk_url = f"ws://127.0.0.1:{port}"  # type: ignore[attr-defined]
    deadline = time.monotonic() + 20_000 * MS
    while "vosk-server protocol on" not in n.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    yield n
    assert n.stop() == 0


def url(node: Node) -> str:
    return node.vosk_url  # type: ignore[attr-defined,no-any-return]


def pcm_of(wav: Path) -> tuple[bytes, int]:
    with wave.open(str(wav), "rb") as w:
        return w.readframes(w.getnframes()), w.getframerate()


async def session(
    node: Node,
    wav: Path,
    *,
    config: str | None = "rate",
    chunk_bytes: int = 8000,
    realtime: bool = True,
    eof: str = '{"eof" : 1}',
) -> tuple[list[str], str, Any]:
    """One vosk-server client session: replies to each chunk, the eof reply, the close."""
    pcm, rate = pcm_of(wav)
    async with websockets.connect(url(node)) as ws:
        if config == "rate":
            await ws.send(f'{{ "config" : {{ "sample_rate" : {rate} }} }}')
        elif config is not None:
            await ws.send(config)
        replies = []
        start = time.monotonic()
        for i in range(0, len(pcm), chunk_bytes):
            chunk = pcm[i : i + chunk_bytes]
            await ws.send(chunk)
            replies.append(await asyncio.wait_for(ws.recv(), 30_000 * MS))
            if realtime:
                ahead = start + (i + len(chunk)) / (2 * rate) - time.monotonic()
                if ahead > 0:
                    await asyncio.sleep(ahead)
        await ws.send(eof)
        final = await asyncio.wait_for(ws.recv(), 60_000 * MS)
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 30_000 * MS)
        return replies, final, ws.close_code


def texts(replies: list[str], final: str) -> list[str]:
    out = []
    for r in [*replies, final]:
        obj = json.loads(r)
        if "text" in obj and obj["text"]:
            out.append(obj["text"])
        elif "alternatives" in obj and obj["alternatives"][0]["text"]:
            out.append(obj["alternatives"][0]["text"])
    return out


def test_test_py_sequence_gives_one_reply_per_message_and_vosks_own_transcript(vnode: Node) -> None:
    wav = DATA / "ko_dialog_8k.wav"
    pcm, _ = pcm_of(wav)
    replies, final, code = asyncio.run(session(vnode, wav, chunk_bytes=8000))
    assert len(replies) == -(-len(pcm) // 8000)
    assert code == 1000
    for r in replies:
        assert r.startswith('{\n  "partial" : "') or r.startswith('{\n  "result" : [{\n      "conf" : ')
    assert texts(replies, final) == direct_decode(wav, partial_every=PARTIAL_FRAMES)
    assert any(json.loads(r).get("partial") for r in replies), "partials came back while audio streamed"
    assert any("result" in json.loads(r) for r in replies), "an utterance ended while audio streamed"


def test_words_carry_vosk_float_times_in_seconds_from_stream_start(vnode: Node) -> None:
    wav = DATA / "ko_02_8k.wav"
    replies, final, _ = asyncio.run(session(vnode, wav, chunk_bytes=3200))
    results = [json.loads(r) for r in [*replies, final] if '"result"' in r]
    words = [w for r in results for w in r["result"]]
    assert words
    duration = len(pcm_of(wav)[0]) / 16000
    for w in words:
        assert sorted(w) == ["conf", "end", "start", "word"]
        assert 0 <= w["start"] <= w["end"] <= duration + 0.1 and 0 <= w["conf"] <= 1
    assert [w["start"] for w in words] == sorted(w["start"] for w in words)
    # vosk-api prints times and conf as std::to_string does: six decimals.
    raw = next(r for r in [*replies, final] if '"result"' in r)
    assert re.search(r'\n      "start" : \d+\.\d{6},\n      "word" : "', raw)
    assert " ".join(w["word"] for w in words) == " ".join(texts(replies, final))


def test_the_korean_model_decodes_ko_02_word_perfectly_through_the_vosk_port(vnode: Node) -> None:
    wav = DATA / "ko_02.wav"
    replies, final, _ = asyncio.run(session(vnode, wav, chunk_bytes=640))  # 20 ms at 16 kHz
    assert texts(replies, final) == direct_decode(wav, partial_every=PARTIAL_FRAMES)
    assert " ".join(texts(replies, final)) == TEXTS["ko_02.wav"]["vosk"]


def test_words_off_gives_text_only_results(vnode: Node) -> None:
    wav = DATA / "ko_02_8k.wav"
    config = '{"config" : {"phrase_list" : ["네", "잠시만"], "sample_rate" : 8000, "words" : 0}}'
    replies, final, _ = asyncio.run(session(vnode, wav, config=config, chunk_bytes=320))
    for r in [*replies, final]:
        assert '"result"' not in r and '"conf"' not in r
    assert texts(replies, final) == direct_decode(wav, partial_every=PARTIAL_FRAMES)
    assert "phrase_list of 2 phrases not supported" in vnode.log()


def test_max_alternatives_gives_the_alternatives_shape(vnode: Node) -> None:
    wav = DATA / "ko_02_8k.wav"
    config = '{"config" : { "max_alternatives" : 3, "sample_rate" : 8000 } }'
    replies, final, _ = asyncio.run(session(vnode, wav, config=config, realtime=False))
    results = [json.loads(r) for r in [*replies, final] if '"alternatives"' in r]
    assert results
    for r in results:
        assert list(r) == ["alternatives"]
        for alt in r["alternatives"]:
            assert set(alt) <= {"confidence", "result", "text"}
            assert all(sorted(w) == ["end", "start", "word"] for w in alt.get("result", []))
    assert texts(replies, final) == direct_decode(wav, partial_every=PARTIAL_FRAMES)


def test_without_config_the_stream_is_8khz_as_in_vosk_server(vnode: Node) -> None:
    wav = DATA / "ko_02_8k.wav"
    replies, final, _ = asyncio.run(session(vnode, wav, config=None, chunk_bytes=3200, realtime=False))
    assert texts(replies, final) == direct_decode(wav, partial_every=PARTIAL_FRAMES)


def test_eof_with_no_audio_gives_vosks_empty_result_and_a_normal_close(vnode: Node) -> None:
    async def run() -> tuple[str, Any]:
        async with websockets.connect(url(vnode)) as ws:
            await ws.send('{ "config" : { "sample_rate" : 16000 } }')
            await ws.send('{"eof" : 1}')
            reply = await asyncio.wait_for(ws.recv(), 30_000 * MS)
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 30_000 * MS)
            return reply, ws.close_code

    assert asyncio.run(run()) == ('{"text": ""}', 1000)


def test_bad_json_closes_that_connection_with_a_reason_while_another_goes_on(vnode: Node) -> None:
    wav = DATA / "ko_02_8k.wav"

    async def bad() -> Any:
        async with websockets.connect(url(vnode)) as ws:
            await ws.send(b"\0" * 3200)
            await ws.recv()
            await ws.send('{"config": {"sample_rate": 8000')
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 30_000 * MS)
            return closed.value.rcvd

    async def both() -> tuple[Any, Any, list[Any]]:
        async with Subscription(vnode.events) as sub:
            good = asyncio.create_task(session(vnode, wav, chunk_bytes=3200))
            await asyncio.sleep(0.5)
            closed = await bad()
            errors = []
            while not errors:
                event = await sub.next(timeout=30_000 * MS)
                if event.type == "error":
                    errors.append(event)
            return closed, await good, errors

    rcvd, (replies, final, code), errors = asyncio.run(both())
    assert rcvd.code == 1007 and "not JSON" in rcvd.reason
    assert errors[0].call_id.startswith("vosk-") and "not JSON" in errors[0]["reason"]
    assert code == 1000 and texts(replies, final) == direct_decode(wav, partial_every=PARTIAL_FRAMES)


def test_an_unsupported_sample_rate_is_refused_with_a_reason(vnode: Node) -> None:
    async def run() -> Any:
        async with websockets.connect(url(vnode)) as ws:
            await ws.send('{"config" : {"sample_rate" : 11025}}')
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 30_000 * MS)
            return closed.value.rcvd

    rcvd = asyncio.run(run())
    assert rcvd.code == 1003 and "unsupported sample rate 11025" in rcvd.reason


async def the_call_end(sub: Subscription) -> Event:
    """The call_end of the first call that starts on ``sub`` (which hears every call)."""
    call_id = None
    while True:
        event = await sub.next(timeout=60_000 * MS)
        if call_id is None and event.type == "call_start":
            call_id = event.call_id
        elif event.type == "call_end" and event.call_id == call_id:
            return event


def test_an_abrupt_disconnect_leaves_no_ring_behind(vnode: Node) -> None:
    ingress = vnode.pids("ingress")[0]

    async def run() -> Event:
        async with Subscription(vnode.events) as sub:
            ws = await websockets.connect(url(vnode))
            pcm, _ = pcm_of(DATA / "ko_02_8k.wav")
            for i in range(0, 16000, 3200):
                await ws.send(pcm[i : i + 3200])
                await ws.recv()
            ws.transport.abort()  # no close frame, no eof
            return await the_call_end(sub)

    end = asyncio.run(run())
    assert (end["reason"], end["detail"]) == ("hangup", "no close frame")
    deadline = time.monotonic() + 20_000 * MS
    while farm_segments(ingress) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert farm_segments(ingress) == []


def test_reset_answers_with_a_result_and_the_stream_goes_on(vnode: Node) -> None:
    pcm, _ = pcm_of(DATA / "ko_02_8k.wav")

    async def run() -> tuple[str, list[str], str]:
        async with websockets.connect(url(vnode)) as ws:
            # Speech and 2 s of silence in one message: the utterance has ended (or ends
            # while the reset waits) and its final goes out with the reset's reply.
            await ws.send(pcm + b"\0" * 32000)
            await ws.recv()
            await ws.send('{"reset" : 1}')
            reset = await asyncio.wait_for(ws.recv(), 30_000 * MS)
            after = []
            for _ in range(2):
                await ws.send(b"\0" * 8000)
                after.append(await ws.recv())
            await ws.send('{"eof" : 1}')
            return reset, after, await asyncio.wait_for(ws.recv(), 60_000 * MS)

    reset, after, final = asyncio.run(run())
    assert reset.startswith('{\n  "result" : [{\n') and json.loads(reset)["text"]
    assert all(r.startswith('{\n  "partial" : "') for r in after)
    assert json.loads(final) == {"text": ""}


def test_a_client_that_closes_right_after_eof_like_vosk_asterisk_leaves_no_ring(vnode: Node) -> None:
    ingress = vnode.pids("ingress")[0]
    pcm, _ = pcm_of(DATA / "ko_02_8k.wav")

    async def run() -> Event:
        async with Subscription(vnode.events) as sub:
            async with websockets.connect(url(vnode)) as ws:  # no config: 8 kHz slin, as res_speech_vosk
                for i in range(0, len(pcm), 3200):
                    await ws.send(pcm[i : i + 3200])
                    await ws.recv()
                await ws.send('{"eof" : 1}')
                await ws.close(1000)
            return await the_call_end(sub)

    end = asyncio.run(run())
    assert (end["reason"], end["detail"]) == ("stop", "eof")  # the client's eof ended it, not its close
    deadline = time.monotonic() + 20_000 * MS
    while farm_segments(ingress) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert farm_segments(ingress) == []


def test_reset_mid_utterance_ends_it_there_and_answers_with_its_words(vnode: Node) -> None:
    """What a client with its own endpointer needs: reset is FinalResult(), so the reply
    carries the utterance in progress, not only what was final before (and not one reply
    late). The words are Vosk's own for exactly the audio up to the reset."""
    wav = DATA / "ko_dialog_8k.wav"
    pcm, rate = pcm_of(wav)
    first = TEXTS["ko_dialog_8k.wav"]["vosk"][0]
    # the first sentence, cut two thirds in: still speaking when the reset comes
    cut = int(len(pcm) * 0.2) // 2 * 2

    async def run() -> tuple[str, list[Any]]:
        async with Subscription(vnode.events) as sub, websockets.connect(url(vnode)) as ws:
            for i in range(0, cut, 1600):
                await ws.send(pcm[i : min(i + 1600, cut)])
                await ws.recv()
            await ws.send('{"reset" : 1}')
            reply = await asyncio.wait_for(ws.recv(), 30_000 * MS)
            await ws.send('{"eof" : 1}')
            await asyncio.wait_for(ws.recv(), 60_000 * MS)
            events = []
            while not events or events[-1].type != "call_end":
                events.append(await sub.next(timeout=30_000 * MS))
            return reply, events

    reply, events = asyncio.run(run())
    resets = [e for e in events if e.type == "final" and e["reason"] == "reset"]
    assert len(resets) == 1 and resets[0]["text"], events
    assert json.loads(reply)["text"] == resets[0]["text"]
    assert resets[0]["audio_ms"][1] <= cut * 1000 // (2 * rate) + 20  # nothing after the reset
    assert similarity(resets[0]["text"], first) < 1.0 or len(first.split()) <= 2  # a part of the sentence
    samples = _samples16k(wav)
    a, b = resets[0]["audio_ms"]
    assert [resets[0]["text"]] == decode_pcm(samples[a * 16 : b * 16].tobytes(), partial_every=PARTIAL_FRAMES)
    ends = [e for e in events if e.type == "speech_end"]
    assert ends and ends[0].offset_ms <= cut * 1000 // (2 * rate) + 20


# -- a seeded fuzz run ------------------------------------------------------------------

VOSK_FUZZ_CASES = 200


def _vosk_message(rng: random.Random) -> str | bytes:
    junk: Any = rng.choice([-1, 0, 1.5, "8000", None, [], {}, True, 2**70, "x" * 3000, {"a": [1, {}]}])
    return rng.choice(
        [
            json.dumps({"config": {rng.choice(["sample_rate", "words", "max_alternatives", "phrase_list"]): junk}}),
            json.dumps({"config": junk}),
            json.dumps({rng.choice(["eof", "reset", "config", "x"]): junk}),
            json.dumps(junk),
            rng.randbytes(rng.randrange(1, 200)).decode("latin-1"),
            rng.randbytes(rng.choice([0, 1, 3, 639, 641, 8001])),
        ]
    )


async def _vosk_fuzz_one(node: Node, rng: random.Random) -> int | None:
    """A vosk-server client sending 1 to 4 malformed messages; the server's close code."""
    async with websockets.connect(url(node), open_timeout=30_000 * MS) as ws:
        try:
            for _ in range(rng.randrange(1, 5)):
                await ws.send(_vosk_message(rng))
            await ws.send('{"eof" : 1}')
            while True:
                await asyncio.wait_for(ws.recv(), 30_000 * MS)
        except ConnectionClosed as exc:
            return exc.rcvd.code if exc.rcvd else None
    return None  # pragma: no cover - recv only ends by a close


def test_two_hundred_seeded_malformed_sessions_never_close_with_1011_and_a_good_one_is_untouched(
    vnode: Node,
) -> None:
    """Malformed configs, wrong types, text that is no JSON, odd binary sizes, eight
    sessions at a time (seeded: the same ones every run): each ends with a close code of
    its own (1000 or a refusal with a reason), never 1011, an exception of ours; a good
    session beside them transcribes as undisturbed."""
    wav = DATA / "ko_02_8k.wav"
    rng = random.Random(20261206)
    seeds = [rng.randrange(2**32) for _ in range(VOSK_FUZZ_CASES)]

    async def main() -> tuple[list[int | None], tuple[list[str], str, Any]]:
        gate = asyncio.Semaphore(8)

        async def one(seed: int) -> int | None:
            async with gate:
                return await _vosk_fuzz_one(vnode, random.Random(seed))

        good = asyncio.create_task(session(vnode, wav, chunk_bytes=3200))
        codes = await asyncio.gather(*(one(s) for s in seeds))
        return codes, await good

    codes, (replies, final, code) = asyncio.run(main())
    assert 1011 not in codes and None not in codes, sorted(set(map(str, codes)))
    assert len(set(codes)) >= 2  # refusals and normal ends both: the run reached both paths
    assert code == 1000 and texts(replies, final) == direct_decode(wav, partial_every=PARTIAL_FRAMES)
    assert vnode.proc.poll() is None and "Traceback" not in vnode.log()
