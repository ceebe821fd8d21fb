"""When a worker may hand a call to another one (rebalancing): never when the audio the
next worker has to replay may already be overwritten in the ring.

A real ring, a real call session with the real model; the worker's loop is not needed:
these are the session's own decisions."""

from __future__ import annotations

import os
import time
import wave
from collections.abc import Iterator
from typing import Any

import pytest

from farm.config import Config
from farm.ring import Ring
from workers.analysis import Options
from workers.asr import ResultQueue
from workers.call import PUMP_MAX_S, CallSession
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


def pump_all(session: CallSession) -> list[Any]:
    """Pump until the session has read everything written (one pump takes PUMP_MAX_S at most)."""
    drafts: list[Any] = []
    while session.ring.read_cursor < session.ring.write_cursor:
        drafts += session.pump()
    return drafts


def test_one_pump_takes_a_bounded_slice_of_a_long_backlog_and_the_next_ones_the_rest(session: CallSession) -> None:
    """A call resumed far behind (moved from another worker) is read PUMP_MAX_S at a time,
    so the worker's loop, which also beats its heartbeats, comes back between slices."""
    ring = session.ring
    backlog = zeros(8.0)
    ring.write(backlog, time.monotonic_ns())
    slice_bytes = PUMP_MAX_S * RATE * 2
    session.pump()
    assert ring.read_cursor == slice_bytes
    pumps = 1
    while ring.read_cursor < ring.write_cursor:
        session.pump()
        pumps += 1
    assert pumps == len(backlog) // slice_bytes  # all of it read, slice by slice, nothing skipped


def test_a_call_is_not_released_once_its_replay_may_be_overwritten(session: CallSession) -> None:
    with wave.open(str(DATA / "ko_01.wav"), "rb") as w:
        assert w.getframerate() == RATE
        speech = w.readframes(w.getnframes())
    ring = session.ring
    ring.write(zeros(0.5) + speech + zeros(1.0), time.monotonic_ns())
    drafts = pump_all(session)
    assert [d.type for d in drafts if d.type.startswith("speech_")] == ["speech_start", "speech_end"]
    # Between utterances, nothing committed yet (the utterance's final may be pending):
    # the next worker would replay it all, and the ring still holds it.
    assert ring.committed == 0 and ring.write_cursor <= ring.capacity // 2
    assert session.releasable(patient=False)
    # The caller goes on (silence) while that final is still owed: the replay would start
    # more than half a ring behind the writer, and the ring may lap it before it is read.
    ring.write(zeros(2.0), time.monotonic_ns())
    pump_all(session)
    assert ring.write_cursor - ring.committed > ring.capacity // 2
    assert not session.releasable(patient=False)


def pcm(name: str) -> bytes:
    with wave.open(str(DATA / name), "rb") as w:
        assert w.getframerate() == RATE
        return w.readframes(w.getnframes())


def write_paced(ring: Ring, audio: bytes) -> None:
    """As the ingress writes: 20 ms frames."""
    step = RATE * 2 // 50
    for i in range(0, len(audio), step):
        ring.write(audio[i : i + step], time.monotonic_ns())


def take_over(ring: Ring) -> tuple[CallSession, ResultQueue]:
    """Another worker takes the call: a new session on the same ring, as B_ASSIGN makes it."""
    pool = RecognizerPool(model(), RATE, max_audio_s=600, keep=1)
    results = ResultQueue()
    successor = CallSession(
        "release", ring, {}, Config(), options=Options(), pool=pool, scheduler=AsrScheduler(1), results=results
    )
    return successor, results


def test_a_final_owed_for_audio_the_ring_overwrote_before_a_takeover_comes_empty_with_reason_lost(
    session: CallSession,
) -> None:
    """A worker starved and declared gone had published an utterance's speech_end with its
    final still pending; the writer went on a whole ring past it before another worker took
    the call. That final cannot be recognized any more, but the dialer is owed it: the next
    worker gives it, empty, reason lost, and goes on with the call."""
    ring = session.ring
    write_paced(ring, zeros(0.5) + pcm("ko_01.wav") + zeros(1.0))
    drafts = pump_all(session)
    assert [d.type for d in drafts if d.type.startswith("speech_")] == ["speech_start", "speech_end"]
    session.commit()  # as the worker's loop does after each pump; its results are never taken in
    assert ring.owed == 1 and ring.owed_end - 1 > ring.committed
    write_paced(ring, zeros(11.0))  # more than the 10 s ring: the utterance is overwritten
    assert ring.write_cursor - ring.committed > ring.capacity
    successor, _ = take_over(ring)
    try:
        drafts = pump_all(successor)
        finals = [d for d in drafts if d.type == "final"]
        assert [(d.data["text"], d.data["reason"]) for d in finals] == [("", "lost")]
        assert finals[0].data["lost_ms"] > 1000
        # Said once: the successor owes nothing, so a later takeover gives no second one.
        successor.commit()
        assert (ring.owed, ring.owed_end) == (0, 0)
    finally:
        successor.close()


