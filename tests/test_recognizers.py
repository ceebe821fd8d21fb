"""Recognizers off the worker loop, with the real model: pool, memory bound, word times."""

from __future__ import annotations

import time

from workers.asr import AsrOutput, AsrStream, ResultQueue
from workers.engines.vosk import RecognizerPool
from workers.scheduler import AsrScheduler

from .conftest import DATA, MS, _samples16k, decode_pcm, model


def _frames(pcm: bytes) -> list[bytes]:
    return [pcm[i : i + 640] for i in range(0, len(pcm) - len(pcm) % 640, 640)]


def _collect(results: ResultQueue, until: int, timeout: float = 30_000 * MS) -> list[AsrOutput]:
    got: list[AsrOutput] = []
    deadline = time.monotonic() + timeout
    while sum(o.kind == "final" for o in got) < until and time.monotonic() < deadline:
        got += results.drain()
        time.sleep(0.01)
    return got


def test_a_recognizer_is_reused_after_reset_and_retired_after_max_audio() -> None:
    pool = RecognizerPool(model(), 16000, max_audio_s=3.0, keep=4)
    rec = pool.lease()
    pcm = _samples16k(DATA / "ko_01.wav").tobytes()
    for f in _frames(pcm):
        rec.accept(f)
    rec.final()
    pool.give_back(rec)
    assert pool.idle == 1 and pool.lease() is rec  # reused, not created
    for f in _frames(pcm):
        rec.accept(f)
    assert rec.heard_s >= 3.0
    pool.give_back(rec)
    assert pool.idle == 0 and pool.retired == 1  # heard too much: dropped with its memory


def test_a_stream_gives_finals_with_words_in_call_time_and_the_recognizer_back() -> None:
    pool = RecognizerPool(model(), 16000, max_audio_s=60, keep=2)
    results = ResultQueue()
    scheduler = AsrScheduler(2)
    try:
        stream = AsrStream(pool, scheduler, results, partial_frames=10, hold=False, tag=("c", 0))
        pcm = _samples16k(DATA / "ko_02.wav").tobytes()
        # The same utterance twice, the second one 60 s into the call.
        for base_ms in (0, 60_000):
            for i, frame in enumerate(_frames(pcm)):
                stream.feed(frame, base_ms + 20 * i, utterance=base_ms, end_cursor=0)
            stream.end("vad", utterance=base_ms, end_cursor=0)
        got = _collect(results, until=2)
    finally:
        scheduler.shutdown()
    finals = [o for o in got if o.kind == "final"]
    assert [o.text for o in finals] == [decode_pcm(pcm, partial_every=10)[-1]] * 2
    first, second = finals
    assert first.words and second.words
    # Same words, shifted by exactly the call offset: not on the recognizer's clock.
    assert [w["start_ms"] + 60_000 for w in first.words] == [w["start_ms"] for w in second.words]
    assert second.heard_ms == (60_000, 60_000 + len(_frames(pcm)) * 20)
    assert any(o.kind == "partial" for o in got)
    assert pool.idle == 1 and pool.created == 1  # one recognizer served both utterances
    results.close()


def test_releasing_a_busy_stream_waits_for_vosk_before_reuse() -> None:
    pool = RecognizerPool(model(), 16000, max_audio_s=60, keep=2)
    results = ResultQueue()
    scheduler = AsrScheduler(1)
    stream = AsrStream(pool, scheduler, results, partial_frames=0, hold=True, tag=("c", 0))
    for i, frame in enumerate(_frames(_samples16k(DATA / "ko_03.wav").tobytes())):
        stream.feed(frame, 20 * i, utterance=0, end_cursor=0)
    deadline = time.monotonic() + 30_000 * MS
    while not pool.leased:  # a slice took a recognizer: Vosk is at work
        assert time.monotonic() < deadline
        time.sleep(0.001)
    stream.release()  # the slice may still be inside AcceptWaveform
    assert pool.idle == 0 or not stream.pending
    deadline = time.monotonic() + 30_000 * MS
    while stream.pending and time.monotonic() < deadline:
        time.sleep(0.01)
    scheduler.shutdown()
    assert pool.idle == 1  # given back once the slice stopped, exactly once
    results.close()
