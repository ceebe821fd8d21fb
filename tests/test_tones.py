"""Behaviour of workers.tones: beeps, SIT, busy, reorder and fax tones, and no false alarms.

Signals are made with numpy at 8 and 16 kHz, optionally through a G.711 u-law round
trip with white noise at -50 dBFS under them (a phone line); speech is the committed
fixtures in tests/data. Nothing here measures speed: ``python -m workers.tones`` prints
the CPU per frame.
"""

from __future__ import annotations

import json
import wave
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from workers.tones import ToneConfig, ToneDetector, ToneEvent


DATA = Path(__file__).parent / "data"
RATES = (8000, 16000)
SIT_SEQUENCES = [  # (Hz, ms) x 3: the common North American SIT codes
    ((913.8, 274), (1370.6, 274), (1776.7, 380)),  # NC: no circuit
    ((985.2, 380), (1428.5, 274), (1776.7, 380)),  # IC: intercept
    ((913.8, 380), (1370.6, 380), (1776.7, 380)),  # VC: vacant code
    ((985.2, 274), (1370.6, 380), (1776.7, 380)),  # RO: reorder
]

Signal = npt.NDArray[np.float64]


def sine(rate: int, freqs: tuple[float, ...], ms: float, dbfs: float = -20.0, seed: int = 0) -> Signal:
    """Sines of equal level, each at `dbfs` (a full-scale sine is 0 dBFS), random phases."""
    rng = np.random.default_rng(seed)
    t = np.arange(round(rate * ms / 1000)) / rate
    amp = 32767 * 10 ** (dbfs / 20)
    out = np.zeros(t.size)
    for f in freqs:
        out += amp * np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi))
    return out


def silence(rate: int, ms: float) -> Signal:
    return np.zeros(round(rate * ms / 1000))


def mulaw(x: Signal) -> Signal:
    """G.711 u-law encode to 8-bit codes and decode back (the segment tables of g711.c)."""
    pcm = np.clip(np.round(x), -32768, 32767).astype(np.int64)
    mask = np.where(pcm < 0, 0x7F, 0xFF)
    mag = np.minimum(np.abs(pcm), 32635) + 0x84
    seg = np.searchsorted(np.array([0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF, 0x3FFF, 0x7FFF]), mag)
    code = ((seg << 4) | ((mag >> (seg + 3)) & 0xF)) ^ mask
    u = ~code & 0xFF
    t = (((u & 0x0F) << 3) + 0x84) << ((u & 0x70) >> 4)
    out: Signal = np.where(u & 0x80, 0x84 - t, t - 0x84).astype(np.float64)
    return out


def line(x: Signal, codec: bool = True, noise_dbfs: float = -50.0, seed: int = 1) -> npt.NDArray[np.int16]:
    """A phone line: white noise at `noise_dbfs` (RMS) added, then u-law if `codec`."""
    noisy = x + np.random.default_rng(seed).normal(0, 32767 * 10 ** (noise_dbfs / 20) / np.sqrt(2), x.size)
    return np.clip(np.round(mulaw(noisy) if codec else noisy), -32768, 32767).astype(np.int16)


def run(rate: int, audio: npt.NDArray[np.int16], chunk_ms: int = 20, **kw: object) -> list[ToneEvent]:
    det = ToneDetector(rate, ToneConfig(**kw))  # type: ignore[arg-type]
    step = max(1, rate * chunk_ms // 1000)
    events = [e for i in range(0, audio.size, step) for e in det.feed(audio[i : i + step])]
    return events + det.flush()


def read_wav(path: Path) -> tuple[int, list[npt.NDArray[np.int16]]]:
    with wave.open(str(path)) as w:
        rate, channels = w.getframerate(), w.getnchannels()
        data = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.int16)
    return rate, [data[c::channels] for c in range(channels)]


def kinds(events: list[ToneEvent]) -> list[str]:
    return [e.kind for e in events]


SPEECH = sorted(p.relative_to(DATA).as_posix() for p in DATA.glob("**/*.wav"))


# -- beeps -----------------------------------------------------------------------------


