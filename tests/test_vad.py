"""Tests for workers.vad: real espeak-ng speech for behaviour, scripted flags for exact rules."""

from __future__ import annotations

import dataclasses
import json
import wave
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from workers.vad import (
    SILENCE,
    SPEECH,
    SpeechEnd,
    SpeechPause,
    SpeechResume,
    SpeechStart,
    Vad,
    VadConfig,
    VadEvent,
    VadState,
)


Audio = npt.NDArray[np.int16]
Say = Callable[[str, int], Audio]

DATA = Path(__file__).parent / "data"
SENTENCE = "Hello, I would like to check the balance of my account please."
WORD = "Yes."
SPEECH_THRESHOLD = 300  # |sample| above this counts as speech when locating ground truth


# Committed recordings (tests/make_fixtures.sh makes them with espeak-ng and sox).
_RECORDINGS = {SENTENCE: "en_sentence", WORD: "en_yes"}


@pytest.fixture(scope="session")
def say() -> Say:
    """Text -> int16 mono at `rate` from tests/data, trimmed so speech starts at sample 0."""
    cache: dict[tuple[str, int], Audio] = {}

    def _say(text: str, rate: int) -> Audio:
        if (text, rate) not in cache:
            path = DATA / f"{_RECORDINGS[text]}_{rate // 1000}k.wav"
            with wave.open(str(path), "rb") as w:
                assert w.getframerate() == rate and w.getnchannels() == 1
                audio = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
            loud = np.flatnonzero(np.abs(audio.astype(np.int32)) > SPEECH_THRESHOLD)
            assert loud.size, f"{path} holds no speech"
            cache[text, rate] = audio[loud[0] : loud[-1] + 1]
        return cache[text, rate]

    return _say


