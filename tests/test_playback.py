"""Playback: conversion to mod_socket_audio's 24 kHz, and the Player's pacing, state and cut.

The Player runs for real on an event loop with a real ring; only its two I/O ends
(``_write``, ``_flush_remote``) write into lists here instead of sockets. The sockets
themselves are exercised end to end in test_socket_audio.py against a FreeSWITCH peer.
"""

from __future__ import annotations

import asyncio
import io
import os
import time
import uuid
import wave
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import numpy as np
import pytest

from farm.broker.wire import FlushRequest
from farm.ingress.playback import FRAME_BYTES, Clip, PlaybackError, Player, to_pcm24k, wav_duration_ms, wav_to_pcm24k
from farm.protocol.events import Event
from farm.ring import Ring

from .conftest import MS


def tone(rate: int, seconds: float, hz: float = 440.0, channels: int = 1) -> bytes:
    t = np.arange(int(rate * seconds)) / rate
    mono = (8000 * np.sin(2 * np.pi * hz * t)).astype("<i2")
    return np.repeat(mono, channels).tobytes() if channels > 1 else mono.tobytes()


def peak_hz(pcm: bytes, rate: int) -> float:
    x = np.frombuffer(pcm, dtype="<i2").astype(float)
    spectrum = np.abs(np.fft.rfft(x))
    return float(np.fft.rfftfreq(len(x), 1 / rate)[int(np.argmax(spectrum))])


@pytest.mark.parametrize("rate", [8000, 16000, 22050, 44100, 48000])
def test_any_rate_becomes_24k_with_the_same_pitch_and_length(rate: int) -> None:
    out = to_pcm24k(tone(rate, 1.0), rate)
    assert len(out) % 2 == 0
    assert abs(len(out) / 2 - 24000) <= 2
    assert abs(peak_hz(out, 24000) - 440) < 2


def test_24k_mono_passes_through_unchanged() -> None:
    pcm = tone(24000, 0.5)
    assert to_pcm24k(pcm, 24000) == pcm


def test_stereo_is_mixed_down_to_mono() -> None:
    out = to_pcm24k(tone(24000, 0.2, channels=2), 24000, channels=2)
    assert out == tone(24000, 0.2)


@pytest.mark.parametrize(
    ("pcm", "rate", "channels", "message"),
    [
        (b"\x00\x01\x02", 16000, 1, "whole number"),
        (b"\x00" * 6, 16000, 2, "whole number"),
        (b"\x00" * 4, 1000, 1, "out of range"),
        (b"\x00" * 4, 16000, 9, "channels"),
    ],
)
def test_bad_raw_audio_is_refused_with_the_reason(pcm: bytes, rate: int, channels: int, message: str) -> None:
    with pytest.raises(PlaybackError, match=message):
        to_pcm24k(pcm, rate, channels)


def wav_bytes(pcm: bytes, rate: int, channels: int, width: int = 2) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(pcm)
    return buf.getvalue()


def test_a_wav_file_of_any_rate_and_channels_is_converted() -> None:
    out = wav_to_pcm24k(wav_bytes(tone(22050, 0.5, channels=2), 22050, 2))
    assert abs(len(out) / 2 - 12000) <= 2
    assert abs(peak_hz(out, 24000) - 440) < 3


@pytest.mark.parametrize(
    ("data", "message"),
    [(b"RIFF garbage", "not a PCM WAV"), (wav_bytes(b"\x80" * 800, 8000, 1, width=1), "16-bit")],
)
def test_a_bad_wav_is_refused(data: bytes, message: str) -> None:
    with pytest.raises(PlaybackError, match=message):
        wav_to_pcm24k(data)


# ---- the Player ---------------------------------------------------------------------------


class ListPlayer(Player):
    """A Player whose FreeSWITCH ends are lists: what was written when, and flushes."""

    def __init__(self, ring: Ring, events: list[Event], lead_ms: int = 200) -> None:
        super().__init__("call-1", ring, events.append, lead_ms=lead_ms)
        self.writes: list[tuple[int, bytes]] = []
        self.flushes: list[int] = []

    def _write(self, clip: Clip, data: bytes) -> bool:
        self.writes.append((time.monotonic_ns(), data))
        return True

    def _flush_remote(self) -> int:
        self.flushes.append(time.monotonic_ns())
        return self.flushes[-1]