@pytest.mark.parametrize("codec", [False, True], ids=["linear", "ulaw"])
@pytest.mark.parametrize("rate", RATES)
def test_beeps_of_400_to_2000_hz_and_100_to_1500_ms_are_reported_once_at_their_end(rate: int, codec: bool) -> None:
    rng = np.random.default_rng(rate)
    for freq in (400, 800, 1000, 1400, 2000):
        for ms in (100, 180, 250, 500, 1000, 1500):
            lead = int(rng.integers(200, 900))
            audio = line(np.concatenate([silence(rate, lead), sine(rate, (freq,), ms), silence(rate, 600)]), codec)
            events = run(rate, audio)
            assert kinds(events) == ["beep"], (freq, ms, events)
            beep = events[0]
            assert abs(beep.end_ms - (lead + ms)) <= 40, (freq, ms, lead, beep)
            assert abs(beep.start_ms - lead) <= 40, (freq, ms, lead, beep)
            assert beep.freq_hz == pytest.approx(freq, rel=0.01)
            assert beep.level_dbfs == pytest.approx(-20, abs=1.5)


@pytest.mark.parametrize("rate", RATES)
def test_a_beep_is_reported_on_the_first_quiet_frame_after_it(rate: int) -> None:
    det = ToneDetector(rate)
    beep = line(np.concatenate([silence(rate, 300), sine(rate, (1000,), 400)]))
    assert det.feed(beep) == []
    events = det.feed(line(silence(rate, 40), seed=2))
    assert kinds(events) == ["beep"]
    assert abs(events[0].end_ms - 700) <= 20


@pytest.mark.parametrize("rate", RATES)
def test_a_beep_fed_sample_by_sample_in_random_chunks_or_at_once_gives_the_same_events(rate: int) -> None:
    audio = line(np.concatenate([silence(rate, 437), sine(rate, (1400,), 333), silence(rate, 500)]))
    at_once = run(rate, audio, chunk_ms=100_000)
    by_sample = ToneDetector(rate)
    one_by_one = [e for s in audio for e in by_sample.feed(np.array([s], np.int16))] + by_sample.flush()
    rng = np.random.default_rng(7)
    cuts = np.cumsum(rng.integers(0, 700, 200))
    chunked = ToneDetector(rate)
    random_chunks = [e for part in np.split(audio, cuts[cuts < audio.size]) for e in chunked.feed(part)]
    random_chunks += chunked.flush()
    assert kinds(at_once) == ["beep"]
    assert one_by_one == at_once == random_chunks