def test_a_takeover_lapped_before_its_first_look_still_gives_the_owed_final_lost(session: CallSession) -> None:
    """The successor attached while the owed utterance was still in the ring, then starved
    itself: the writer lapped its replay before it read. The final is still given (lost)."""
    ring = session.ring
    write_paced(ring, zeros(0.5) + pcm("ko_01.wav") + zeros(1.0))
    pump_all(session)
    session.commit()
    assert ring.owed == 1 and ring.write_cursor - ring.committed < ring.capacity
    successor, _ = take_over(ring)
    try:
        successor.commit()  # before its first look: it owes what it inherited
        assert ring.owed == 1
        write_paced(ring, zeros(11.0))  # the 10 s ring laps the replay
        drafts = pump_all(successor)
        finals = [d for d in drafts if d.type == "final"]
        assert [(d.data["text"], d.data["reason"]) for d in finals] == [("", "lost")]
        assert finals[0].data["lost_ms"] > 1000
        assert not [d for d in drafts if d.type.startswith("speech_")]  # its audio is gone
        successor.commit()
        assert (ring.owed, ring.owed_end) == (0, 0)
    finally:
        successor.close()


def test_a_takeover_that_can_replay_the_owed_utterance_gives_its_words_not_a_lost_final(
    session: CallSession,
) -> None:
    ring = session.ring
    write_paced(ring, zeros(0.5) + pcm("ko_01.wav") + zeros(1.0))
    pump_all(session)
    session.commit()
    assert ring.owed == 1
    successor, results = take_over(ring)
    try:
        drafts = pump_all(successor)
        # The replay: its speech_start and speech_end come again, and its final from its audio.
        assert [d.type for d in drafts if d.type.startswith("speech_")] == ["speech_start", "speech_end"]
        assert not [d for d in drafts if d.type == "final"]  # nothing lost: it is being recognized
        successor.commit()
        assert ring.owed == 1  # now this worker's to give
        finals: list[Any] = []
        deadline = time.monotonic() + 120  # generous: a busy machine recognizes late
        while not finals and time.monotonic() < deadline:
            time.sleep(0.05)
            for out in results.drain():
                finals += [d for d in successor.on_asr(out) if d.type == "final"]
        assert [d.data["reason"] for d in finals] == ["vad"] and finals[0].data["text"]
        successor.commit()
        assert (ring.owed, ring.owed_end) == (0, 0)
    finally:
        successor.close()


def _take_over_in_another_process(ring_name: str, conn: Any) -> None:
    """A second worker (a process of its own): take the call, wait for the word, read it all."""
    ring = Ring.attach(ring_name)
    successor, _ = take_over(ring)
    base = successor.base
    conn.send("taken")
    conn.recv()  # meanwhile the worker before it looked once more
    drafts: list[Any] = []
    while successor.next_cursor < ring.write_cursor:  # not the shared cursor: the other worker moved it
        drafts += successor.pump()
    conn.send(([d.type for d in drafts if d.type.startswith("speech_")], successor.base == base))
    successor.close()


def test_a_worker_that_took_a_call_over_reads_on_from_its_own_cursor_and_the_one_before_stops(
    session: CallSession,
) -> None:
    """Declared gone while only starved, a worker reads on until it sees the call taken:
    the ring says who serves it now (its reader_pid). The worker before stops writing the
    header, and a look it had before it noticed takes no audio from the one after."""
    import multiprocessing

    ring = session.ring
    write_paced(ring, zeros(0.5) + pcm("ko_01.wav") + zeros(1.0))
    pump_all(session)
    session.commit()
    committed, owed = ring.committed, ring.owed
    assert not session.taken_over
    ours, theirs = multiprocessing.get_context("spawn").Pipe()
    child = multiprocessing.get_context("spawn").Process(target=_take_over_in_another_process, args=(ring.name, theirs))
    child.start()
    try:
        assert ours.poll(120) and ours.recv() == "taken"
        assert session.taken_over and ring.reader_pid == child.pid
        write_paced(ring, zeros(0.5))
        session.pump()  # the old worker's last look: it moves the shared read cursor
        session.commit()
        assert (ring.committed, ring.owed) == (committed, owed)  # the header is the new worker's
        ours.send("go on")
        assert ours.poll(120)
        speech, contiguous = ours.recv()
        # The successor replayed the utterance from the committed cursor, with no gap.
        assert speech == ["speech_start", "speech_end"] and contiguous
    finally:
        child.join(60)