@pytest.fixture
def ring() -> Iterator[Ring]:
    r = Ring.create(f"farm-test-{os.getpid()}-{uuid.uuid4().hex[:8]}", capacity=64000, rate=16000, channels=1)
    yield r
    r.close()
    r.unlink()


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(coro)


async def wait_until(condition: Callable[[], bool], timeout: float = 20_000 * MS) -> None:
    """Wait for a state with a generous deadline (a busy machine is slow, not wrong)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the state never came"
        await asyncio.sleep(0.005)


def test_playback_goes_out_in_even_20_ms_chunks_a_lead_ahead_of_real_time(ring: Ring) -> None:
    events: list[Event] = []

    async def scenario() -> tuple[ListPlayer, int]:
        player = ListPlayer(ring, events, lead_ms=200)
        player.start()
        t0 = time.monotonic_ns()
        player.play(Clip(bytes(48000 * 2), "two-seconds"))
        await wait_until(lambda: sum(len(d) for _, d in player.writes) >= 48 * 600)
        assert ring.playing
        player.close()
        return player, t0

    player, t0 = asyncio.run(scenario())
    # Never ahead by more than the lead (plus the 20 ms chunk that crosses it): what is
    # written is what a flush must discard. A late event loop writes later, never earlier.
    sent = 0
    for t, data in player.writes:
        sent += len(data)
        assert sent <= 48 * ((t - t0) / 1e6 + 200 + 20)
    assert {len(d) for _, d in player.writes} == {FRAME_BYTES}
    assert [e.type for e in events] == ["playback_start", "playback_stop"]
    assert events[1]["reason"] == "hangup"


def test_a_short_clip_completes_and_clears_the_playing_flag(ring: Ring) -> None:
    events: list[Event] = []

    async def scenario() -> None:
        player = ListPlayer(ring, events)
        player.start()
        t0 = time.monotonic()
        reply = player.play(Clip(bytes(4800), "tenth"))  # 100 ms
        assert reply == {"id": "tenth", "duration_ms": 100, "starts_in_ms": 0}
        assert ring.playing
        await wait_until(lambda: not ring.playing)
        assert time.monotonic() - t0 >= 0.1  # not before it could have played
        assert not player.state()["playing"]
        player.close()

    run(scenario())
    assert [(e.type, e.get("reason")) for e in events] == [("playback_start", None), ("playback_stop", "complete")]


def test_barge_in_cuts_what_plays_and_drops_the_queue_once(ring: Ring) -> None:
    events: list[Event] = []

    async def scenario() -> tuple[ListPlayer, int, int, int]:
        player = ListPlayer(ring, events)
        player.start()
        t_play = time.monotonic_ns()
        player.play(Clip(bytes(48000), "first"))
        player.play(Clip(bytes(48000), "second"))
        await asyncio.sleep(0.3)
        request = FlushRequest(1234, 60, 1000, (("recv", 1),))
        t_cut = time.monotonic_ns()
        player.barge_in(request)
        t_cut_end = time.monotonic_ns()
        written = len(player.writes)
        player.barge_in(request)  # nothing plays any more: no second flush
        await asyncio.sleep(0.15)
        assert len(player.writes) == written  # stopped writing
        assert not ring.playing
        player.close()
        return player, t_play, t_cut, t_cut_end

    player, t_play, t_cut, t_cut_end = asyncio.run(scenario())
    assert len(player.flushes) == 1
    barge = [e for e in events if e.type == "barge_in"]
    assert len(barge) == 1
    b = barge[0]
    assert b["id"] == "first" and b["dropped"] == ["second"] and b["flush_sent"]
    # "first" started between play() and its first write, and was cut during barge_in().
    first_write = player.writes[0][0]
    assert (t_cut - first_write) // 1_000_000 <= b["played_ms"] <= (t_cut_end - t_play) // 1_000_000
    # what was cut is exactly what had not played: the rest of "first" and all of "second"
    assert b["played_ms"] + b["flushed_ms"] in (2000 - 1, 2000, 2000 + 1)
    assert b.stamps["recv"] == 1 and b.stamps["flush"] == player.flushes[0]
    assert [(e.type, e.get("reason")) for e in events if e.type == "playback_stop"] == [("playback_stop", "barge_in")]


def test_no_flush_when_nothing_plays(ring: Ring) -> None:
    events: list[Event] = []

    async def scenario() -> ListPlayer:
        player = ListPlayer(ring, events)
        player.start()
        player.barge_in(FlushRequest(0, 60))
        assert player.flush() == {"flushed": False}
        player.close()
        return player

    player = asyncio.run(scenario())
    assert player.flushes == [] and events == []


def test_after_a_flush_the_next_clip_waits_for_freeswitchs_playback_stop(ring: Ring) -> None:
    events: list[Event] = []

    async def scenario() -> None:
        player = ListPlayer(ring, events)
        player.start()
        player.play(Clip(bytes(48000), "a"))
        await asyncio.sleep(0.05)
        player.on_remote_playback(True)
        assert player.flush()["flushed"]
        n = len(player.writes)
        player.play(Clip(bytes(4800), "b"))
        await asyncio.sleep(0.03)
        assert len(player.writes) == n  # held: the module's 50 ms discard window would eat it
        player.on_remote_playback(False)  # playback_stop (flush) arrived
        await wait_until(lambda: len(player.writes) > n)
        player.close()

    run(scenario())


def test_a_play_past_the_queued_audio_limit_is_refused_naming_it_and_what_is_queued_plays_on(ring: Ring) -> None:
    """A dialer that queues without end must not make the ingress hold hours of audio."""
    events: list[Event] = []

    async def scenario() -> tuple[ListPlayer, str]:
        player = ListPlayer(ring, events)
        player.max_queued_ms = 1000
        player.start()
        for i in range(4):
            player.play(Clip(bytes(48000 // 4), f"quarter-{i}"))  # 250 ms each: 1 s in all
        with pytest.raises(PlaybackError) as refused:
            player.play(Clip(bytes(480), "one-more"))  # 10 ms
        await wait_until(lambda: sum(e.type == "playback_stop" for e in events) == 4)
        # Played out, the queue has room again.
        assert player.play(Clip(bytes(480), "later"))["starts_in_ms"] == 0
        player.close()
        return player, str(refused.value)

    player, refused = asyncio.run(scenario())
    assert "over the limit of 1000 ms of queued audio (--playback-max-queued-s)" in refused
    assert refused.endswith(")") and "this clip is 10 ms" in refused
    stops = [(e["id"], e["reason"]) for e in events if e.type == "playback_stop"]
    assert stops[:4] == [(f"quarter-{i}", "complete") for i in range(4)]
    assert sum(len(d) for _, d in player.writes) >= 48000  # every queued clip went out whole
    assert "one-more" not in [e["id"] for e in events]


def test_a_play_past_the_clip_limit_is_refused(ring: Ring) -> None:
    """Tiny clips fit any audio limit; each one still costs an object and two events."""
    events: list[Event] = []

    async def scenario() -> str:
        player = ListPlayer(ring, events)
        player.max_clips = 3
        player.hold_until = time.monotonic_ns() + 60 * 1_000_000_000  # nothing goes out meanwhile
        player.start()
        for i in range(3):
            player.play(Clip(bytes(48), f"tiny-{i}"))
        with pytest.raises(PlaybackError) as refused:
            player.play(Clip(bytes(48), "tiny-3"))
        assert [c.play_id for c in player.queue] == ["tiny-0", "tiny-1", "tiny-2"]
        player.close()
        return str(refused.value)

    assert asyncio.run(scenario()) == "3 clips are queued, the limit for one call"


def test_the_play_limits_are_checked_before_a_clip_is_converted(ring: Ring) -> None:
    """The command socket asks admit() with the length a request says, before converting it."""
    events: list[Event] = []

    async def scenario() -> None:
        player = ListPlayer(ring, events)
        player.max_queued_ms = 1000
        player.play(Clip(bytes(48000), "one-second"))
        with pytest.raises(PlaybackError, match="1000 ms are queued and this clip is 1 ms"):
            player.admit(1)
        player.close()

    asyncio.run(scenario())
    wav = io.BytesIO()
    with wave.open(wav, "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(tone(8000, 1.5, channels=2))
    assert wav_duration_ms(wav.getvalue()) == 1500
    assert wav_duration_ms(b"not a wav") == 0
    # A streaming writer's placeholder length (data chunk 0xFFFFFFFF): the bytes there count.
    streamed = wav.getvalue()[:40] + b"\xff\xff\xff\xff" + wav.getvalue()[44:]
    assert 1500 <= wav_duration_ms(streamed) <= 1502