@pytest.mark.parametrize("rate", RATES)
def test_a_call_with_every_kind_of_tone_gives_the_same_events_in_any_chunking(rate: int) -> None:
    _, (speech,) = read_wav(DATA / ("ko_01_8k.wav" if rate == 8000 else "ko_01.wav"))
    sit = [sine(rate, (f,), ms, seed=i) for i, (f, ms) in enumerate(SIT_SEQUENCES[0])]
    busy = [sine(rate, (480, 620), 500, dbfs=-24), silence(rate, 500)] * 3
    parts = [speech.astype(np.float64), silence(rate, 200), sine(rate, (1000,), 400), silence(rate, 700)]
    parts += [*sit, silence(rate, 700), *busy, sine(rate, (2100,), 2600), silence(rate, 300)]
    audio = line(np.concatenate(parts))
    at_once = run(rate, audio, chunk_ms=100_000)
    assert kinds(at_once) == ["beep", "sit", "busy", "fax_ced"]
    rng = np.random.default_rng(rate)
    for _ in range(3):
        cuts = np.cumsum(rng.integers(1, rate // 5, audio.size // 100))
        det = ToneDetector(rate)
        events = [e for part in np.split(audio, cuts[cuts < audio.size]) for e in det.feed(part)]
        assert events + det.flush() == at_once


@pytest.mark.parametrize("rate", RATES)
@pytest.mark.parametrize("name", ["ko_01", "ko_02", "en_sentence"])
def test_a_1000_hz_beep_after_speech_is_reported_at_its_end(rate: int, name: str) -> None:
    candidates = [DATA / f"{name}{suffix}.wav" for suffix in (("_8k", "_8k") if rate == 8000 else ("", "_16k"))]
    file_rate, (speech,) = read_wav(next(p for p in candidates if p.exists()))
    assert file_rate == rate
    for gap_ms in (0, 300):
        audio_ms = 1000 * speech.size / rate
        parts = [speech.astype(np.float64), silence(rate, gap_ms), sine(rate, (1000,), 500), silence(rate, 800)]
        events = run(rate, line(np.concatenate(parts)))
        assert kinds(events) == ["beep"], (gap_ms, events)
        assert abs(events[0].end_ms - (audio_ms + gap_ms + 500)) <= 40


@pytest.mark.parametrize("rate", RATES)
def test_a_beep_still_sounding_at_the_end_of_the_audio_is_reported_by_flush(rate: int) -> None:
    det = ToneDetector(rate, start_ms=5000)
    assert det.feed(line(np.concatenate([silence(rate, 300), sine(rate, (850,), 400)]))) == []
    assert det.offset_ms == 5700
    events = det.flush()
    assert kinds(events) == ["beep"]
    assert abs(events[0].start_ms - 5300) <= 20 and events[0].end_ms == 5700
    with pytest.raises(RuntimeError):
        det.feed(np.zeros(160, np.int16))


@pytest.mark.parametrize("rate", RATES)
def test_a_beep_with_a_concealed_lost_packet_or_a_crackle_is_still_one_beep(rate: int) -> None:
    # Packet loss concealment replays audio (a phase jump); a crackle is 20 ms of loud noise.
    jump = np.concatenate([sine(rate, (1000,), 310), sine(rate, (1000,), 290, seed=5)])
    crackle = sine(rate, (1000,), 600)
    crackle[rate * 290 // 1000 : rate * 310 // 1000] += np.random.default_rng(3).normal(0, 5000, rate // 50)
    for tone in (jump, crackle):
        events = run(rate, line(np.concatenate([silence(rate, 200), tone, silence(rate, 500)])))
        assert kinds(events) == ["beep"]
        assert abs(events[0].start_ms - 200) <= 20 and abs(events[0].end_ms - 800) <= 20


@pytest.mark.parametrize("rate", RATES)
def test_a_two_tone_beep_is_one_beep_at_the_end_of_the_second_tone(rate: int) -> None:
    parts = [silence(rate, 300), sine(rate, (1400,), 200), sine(rate, (1000,), 300, seed=3), silence(rate, 500)]
    events = run(rate, line(np.concatenate(parts)))
    assert kinds(events) == ["beep"]
    assert abs(events[0].end_ms - 800) <= 20 and events[0].freq_hz == pytest.approx(1000, rel=0.01)


@pytest.mark.parametrize("rate", RATES)
def test_tones_shorter_or_longer_than_a_beep_or_outside_its_band_are_no_beep(rate: int) -> None:
    for freq, ms in ((1000, 60), (1000, 2600), (300, 500), (2600, 500)):
        audio = line(np.concatenate([silence(rate, 300), sine(rate, (freq,), ms), silence(rate, 500)]))
        assert run(rate, audio) == [], (freq, ms)
    quiet = line(np.concatenate([silence(rate, 300), sine(rate, (1000,), 500, dbfs=-45), silence(rate, 500)]))
    assert run(rate, quiet) == []


def test_the_beep_range_and_lengths_follow_the_config() -> None:
    audio = line(np.concatenate([silence(8000, 300), sine(8000, (1000,), 500), silence(8000, 500)]))
    assert kinds(run(8000, audio)) == ["beep"]
    assert run(8000, audio, min_beep_ms=600) == []
    assert run(8000, audio, max_beep_ms=400) == []
    assert run(8000, audio, beep_low_hz=1200) == []
    assert run(8000, audio, min_level_dbfs=-10) == []


# -- other tones -----------------------------------------------------------------------


@pytest.mark.parametrize("codec", [False, True], ids=["linear", "ulaw"])
@pytest.mark.parametrize("rate", RATES)
def test_fax_ced_is_reported_once_when_confirmed_and_never_as_a_beep(rate: int, codec: bool) -> None:
    det = ToneDetector(rate)
    audio = line(np.concatenate([silence(rate, 500), sine(rate, (2100,), 3300, dbfs=-15), silence(rate, 500)]), codec)
    assert det.feed(audio[: rate * 2400 // 1000]) == []
    events = det.feed(audio[rate * 2400 // 1000 : rate * 2560 // 1000])
    assert kinds(events) == ["fax_ced"]
    assert abs(events[0].start_ms - 500) <= 20 and abs(events[0].end_ms - 2500) <= 40
    assert events[0].freq_hz == pytest.approx(2100, abs=5)
    assert det.feed(audio[rate * 2560 // 1000 :]) + det.flush() == []
    short = line(np.concatenate([silence(rate, 500), sine(rate, (2100,), 1000), silence(rate, 500)]), codec)
    assert kinds(run(rate, short)) == ["beep"]


@pytest.mark.parametrize("rate", RATES)
def test_ansam_with_phase_reversals_and_am_is_fax_ced_and_no_beep(rate: int) -> None:
    t = np.arange(rate * 3300 // 1000) / rate
    flips = np.pi * (np.floor(t / 0.45) % 2)
    for tail_ms in (3300, 3150):  # ending just after a reversal leaves a short piece
        ansam = 6000 * (1 + 0.2 * np.sin(2 * np.pi * 15 * t)) * np.sin(2 * np.pi * 2100 * t + flips)
        audio = np.concatenate([silence(rate, 300), ansam[: rate * tail_ms // 1000], silence(rate, 500)])
        events = run(rate, line(audio))
        assert kinds(events) == ["fax_ced"]
        assert abs(events[0].start_ms - 300) <= 20 and abs(events[0].end_ms - 2300) <= 40


@pytest.mark.parametrize("codec", [False, True], ids=["linear", "ulaw"])
@pytest.mark.parametrize("rate", RATES)
def test_fax_cng_bursts_give_a_beep_then_fax_cng_on_the_second_burst_then_nothing(rate: int, codec: bool) -> None:
    burst = [sine(rate, (1100,), 500, dbfs=-18), silence(rate, 3000)]
    events = run(rate, line(np.concatenate([silence(rate, 700)] + burst * 4), codec))
    assert kinds(events) == ["beep", "fax_cng"]
    assert abs(events[1].start_ms - 700) <= 20 and abs(events[1].end_ms - 4700) <= 40
    assert events[1].freq_hz == pytest.approx(1100, abs=10)


@pytest.mark.parametrize("codec", [False, True], ids=["linear", "ulaw"])
@pytest.mark.parametrize("rate", RATES)
@pytest.mark.parametrize(("kind", "on_ms"), [("busy", 500), ("reorder", 250)])
def test_busy_and_reorder_are_reported_once_after_two_cycles(rate: int, codec: bool, kind: str, on_ms: int) -> None:
    cycle = [sine(rate, (480, 620), on_ms, dbfs=-24), silence(rate, on_ms)]
    events = run(rate, line(np.concatenate([silence(rate, 300)] + cycle * 6), codec))
    assert kinds(events) == [kind]
    assert abs(events[0].start_ms - 300) <= 20
    assert 300 + 3 * on_ms <= events[0].end_ms <= 300 + 4 * on_ms + 40
    assert events[0].freq_hz == pytest.approx(480, abs=15)


@pytest.mark.parametrize("codec", [False, True], ids=["linear", "ulaw"])
@pytest.mark.parametrize("rate", RATES)
@pytest.mark.parametrize("sequence", SIT_SEQUENCES, ids=["NC", "IC", "VC", "RO"])
def test_sit_is_reported_once_at_the_end_of_its_third_tone(
    rate: int, codec: bool, sequence: tuple[tuple[float, int], ...]
) -> None:
    tones = [sine(rate, (f,), ms, seed=i) for i, (f, ms) in enumerate(sequence)]
    sit = np.concatenate([silence(rate, 400), *tones, silence(rate, 600)])
    events = run(rate, line(np.concatenate([sit, sit])), codec)
    end = 400 + sum(ms for _, ms in sequence)
    assert kinds(events) == ["sit"]
    assert abs(events[0].start_ms - 400) <= 20 and abs(events[0].end_ms - end) <= 40


@pytest.mark.parametrize("rate", RATES)
def test_steady_dual_tones_like_dial_tone_ringback_or_dtmf_are_no_beep(rate: int) -> None:
    for pair, ms in (((350, 440), 3000), ((440, 480), 2000), ((697, 1209), 300), ((480, 620), 3000)):
        audio = line(np.concatenate([silence(rate, 300), sine(rate, pair, ms, dbfs=-24), silence(rate, 500)]))
        assert run(rate, audio) == [], pair


# -- false alarms ----------------------------------------------------------------------


@pytest.mark.parametrize("name", SPEECH)
def test_no_tone_is_reported_on_any_speech_fixture(name: str) -> None:
    rate, channels = read_wav(DATA / name)
    for channel in channels:
        assert run(rate, channel) == []
        assert run(rate, line(channel.astype(np.float64))) == []


@pytest.mark.parametrize("rate", RATES)
def test_silence_white_noise_and_line_hum_give_nothing(rate: int) -> None:
    five_s = silence(rate, 5000)
    assert run(rate, five_s.astype(np.int16)) == []
    for noise_dbfs in (-60, -50, -30, -10):
        assert run(rate, line(five_s, noise_dbfs=noise_dbfs)) == [], noise_dbfs
    for mains in (50, 60):
        hum = np.sum([sine(rate, (mains * h,), 5000, dbfs=-20 - 6 * h, seed=h) for h in range(1, 8)], axis=0)
        assert run(rate, line(hum)) == [], mains
    clicks = five_s.copy()
    clicks[:: rate // 7] = 20000
    assert run(rate, line(clicks)) == []


@pytest.mark.parametrize("rate", RATES)
def test_chords_like_music_on_hold_give_no_beep(rate: int) -> None:
    chords = [(261.6, 329.6, 392.0), (293.7, 370.0, 440.0, 523.3), (392.0, 493.9, 587.3), (440.0, 554.4, 659.3, 880.0)]
    music = np.concatenate([sine(rate, chord, 700, dbfs=-24, seed=i) for i, chord in enumerate(chords * 3)])
    assert run(rate, line(music)) == []


@pytest.mark.parametrize("rate", RATES)
def test_a_melody_of_notes_shorter_than_min_beep_gives_no_beep(rate: int) -> None:
    notes = [523.3, 587.3, 659.3, 698.5, 784.0, 880.0, 987.8, 1046.5, 987.8, 880.0, 784.0, 659.3] * 3
    for note_ms, gap_ms in ((60, 0), (60, 30), (40, 40)):
        parts = [p for i, f in enumerate(notes) for p in (sine(rate, (f,), note_ms, seed=i), silence(rate, gap_ms))]
        assert run(rate, line(np.concatenate(parts))) == [], (note_ms, gap_ms)


# -- API -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        {"min_beep_ms": 0},
        {"max_beep_ms": 500, "min_beep_ms": 600},
        {"beep_high_hz": 300.0},
        {"beep_low_hz": 100.0},
        {"beep_high_hz": 4000.0},
        {"min_level_dbfs": 3.0},
        {"purity": 0.3},
        {"purity": 1.5},
        {"drift_hz": -1.0},
        {"drift_frac": 0.5},
        {"max_twist_db": -1.0},
        {"ced_min_ms": 100},
    ],
)
def test_bad_config_values_raise_value_error_with_a_lowercase_message(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError) as raised:
        ToneConfig(**bad)  # type: ignore[arg-type]
    message = str(raised.value)
    assert message[0].islower() and next(iter(bad)) in message


def test_bad_rates_and_samples_are_refused() -> None:
    for rate in (0, 4000, 8001, 11025):
        with pytest.raises(ValueError):
            ToneDetector(rate)
    det = ToneDetector(8000)
    for samples in (np.zeros(160, np.float32), np.zeros((2, 160), np.int16), [0] * 160):
        with pytest.raises(ValueError):
            det.feed(samples)  # type: ignore[arg-type]


def test_an_event_is_json_ready_and_times_start_at_the_detector_offset() -> None:
    det = ToneDetector(16000, start_ms=12_000)
    audio = line(np.concatenate([silence(16000, 300), sine(16000, (1000,), 400), silence(16000, 300)]))
    events = det.feed(audio) + det.flush()
    assert det.offset_ms == 13_000
    assert len(events) == 1
    data = json.loads(json.dumps(events[0].to_dict()))
    assert data == {
        "kind": "beep",
        "start_ms": events[0].start_ms,
        "end_ms": events[0].end_ms,
        "freq_hz": pytest.approx(1000, abs=5),
        "level_dbfs": pytest.approx(-20, abs=1),
    }
    assert abs(data["start_ms"] - 12_300) <= 20 and abs(data["end_ms"] - 12_700) <= 20


# -- is_tonal: per-frame flags for the last few seconds ---------------------------------


@pytest.mark.parametrize("rate", RATES)
def test_is_tonal_marks_a_beeps_and_a_busy_tones_frames_and_not_silence_or_speech(rate: int) -> None:
    _, (speech,) = read_wav(DATA / ("ko_01_8k.wav" if rate == 8000 else "ko_01.wav"))
    speech_ms = 1000 * speech.size // rate // 20 * 20
    parts = [speech[: rate * speech_ms // 1000].astype(np.float64), silence(rate, 300), sine(rate, (1000,), 400)]
    parts += [silence(rate, 300), sine(rate, (480, 620), 500), silence(rate, 200)]
    det = ToneDetector(rate, start_ms=1000)
    tonal: list[bool] = []
    step = rate // 50
    for i, chunk in enumerate(np.split(audio := line(np.concatenate(parts)), range(step, audio.size, step))):
        det.feed(chunk)
        tonal.append(det.is_tonal(1000 + 20 * i + 7))  # any offset inside the frame, asked right after feeding it
    frames = speech_ms // 20
    assert not any(tonal[:frames])  # speech
    assert not any(tonal[frames : frames + 15])  # silence
    assert all(tonal[frames + 15 : frames + 35])  # the beep's 20 frames, exactly aligned
    assert not any(tonal[frames + 35 : frames + 50])
    assert all(tonal[frames + 50 : frames + 75])  # the busy tone's on-segment (dual tonal)
    assert not any(tonal[frames + 75 :])


def test_is_tonal_is_false_before_the_start_for_unfed_frames_and_after_three_seconds() -> None:
    det = ToneDetector(8000, start_ms=500)
    assert not det.is_tonal(500)
    det.feed(line(sine(8000, (1000,), 1010)))  # 50 whole frames and half of one
    assert det.is_tonal(500) and det.is_tonal(519) and det.is_tonal(1499)
    assert not det.is_tonal(499) and not det.is_tonal(-20)  # before start_ms
    assert not det.is_tonal(1500)  # the half-fed frame is not analysed yet
    det.feed(line(silence(8000, 1990)))  # 150 frames in all: the ring is full
    assert det.is_tonal(500) and not det.is_tonal(1500) and not det.is_tonal(3480)
    assert not det.is_tonal(3500)  # not fed yet
    det.feed(line(silence(8000, 20)))  # one frame more: the oldest leaves the ring
    assert not det.is_tonal(500) and det.is_tonal(520) and det.is_tonal(1480)


@pytest.mark.parametrize("rate", RATES)
@pytest.mark.parametrize(("kind", "on_ms"), [("busy", 500), ("reorder", 250)])
def test_busy_and_reorder_are_found_wherever_their_edges_fall_in_a_frame(rate: int, kind: str, on_ms: int) -> None:
    # A tone ending 10-16 ms into a frame leaves a short, smeared dual-tone blip there.
    ramp = np.linspace(0, 1, rate // 200)  # 5 ms edges
    for seed in (2, 3):  # the blip's spectrum depends on the tones' phases
        on = sine(rate, (480, 620), on_ms, dbfs=-16, seed=seed)
        on[: ramp.size] *= ramp
        on[-ramp.size :] *= ramp[::-1]
        for lead in range(300, 320):
            audio = line(np.concatenate([silence(rate, lead)] + [on, silence(rate, on_ms)] * 6))
            events = run(rate, audio)
            assert kinds(events) == [kind], (seed, lead)
            assert abs(events[0].start_ms - lead) <= 20
