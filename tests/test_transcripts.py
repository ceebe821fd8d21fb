"""What a dialer gets from a real node: transcripts equal to Vosk's own, for many calls.

Every test streams committed speech (tests/data, made with espeak-ng) through a real
``farm up`` over WebSocket as mod_audio_stream would, and compares the finals with
decoding the same audio directly with Vosk in this process.

Vosk is repeatable only without MFCC dither (Kaldi adds random dither unless told
not to; the farm runs its model with --dither=0, see workers/engines/vosk.py), and
its output depends on the chunking and on where partials are asked for. So the
references below feed Vosk exactly as a worker does, and the finals must be equal.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from farm.client import Subscription

from .conftest import (
    DATA,
    MS,
    CallRun,
    Node,
    decode_heard,
    decode_heard_each,
    direct_decode,
    run_call,
    start_node,
)


SPEECH = sorted(p.name for p in DATA.glob("ko_[0-9][0-9].wav"))


PARTIAL_FRAMES = 10  # the default --partial-interval-ms 200, in 20 ms frames


@pytest.fixture(scope="module")
def exact_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """No VAD gating: Vosk hears the whole call, as a direct decode of the file does."""
    n = start_node(tmp_path_factory.mktemp("exact"), "--no-gating")
    yield n
    assert n.stop() == 0


def test_a_call_without_gating_gives_exactly_vosks_own_finals(exact_node: Node) -> None:
    wav = DATA / "ko_dialog_16k.wav"
    run = asyncio.run(run_call(exact_node, wav, realtime=False, chunk_ms=20))
    assert run.finals == direct_decode(wav, partial_every=PARTIAL_FRAMES)
    assert run.of("call_start")[0]["rate"] == 16000
    assert run.of("partial"), "partials were asked for"


def test_finals_do_not_depend_on_how_the_audio_was_chunked_or_paced(exact_node: Node) -> None:
    wav = DATA / "ko_dialog_16k.wav"
    paced = asyncio.run(run_call(exact_node, wav, realtime=True, chunk_ms=20))
    bursty = asyncio.run(run_call(exact_node, wav, realtime=False, chunk_bytes=3202))
    assert paced.finals == bursty.finals == direct_decode(wav, partial_every=PARTIAL_FRAMES)


def test_an_8khz_call_without_gating_gives_vosks_finals_on_the_resampled_audio(exact_node: Node) -> None:
    wav = DATA / "ko_dialog_8k.wav"
    run = asyncio.run(run_call(exact_node, wav, realtime=False))
    assert run.finals == direct_decode(wav, partial_every=PARTIAL_FRAMES)


def test_a_gated_call_in_real_time_gives_close_finals_and_paired_vad_events(node: Node) -> None:
    wav = DATA / "ko_dialog_16k.wav"
    run = asyncio.run(run_call(node, wav))
    assert run.finals == decode_heard(wav, run)
    # Gating leaves out only silence: every stretch of speech was heard, with the
    # preroll before it and the quiet after it up to where its final was prepared
    # (--vad-tentative-ms 160; the rest of the hangover is not decoded).
    heard = [e["audio_ms"] for e in run.of("final") if e["reason"] != "endpoint"]
    spans = list(zip([e.offset_ms for e in run.of("speech_start")], [e.offset_ms for e in run.of("speech_end")]))
    assert len(heard) == len(spans)
    for (a, b), (start, end) in zip(heard, spans):
        assert a <= start - 200 and b >= end + 160, (heard, spans)
    starts, ends = run.of("speech_start"), run.of("speech_end")
    # Three sentences separated by 1.2 s pauses: three utterances, each closed.
    assert len(starts) == len(ends) == 3
    assert len(run.of("final")) >= 3
    seqs = [e.seq for e in run.events]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "per-call sequence has gaps"
    for e in run.of("final"):
        assert e["words"] and all({"word", "start_ms", "end_ms", "conf"} <= set(w) for w in e["words"])
        assert set(e.stamps) >= {"recv", "asr", "publish"}
    # Words sit inside their utterance (call time), not on the recognizer's own clock.
    last_end = max(w["end_ms"] for e in run.of("final") for w in e["words"])
    assert last_end <= run.of("call_end")[0]["duration_ms"] + 100


def test_eight_simultaneous_calls_each_get_their_own_transcript(node: Node) -> None:
    files = (SPEECH * 2)[:8]
    assert len(set(files)) >= 4

    async def all_calls() -> list:
        return await asyncio.gather(*(run_call(node, DATA / f, realtime=True) for f in files))

    runs = asyncio.run(all_calls())
    # No cross-talk: each call's finals are Vosk's words for its own file's audio at the
    # spans it heard, and not for another file's audio at the same spans.
    others = [next(g for g in files[i + 1 :] + files[:i] if g != f) for i, f in enumerate(files)]
    own = decode_heard_each([(DATA / f, run) for f, run in zip(files, runs)])
    crossed = decode_heard_each([(DATA / g, run) for g, run in zip(others, runs)])
    for f, g, run, reference, other in zip(files, others, runs, own, crossed):
        assert run.finals == reference, f
        assert run.finals and run.finals != other, (f, g, run.finals)


def test_six_calls_on_one_worker_each_get_their_own_exact_transcript(tmp_path: Path) -> None:
    """Six calls on ONE worker: its ASR threads interleave the calls' Vosk work (time
    slices), and every call still gets exactly Vosk's own finals, with its VAD events
    paired. How timely speech_start stays meanwhile is a bench figure (onset ->
    speech_start under load), not something a busy test machine can vouch for."""
    n = start_node(tmp_path, workers=1)
    try:
        files = (SPEECH * 2)[:6]

        async def all_calls() -> list:
            return await asyncio.gather(*(run_call(n, DATA / f) for f in files))

        runs = asyncio.run(all_calls())
        for f, run, reference in zip(files, runs, decode_heard_each([(DATA / f, run) for f, run in zip(files, runs)])):
            assert run.finals == reference, f
            assert len(run.of("speech_start")) == len(run.of("speech_end")) >= 1, f
            for e in run.of("speech_start"):  # decided on the loop from the stamped audio
                assert e.stamps["recv"] <= e.stamps["vad"] <= e.stamps["publish"]
    finally:
        assert n.stop() == 0


def test_stereo_call_transcribes_the_caller_channel_by_default(node: Node) -> None:
    wav = DATA / "ko_stereo_16k.wav"
    run = asyncio.run(run_call(node, wav, realtime=False))
    assert run.of("call_start")[0]["channels"] == 2
    assert {e.channel for e in run.of("final")} == {0}
    assert run.finals == decode_heard(wav, run)


def test_stereo_call_can_transcribe_both_channels(node: Node) -> None:
    wav = DATA / "ko_stereo_16k.wav"
    run = asyncio.run(run_call(node, wav, realtime=False, path_suffix="?transcribe=both"))
    assert {e.channel for e in run.of("final") if e["text"]} == {0, 1}


def test_a_worker_killed_mid_utterance_loses_no_words(tmp_path: Path) -> None:
    """kill -9 the worker serving a call in the middle of an utterance: the call moves
    to the other worker, which replays from the ring's committed cursor."""
    n = start_node(tmp_path, workers=2)
    try:
        wav = DATA / "ko_dialog_16k.wav"
        # The reference needs no pacing: finals do not depend on it (the pacing test below).
        undisturbed = asyncio.run(run_call(n, wav, realtime=False))

        async def disturbed() -> CallRun:
            async with Subscription(n.events, "crash-me") as watch:
                task = asyncio.create_task(run_call(n, wav, realtime=True, call_id="crash-me"))
                starts = 0
                while starts < 2:  # inside the second sentence
                    starts += (await watch.next(timeout=20_000 * MS)).type == "speech_start"
                await asyncio.sleep(0.4)
                os.kill(_serving_worker(n, "crash-me"), signal.SIGKILL)
                return await task

        run = asyncio.run(disturbed())
        assert run.finals == undisturbed.finals
        assert "resuming at byte" in n.log()
        assert len(run.of("call_end")) == 1
    finally:
        assert n.stop() == 0


def _serving_worker(n: Node, call_id: str) -> int:
    import re

    m = re.search(rf"worker(\d+)\[(\d+)\] workers.worker: call {call_id}: serving", n.log())
    assert m, n.log()[-2000:]
    return int(m.group(2))