def silence(ms: int, rate: int) -> Audio:
    return np.zeros(rate * ms // 1000, dtype="<i2")


def frames_of(audio: Audio, n: int) -> Iterator[bytes]:
    """Split into frames of `n` samples, zero-padding the last one."""
    padded = np.concatenate([audio, np.zeros(-len(audio) % n, dtype="<i2")]).astype("<i2")
    for i in range(0, len(padded), n):
        yield padded[i : i + n].tobytes()


def run_all(vad: Vad, audio: Audio) -> list[VadEvent]:
    frames = frames_of(audio, vad.frame_bytes // 2)
    return [e for f in frames if (e := vad.process(f)) is not None]


def run(vad: Vad, audio: Audio) -> list[VadEvent]:
    """The utterance boundaries only (SpeechStart, SpeechEnd)."""
    return [e for e in run_all(vad, audio) if isinstance(e, SpeechStart | SpeechEnd)]


def frames_in(audio: Audio, rate: int) -> int:
    return -(-len(audio) // (rate // 50))


def make_vad(rate: int = 16000, **config: int) -> Vad:
    return Vad(rate, VadConfig(**config))


def state_of(vad: Vad) -> VadState:
    """Read the state afresh: mypy keeps `vad.state is SPEECH` narrowed across method calls."""
    return vad.state


def tone_burst(ms: int, rate: int) -> Audio:
    """A 300 Hz tone with four harmonics, loud: webrtcvad calls it voiced."""
    t = np.arange(rate * ms // 1000) / rate
    wave = sum(np.sin(2 * np.pi * 300 * k * t) / k for k in range(1, 6))
    return (np.asarray(wave) * 6000).astype("<i2")


class ScriptedVad(Vad):
    """A Vad whose webrtcvad decisions come from a string of '1'/'0', to pin the state machine."""

    def __init__(self, flags: str, **config: int) -> None:
        super().__init__(16000, VadConfig(**config))
        self._flags = iter(flags)

    def is_voiced(self, frame: bytes) -> bool:
        return next(self._flags) == "1"


def script(vad: ScriptedVad, count: int) -> list[VadEvent]:
    frame = bytes(vad.frame_bytes)
    return [e for _ in range(count) if (e := vad.process(frame)) is not None]


# ---- Real audio -----------------------------------------------------------------------------


@pytest.mark.parametrize("sd", [0, 8], ids=["digital-silence", "dither-noise"])
def test_silence_only_produces_no_events(sd: int) -> None:
    rng = np.random.default_rng(0)
    audio = rng.normal(0, sd, 16000 * 5).astype("<i2")
    vad = make_vad()
    assert run(vad, audio) == []
    assert vad.state is SILENCE
    assert vad.frames == 250


@pytest.mark.parametrize("rate", [8000, 16000])
@pytest.mark.parametrize("text", [SENTENCE, WORD])
def test_speech_between_silences_gives_one_start_then_one_end_near_the_speech(
    say: Say, rate: int, text: str
) -> None:
    speech = say(text, rate)
    vad = make_vad(rate)
    events = run(vad, np.concatenate([silence(1000, rate), speech, silence(1000, rate)]))
    assert [type(e) for e in events] == [SpeechStart, SpeechEnd]
    start, end = events
    assert isinstance(start, SpeechStart) and isinstance(end, SpeechEnd)
    true_start, true_end = 50, 50 + frames_in(speech, rate)
    assert abs(start.frame - true_start) <= 5  # within 100 ms
    assert start.frame <= start.decided_frame <= start.frame + 4  # 3 of 5 frames
    # the last loud frame, not webrtcvad's padded voicing (see the pause fixtures below)
    assert true_end - 2 <= end.frame <= true_end + 1
    assert end.decided_frame == end.frame - 1 + 16  # exactly the 320 ms hangover
    assert end.duration_frames == end.frame - start.frame
    assert end.short is False
    assert vad.state is SILENCE


def test_two_utterances_apart_by_more_than_the_hangover_give_two_pairs(say: Say) -> None:
    audio = np.concatenate(
        [silence(500, 16000), say(SENTENCE, 16000), silence(1000, 16000), say(WORD, 16000),
         silence(1000, 16000)]
    )
    events = run(make_vad(), audio)
    assert [type(e) for e in events] == [SpeechStart, SpeechEnd, SpeechStart, SpeechEnd]
    second_start = 25 + frames_in(say(SENTENCE, 16000), 16000) + 50
    assert abs(events[2].frame - second_start) <= 5
    assert events[1].frame < events[2].frame


@pytest.mark.parametrize(("hangover_ms", "split"), [(300, False), (60, True)])
def test_a_200_ms_gap_is_bridged_by_a_300_ms_hangover_but_splits_with_60_ms(
    say: Say, hangover_ms: int, split: bool
) -> None:
    # The 60 ms case proves the gap really reads as quiet despite webrtcvad's own padding.
    speech = say(SENTENCE, 16000)
    audio = np.concatenate(
        [silence(500, 16000), speech, silence(200, 16000), speech, silence(1000, 16000)]
    )
    events = run(make_vad(hangover_ms=hangover_ms), audio)
    gap = 25 + frames_in(speech, 16000)  # the frame where the 200 ms gap starts
    ends = [e.frame for e in events if isinstance(e, SpeechEnd)]
    assert any(abs(f - gap) <= 2 for f in ends) is split
    assert [type(e) for e in events[:1]] == [SpeechStart] and len(events) % 2 == 0


def test_flush_in_speech_ends_the_utterance_at_its_last_voiced_frame(say: Say) -> None:
    vad = make_vad()
    events = run(vad, np.concatenate([silence(500, 16000), say(SENTENCE, 16000)]))
    assert [type(e) for e in events] == [SpeechStart]
    assert vad.state is SPEECH
    end = vad.flush()
    assert isinstance(end, SpeechEnd)
    assert end.decided_frame == vad.frames - 1
    assert events[0].frame < end.frame <= vad.frames
    assert end.duration_frames == end.frame - events[0].frame
    assert state_of(vad) is SILENCE
    assert vad.flush() is None


def test_reset_returns_to_silence_and_keeps_the_frame_counter(say: Say) -> None:
    vad = make_vad()
    speech = say(SENTENCE, 16000)
    run(vad, np.concatenate([silence(500, 16000), speech[: len(speech) // 2]]))
    assert vad.state is SPEECH
    counted = vad.frames
    vad.reset()
    assert state_of(vad) is SILENCE
    assert vad.frames == counted
    events = run(vad, np.concatenate([speech[len(speech) // 2 :], silence(1000, 16000)]))
    assert [type(e) for e in events] == [SpeechStart, SpeechEnd]
    assert counted <= events[0].frame <= counted + 5  # call-relative, not restarted at 0


def test_webrtcvad_pads_a_20_ms_click_to_about_100_ms_of_voicing() -> None:
    # Documents the dependency: why a 60 ms onset cannot, by itself, reject a click.
    vad = make_vad()
    audio = np.concatenate([silence(1000, 16000), tone_burst(20, 16000), silence(1000, 16000)])
    flags = [vad.is_voiced(f) for f in frames_of(audio, 320)]
    assert flags[50] is True
    assert 4 <= sum(flags) <= 6
    assert not any(flags[:50])


def test_a_20_ms_click_is_ignored_with_a_120_ms_onset() -> None:
    audio = np.concatenate([silence(1000, 16000), tone_burst(20, 16000), silence(1000, 16000)])
    assert run(make_vad(onset_ms=120, onset_window_ms=160), audio) == []


def test_a_20_ms_click_under_the_default_onset_ends_as_a_short_utterance() -> None:
    audio = np.concatenate([silence(1000, 16000), tone_burst(20, 16000), silence(1000, 16000)])
    events = run(make_vad(min_speech_ms=200), audio)
    assert [type(e) for e in events] == [SpeechStart, SpeechEnd]
    assert events[0].frame == 50
    assert isinstance(events[1], SpeechEnd) and events[1].short is True


@pytest.mark.parametrize(("min_speech_ms", "short"), [(0, False), (10_000, True)])
def test_short_flag_follows_min_speech_ms_on_real_speech(
    say: Say, min_speech_ms: int, short: bool
) -> None:
    audio = np.concatenate([silence(500, 16000), say(SENTENCE, 16000), silence(1000, 16000)])
    end = run(make_vad(min_speech_ms=min_speech_ms), audio)[-1]
    assert isinstance(end, SpeechEnd) and end.short is short


def test_steady_noise_gives_at_most_one_blip_at_its_onset() -> None:
    # webrtcvad flags ~5 frames at any noise onset, then adapts; the worker should expect this.
    audio = np.random.default_rng(1).normal(0, 300, 16000 * 5).astype("<i2")
    events = run(make_vad(), audio)
    assert len(events) in (0, 2)
    assert all(e.frame < 25 for e in events)


@pytest.mark.parametrize(
    ("rate", "size"), [(8000, 320), (16000, 640), (32000, 1280), (48000, 1920)]
)
def test_every_webrtcvad_rate_takes_20_ms_frames(rate: int, size: int) -> None:
    vad = make_vad(rate)
    assert vad.frame_bytes == size
    assert vad.process(bytes(size)) is None
    assert vad.frames == 1
    assert Vad.FRAME_MS == 20


@pytest.mark.parametrize("size", [0, 1, 320, 639, 641, 960])
def test_a_frame_of_the_wrong_size_is_rejected_and_not_counted(size: int) -> None:
    vad = make_vad()
    with pytest.raises(ValueError, match=f"frame must be 640 bytes, got {size}"):
        vad.process(bytes(size))
    with pytest.raises(ValueError, match="640"):
        vad.is_voiced(bytes(size))
    assert vad.frames == 0


@pytest.mark.parametrize("rate", [0, 11025, 22050, 44100])
def test_an_unsupported_rate_is_rejected(rate: int) -> None:
    with pytest.raises(ValueError, match=f"rate must be one of .*got {rate}"):
        Vad(rate)


# ---- Configuration --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"aggressiveness": -1}, "aggressiveness must be 0..3, got -1"),
        ({"aggressiveness": 4}, "aggressiveness must be 0..3, got 4"),
        ({"onset_ms": 50}, "onset_ms must be a non-negative multiple of 20 ms, got 50"),
        ({"onset_ms": 0}, "onset_ms must be at least 20 ms, got 0"),
        ({"onset_window_ms": 40}, r"onset_window_ms \(40\) must be >= onset_ms \(60\)"),
        ({"onset_window_ms": 90}, "onset_window_ms must be .* got 90"),
        ({"hangover_ms": 0}, "hangover_ms must be at least 20 ms, got 0"),
        ({"hangover_ms": 310}, "hangover_ms must be .* got 310"),
        ({"preroll_ms": -20}, "preroll_ms must be a non-negative multiple of 20 ms, got -20"),
        ({"min_speech_ms": 30}, "min_speech_ms must be .* got 30"),
    ],
)
def test_a_bad_config_raises_a_lowercase_value_error_with_the_numbers(
    kwargs: dict[str, int], message: str
) -> None:
    with pytest.raises(ValueError, match=message) as info:
        VadConfig(**kwargs)
    assert str(info.value) == str(info.value).lower()


def test_the_tightest_valid_config_is_accepted_and_frozen() -> None:
    config = VadConfig(
        aggressiveness=3, onset_ms=20, onset_window_ms=20, hangover_ms=20, preroll_ms=0
    )
    vad = Vad(8000, config)
    assert vad.preroll_frames == 0
    assert Vad(8000).preroll_frames == 15
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.onset_ms = 40  # type: ignore[misc]


def test_state_aliases_are_the_enum_members() -> None:
    assert SILENCE is VadState.SILENCE and SPEECH is VadState.SPEECH
    assert make_vad().state is SILENCE


# ---- State machine rules, on scripted webrtcvad decisions ----------------------------------


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ("0000000000", []),
        ("1000000000", []),  # a lone voiced frame never reaches a 60 ms onset
        ("1001001001", []),  # never 3 voiced within any 5 frames
        ("1100000110", []),  # old voiced frames slide out of the window
        ("0111", [SpeechStart(1, 3)]),
        ("10101", [SpeechStart(0, 4)]),
        ("110000101010", [SpeechStart(6, 10)]),  # start is the oldest voiced frame still in window
    ],
)
def test_onset_needs_onset_ms_voiced_within_the_window(
    flags: str, expected: list[VadEvent]
) -> None:
    assert script(ScriptedVad(flags), len(flags)) == expected


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ("1000", [SpeechStart(0, 0), SpeechEnd(1, 3, 1, False)]),
        ("1001000", [SpeechStart(0, 0), SpeechEnd(4, 6, 4, False)]),  # voiced frame restarts it
        ("1001", [SpeechStart(0, 0)]),  # two unvoiced are not enough
        ("10001000", [SpeechStart(0, 0), SpeechEnd(1, 3, 1, False), SpeechStart(4, 4),
                      SpeechEnd(5, 7, 1, False)]),
    ],
)
def test_end_needs_hangover_ms_of_consecutive_unvoiced_frames(
    flags: str, expected: list[VadEvent]
) -> None:
    vad = ScriptedVad(flags, onset_ms=20, onset_window_ms=20, hangover_ms=60)
    assert script(vad, len(flags)) == expected


@pytest.mark.parametrize(("voiced", "short"), [(1, True), (2, False), (3, False)])
def test_short_is_set_only_below_min_speech_ms(voiced: int, short: bool) -> None:
    flags = "1" * voiced + "0"
    vad = ScriptedVad(flags, onset_ms=20, onset_window_ms=20, hangover_ms=20, min_speech_ms=40)
    end = script(vad, len(flags))[-1]
    assert end == SpeechEnd(voiced, voiced, voiced, short)


def test_flush_ends_scripted_speech_just_after_the_last_voiced_frame() -> None:
    vad = ScriptedVad("11100", onset_ms=20, onset_window_ms=20, hangover_ms=100)
    assert script(vad, 5) == [SpeechStart(0, 0)]
    assert vad.flush() == SpeechEnd(3, 4, 3, False)


@pytest.mark.parametrize(
    ("flags", "voiced_ms"),
    [
        ("0111", 60),  # at the onset: the onset's own voiced frames
        ("011100", 60),  # unvoiced frames inside the hangover add nothing (a cough stays short)
        ("01110011", 100),
        ("0111000000000000000000", 0),  # the utterance ended: SILENCE reads 0
    ],
)
def test_voiced_ms_counts_the_utterances_voiced_frames_only(flags: str, voiced_ms: int) -> None:
    vad = ScriptedVad(flags)
    script(vad, len(flags))
    assert vad.voiced_ms == voiced_ms


@pytest.mark.parametrize("interrupt", ["reset", "flush"])
def test_reset_and_flush_in_silence_forget_partial_onset_evidence(interrupt: str) -> None:
    vad = ScriptedVad("11" + "1")
    assert script(vad, 2) == []
    assert getattr(vad, interrupt)() is None
    assert script(vad, 1) == []  # without the interrupt, this third voiced frame would start
    assert vad.frames == 3


def test_reset_in_speech_gives_no_event_and_counts_on() -> None:
    vad = ScriptedVad("111" + "1110", hangover_ms=20)
    assert script(vad, 3) == [SpeechStart(0, 2)]
    vad.reset()
    assert vad.state is SILENCE
    assert script(vad, 4) == [SpeechStart(3, 5), SpeechEnd(6, 6, 3, False)]


class TestResume:
    def test_resume_speech_enters_speech_without_an_event_and_ends_after_hangover(self) -> None:
        vad = Vad(16000, VadConfig(hangover_ms=100))
        vad.resume_speech(3)
        assert vad.state is SPEECH
        silence = bytes(vad.frame_bytes)
        events = [vad.process(silence) for _ in range(9)]
        ends = [e for e in events if e is not None]
        # Frames 0..3 sit before the assumed onset; the hangover counts from frame 3.
        assert len(ends) == 1 and isinstance(ends[0], SpeechEnd)
        assert ends[0].frame == 4 and ends[0].decided_frame == 8 and ends[0].duration_frames == 1


# ---- The end of speech on loud frames: pause fixtures, line noise, scripted levels ---------


PAUSES = json.loads((DATA / "pauses.json").read_text())
LINE_NOISE_PEAK = 65  # the bench's line noise (sox whitenoise vol 0.002)


def with_line_noise(audio: Audio, rate: int, lead_ms: int = 800, tail_ms: int = 1000) -> Audio:
    """The sentence between stretches of line noise, noise over all of it (as a bench call)."""
    x = np.concatenate([silence(lead_ms, rate), audio, silence(tail_ms, rate)]).astype(np.int32)
    x += np.random.default_rng(7).integers(-LINE_NOISE_PEAK, LINE_NOISE_PEAK + 1, len(x))
    return np.clip(x, -32768, 32767).astype("<i2")


def pause_fixture(name: str) -> tuple[Audio, int, dict[str, Any]]:
    with wave.open(str(DATA / name), "rb") as w:
        audio = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
        return audio, w.getframerate(), PAUSES[name]


@pytest.mark.parametrize("name", sorted(PAUSES))
def test_a_sentence_with_150_to_300_ms_pauses_is_one_utterance_ending_at_its_last_word(name: str) -> None:
    audio, rate, meta = pause_fixture(name)
    vad = make_vad(rate)
    lead = 800 // 20
    # webrtcvad flags the first ~100 ms of the noise (the worker ignores its first onset window)
    events = [e for e in run_all(vad, with_line_noise(audio, rate)) if e.frame >= lead // 2]
    assert [type(e) for e in events if isinstance(e, SpeechStart | SpeechEnd)] == [SpeechStart, SpeechEnd]
    start = next(e for e in events if isinstance(e, SpeechStart))
    end = next(e for e in events if isinstance(e, SpeechEnd))
    first_ms, last_ms = meta["phrases"][0][0], meta["phrases"][-1][1]
    assert abs(start.frame - (lead + first_ms // 20)) <= 2
    # the frame after the last spoken 20 ms, not webrtcvad's ~100 ms of padding after it
    assert abs(end.frame - (lead + -(-last_ms // 20))) <= 1
    assert end.decided_frame == end.frame - 1 + 16
    # every pause longer than the 160 ms tentative was announced and taken back, in order
    pauses = [e for e in events if isinstance(e, SpeechPause)]
    resumes = [e for e in events if isinstance(e, SpeechResume)]
    gaps = [(b, c) for ((_, b), (c, _)), ms in zip(zip(meta["phrases"], meta["phrases"][1:]), meta["pauses_ms"])
            if ms >= 200]
    assert len(pauses) == len(gaps) + 1 and len(resumes) == len(gaps)
    for (b, c), p, r in zip(gaps, pauses, resumes):
        assert abs(p.frame - (lead + -(-b // 20))) <= 1 and abs(r.frame - (lead + c // 20)) <= 2
    assert pauses[-1].frame == end.frame and pauses[-1].decided_frame == end.frame - 1 + 8


@pytest.mark.parametrize("name", ["pause_04.wav", "pause_08_8k.wav"])
def test_on_webrtcvad_voicing_alone_the_end_comes_about_100_ms_late(name: str) -> None:
    """Why levels are looked at: the same sentence, with tail_margin_db=0."""
    audio, rate, meta = pause_fixture(name)
    events = run(make_vad(rate, tail_margin_db=0), with_line_noise(audio, rate))
    assert len(events) == 4  # the noise onset's blip, then the sentence
    end = events[-1]
    assert isinstance(end, SpeechEnd)
    assert end.frame - (40 + -(-meta["phrases"][-1][1] // 20)) >= 3


def test_a_quiet_caller_keeps_webrtcvads_voicing_as_the_end() -> None:
    """Speech never clearly above the floor (margin 60 dB): the utterance is not cut short."""
    speech = tone_burst(1000, 16000)
    audio = with_line_noise(speech, 16000)
    loud = [e for e in run(make_vad(), audio) if e.frame >= 20]
    quiet = [e for e in run(make_vad(tail_margin_db=60), audio) if e.frame >= 20]
    assert [type(e) for e in quiet] == [SpeechStart, SpeechEnd] == [type(e) for e in loud]
    assert quiet[1].frame >= loud[1].frame  # webrtcvad's padded end, never earlier than the loud one


class LevelledVad(Vad):
    """Scripted frames: 'L' loud and voiced, 'v' voiced but quiet, '0' unvoiced."""

    def __init__(self, script: str, **config: int) -> None:
        super().__init__(16000, VadConfig(**config))
        self._script = iter(script)

    def _classify(self, frame: bytes, voiced: bool) -> Any:
        from workers.vad import _Input

        return {"L": _Input.LOUD, "v": _Input.VOICED, "0": _Input.UNVOICED}[next(self._script)]


def levelled(script: str, **config: int) -> list[VadEvent]:
    vad = LevelledVad(script, onset_ms=20, onset_window_ms=20, **config)
    return [e for _ in script if (e := vad.process(bytes(vad.frame_bytes))) is not None]


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        # quiet voiced frames (webrtcvad's padding) do not hold the end back
        ("LLvvv", [SpeechStart(0, 0), SpeechPause(2, 3), SpeechEnd(2, 4, 2, False)]),
        # a quiet run shorter than the tentative gives nothing; loud again extends
        ("LvLvv0", [SpeechStart(0, 0), SpeechPause(3, 4), SpeechEnd(3, 5, 3, False)]),
        # pause then loud: resume, and the hangover counts afresh
        ("LvvLvvv", [SpeechStart(0, 0), SpeechPause(1, 2), SpeechResume(3), SpeechPause(4, 5),
                     SpeechEnd(4, 6, 4, False)]),
        # quiet voiced frames count for the onset, not for the end
        ("vvv", [SpeechStart(0, 0), SpeechPause(1, 2)]),
    ],
)
def test_the_end_counts_from_the_last_loud_frame(script: str, expected: list[VadEvent]) -> None:
    assert levelled(script, hangover_ms=60, tentative_ms=40) == expected


def test_no_pause_events_with_tentative_zero_or_not_below_the_hangover() -> None:
    for tentative in (0, 60, 100):
        events = levelled("LL000", hangover_ms=60, tentative_ms=tentative)
        assert events == [SpeechStart(0, 0), SpeechEnd(2, 4, 2, False)]


def test_voiced_quiet_frames_still_count_toward_barge_in() -> None:
    vad = LevelledVad("Lvvv", onset_ms=20, onset_window_ms=20, hangover_ms=200)
    for _ in range(4):
        vad.process(bytes(vad.frame_bytes))
    assert vad.voiced_ms == 80


@pytest.mark.parametrize(("margin", "range_db"), [(-1.0, 35.0), (9.0, 0.0)])
def test_bad_level_knobs_are_refused(margin: float, range_db: float) -> None:
    with pytest.raises(ValueError, match="tail_margin_db must be >= 0 and tail_range_db > 0"):
        VadConfig(tail_margin_db=margin, tail_range_db=range_db)
