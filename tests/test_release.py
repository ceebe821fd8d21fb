"""When a worker may hand a call to another one (rebalancing): never when the audio the
next worker has to replay may already be overwritten in the ring.

A real ring, a real call session with the real model; the worker's loop is not needed:
these are the session's own decisions."""

from __future__ import annotations

import os
import time
import wave
from collections.abc import Iterator

import pytest

from farm.config import Config
from farm.ring import Ring
from workers.analysis import Options
from workers.asr import ResultQueue
from workers.call import CallSession
from workers.engines.vosk import RecognizerPool
from workers.scheduler import AsrScheduler

from .conftest import DATA, model


RATE = 16000


def zeros(seconds: float) -> bytes:
    return bytes(int(RATE * seconds) * 2)


@pytest.fixture
def session() -> Iterator[CallSession]:
    ring = Ring.create(f"farm-test-{os.getpid()}-release", capacity=10 * RATE * 2, rate=RATE, channels=1)
    pool = RecognizerPool(model(), RATE, max_audio_s=600, keep=2)
    s = CallSession(
        "release", ring, {}, Config(), options=Options(), pool=pool, scheduler=AsrScheduler(1), results=ResultQueue()
    )
    yield s
    s.close()
    ring.close()
    ring.unlink()


def test_a_call_is_not_released_once_its_replay_may_be_overwritten(session: CallSession) -> None:
    with wave.open(str(DATA / "ko_01.wav"), "rb") as w:
        assert w.getframerate() == RATE
        speech = w.readframes(w.getnframes())
    ring = session.ring
    ring.write(zeros(0.5) + speech + zeros(1.0), time.monotonic_ns())
    drafts = session.pump()
    assert [d.type for d in drafts if d.type.startswith("speech_")] == ["speech_start", "speech_end"]
    # Between utterances, nothing committed yet (the utterance's final may be pending):
    # the next worker would replay it all, and the ring still holds it.
    assert ring.committed == 0 and ring.write_cursor <= ring.capacity // 2
    assert session.releasable(patient=False)
    # The caller goes on (silence) while that final is still owed: the replay would start
    # more than half a ring behind the writer, and the ring may lap it before it is read.
    ring.write(zeros(2.0), time.monotonic_ns())
    session.pump()
    assert ring.write_cursor - ring.committed > ring.capacity // 2
    assert not session.releasable(patient=False)
