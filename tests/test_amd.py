"""The answering-machine decider (workers.amd), its answer corpus and its evaluator.

The decider tests feed synthetic voiced/unvoiced 20 ms frame sequences and check each
of Asterisk's causes at the exact frame the rules allow. The corpus tests make a few
cases with espeak-ng and sox (locally, nothing downloaded) and run the farm's real
webrtcvad over them.
"""

from __future__ import annotations

import json
import shutil
import wave
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from workers.amd import DEFAULT_PHRASES, AmdBeep, AmdConfig, AmdDecider, AmdDecision


Run = tuple[bool, int] | tuple[bool, int, bool]  # (voiced, ms) or (voiced, ms, tonal)


def feed(amd: AmdDecider, runs: Sequence[Run], start_ms: int = 0) -> tuple[list[AmdDecision], int]:
    """Feed runs of (voiced, ms) or (voiced, ms, tonal) as 20 ms frames; returns every
    decision returned and the end offset."""
    got = []
    t = start_ms
    for voiced, ms, *tonal in runs:
        assert ms % 20 == 0
        for _ in range(ms // 20):
            d = amd.on_frame(t, voiced, *tonal)
            if d is not None:
                got.append(d)
            t += 20
    return got, t


V, S = True, False


# ---- cadence: Asterisk's causes ----------------------------------------------------------


def test_a_short_greeting_then_after_greeting_silence_is_a_human_decided_on_the_completing_frame() -> None:
    amd = AmdDecider()
    got, _ = feed(amd, [(S, 500), (V, 600), (S, 2000)])
    assert len(got) == 1
    d = got[0]
    assert (d.result, d.reason, d.decision_ms) == ("human", "after_greeting_silence", 500 + 600 + 800)
    assert d.features["initial_silence_ms"] == 500
    assert d.features["greeting_ms"] == 600
    assert d.features["words"] == 1
    assert d.features["silence_after_ms"] == 800
    assert amd.decision is d


def test_silence_from_answer_for_initial_silence_ms_is_a_machine() -> None:
    got, _ = feed(AmdDecider(), [(S, 4000)])
    assert [(d.result, d.reason, d.decision_ms) for d in got] == [("machine", "initial_silence", 2500)]
    assert got[0].features["initial_silence_ms"] == 2500


def test_voice_adding_up_to_greeting_ms_is_a_long_greeting_machine() -> None:
    got, _ = feed(AmdDecider(), [(S, 300), (V, 800), (S, 100), (V, 1000)])
    assert [(d.result, d.reason, d.decision_ms) for d in got] == [("machine", "long_greeting", 300 + 800 + 100 + 700)]
    assert got[0].features["greeting_ms"] == 1500
    assert got[0].features["words"] == 2


def test_the_third_word_is_a_max_words_machine() -> None:
    got, _ = feed(AmdDecider(), [(S, 300), (V, 200), (S, 100), (V, 200), (S, 100), (V, 200)])
    # the third run becomes a word once it is min_word_ms long
    assert [(d.result, d.reason, d.decision_ms) for d in got] == [("machine", "max_words", 300 + 300 + 300 + 100)]
    assert got[0].features["words"] == 3


def test_one_voiced_run_of_max_word_ms_is_a_max_word_length_machine() -> None:
    amd = AmdDecider(AmdConfig(greeting_ms=10000, total_analysis_ms=10000))
    got, _ = feed(amd, [(S, 200), (V, 6000)])
    assert [(d.result, d.reason, d.decision_ms) for d in got] == [("machine", "max_word_length", 200 + 5000)]
    assert got[0].features["word_ms"] == 5000


def test_gaps_shorter_than_between_words_silence_do_not_split_a_word() -> None:
    got, _ = feed(AmdDecider(), [(S, 200), (V, 200), (S, 40), (V, 200), (S, 40), (V, 200), (S, 1000)])
    assert [(d.result, d.reason) for d in got] == [("human", "after_greeting_silence")]
    assert got[0].features["words"] == 1


def test_a_voiced_blip_shorter_than_min_word_ms_is_no_greeting_and_restarts_the_initial_silence() -> None:
    got, _ = feed(AmdDecider(), [(S, 1000), (V, 80), (S, 3000)])
    assert [(d.result, d.reason, d.decision_ms) for d in got] == [("machine", "initial_silence", 1080 + 2500)]
    assert got[0].features["words"] == 0


def test_nothing_decided_within_total_analysis_ms_is_unknown_too_long() -> None:
    got, _ = feed(AmdDecider(), [(V, 60), (S, 700)] * 10)
    assert [(d.result, d.reason, d.decision_ms) for d in got] == [("unknown", "too_long", 5000)]


def test_the_call_gets_exactly_one_decision_and_later_inputs_return_none() -> None:
    amd = AmdDecider()
    got, t = feed(amd, [(S, 400), (V, 500), (S, 900), (V, 3000)])
    assert len(got) == 1
    first = amd.decision
    assert amd.on_transcript(t, "음성 사서함으로 연결됩니다", True) is None
    assert amd.on_tone("fax_ced", t, t + 3000) is None
    assert amd.on_end(t) is None
    assert amd.decision is first and first is not None and first.result == "human"


def test_a_hangup_before_any_decision_is_unknown_hangup() -> None:
    amd = AmdDecider()
    feed(amd, [(S, 300), (V, 400), (S, 200)])
    d = amd.on_end(900)
    assert d is not None and (d.result, d.reason, d.decision_ms) == ("unknown", "hangup", 900)


# ---- transcript ------------------------------------------------------------------------------


def test_a_voicemail_phrase_in_a_partial_is_a_machine_whatever_the_spacing() -> None:
    amd = AmdDecider()
    feed(amd, [(S, 400), (V, 600)])
    d = amd.on_transcript(1000, "지금은 전화를받을수 없습니다", final=False)
    assert d is not None and (d.result, d.reason, d.decision_ms) == ("machine", "phrase", 1000)
    assert d.features["phrase"] == "전화를 받을 수 없"
    assert d.features["final"] is False


def test_an_english_phrase_matches_regardless_of_case_and_punctuation() -> None:
    d = AmdDecider().on_transcript(3000, "Please LEAVE a message, after the beep!", final=True)
    assert d is not None and (d.result, d.reason) == ("machine", "phrase")


def test_machine_words_transcript_words_are_a_machine_and_one_fewer_is_not() -> None:
    amd = AmdDecider()
    assert amd.on_transcript(2000, "하나 둘 셋 넷 다섯 여섯 일곱 여덟", final=False) is None
    d = amd.on_transcript(2500, "하나 둘 셋 넷 다섯 여섯 일곱 여덟 아홉", final=False)
    assert d is not None and (d.result, d.reason) == ("machine", "transcript_words")
    assert d.features["transcript_words"] == 9


def test_a_short_human_transcript_decides_nothing() -> None:
    assert AmdDecider().on_transcript(1200, "네 여보세요", final=True) is None


# ---- tones ----------------------------------------------------------------------------------


def test_a_beep_before_any_decision_is_a_machine_and_is_kept_as_the_beep() -> None:
    amd = AmdDecider()
    feed(amd, [(S, 300), (V, 600), (S, 200)])
    d = amd.on_tone("beep", 1000, 1400)
    assert d is not None and (d.result, d.reason, d.decision_ms) == ("machine", "beep", 1400)
    assert d.features["tone"] == {"kind": "beep", "start_ms": 1000, "end_ms": 1400}
    assert amd.beep == AmdBeep(1000, 1400)


@pytest.mark.parametrize(("kind", "result", "reason"), [
    ("fax_cng", "machine", "fax"), ("fax_ced", "machine", "fax"),
    ("sit", "unknown", "sit"), ("busy", "unknown", "busy"), ("reorder", "unknown", "reorder"),
])  # fmt: skip
def test_fax_tones_are_a_machine_and_network_tones_are_unknown_with_their_kind(
    kind: str, result: str, reason: str
) -> None:
    d = AmdDecider().on_tone(kind, 200, 900)
    assert d is not None and (d.result, d.reason, d.decision_ms) == (result, reason, 900)


TONE = True  # a run's third member: the tone detector found its frames tonal


def test_a_beep_right_after_a_short_prompt_is_a_machine_as_tonal_frames_are_no_silence() -> None:
    prompt: list[Run] = [
        (S, 400),
        (V, 1000),
        (S, 500),
        (V, 600, TONE),
        (V, 100),
        (S, 40),
    ]  # VAD hangover after the beep
    amd = AmdDecider()
    got, t = feed(amd, prompt)
    assert got == [] and t == 2640
    d = amd.on_tone("beep", 1900, 2500)
    assert d is not None and (d.result, d.reason, d.decision_ms) == ("machine", "beep", 2640)
    as_silence = AmdDecider()  # the same tone counted as silence ends the after-greeting silence first
    got, _ = feed(as_silence, [(S, 400), (V, 1000), (S, 500), (S, 600)])
    assert [(g.result, g.decision_ms) for g in got] == [("human", 2200)]


def test_a_busy_tone_and_the_vads_hangover_after_it_are_no_words_and_no_silence() -> None:
    cycle: list[Run] = [(V, 500, TONE), (V, 120), (S, 380)]  # webrtcvad voices the tone and 6 frames after it
    amd = AmdDecider()
    got, t = feed(amd, [(S, 300)] + cycle * 2 + [(V, 500, TONE)])
    assert got == [] and t == 2800
    assert amd.on_frame(t, False) is None
    assert amd.on_tone("busy", 300, 2820) is not None and amd.decision is not None
    d = amd.decision
    assert (d.result, d.reason, d.features["words"], d.features["initial_silence_ms"]) == ("unknown", "busy", 0, 2820)
    voiced = AmdDecider()  # counted as voice, the same tone is three words
    got, _ = feed(voiced, [(S, 300)] + [(V, 620), (S, 380)] * 2 + [(V, 500)])
    assert [(g.result, g.reason) for g in got] == [("machine", "max_words")]


def test_a_long_tone_runs_no_initial_silence_but_still_the_total_analysis_time() -> None:
    amd = AmdDecider()
    got, t = feed(amd, [(S, 600), (V, 2400, TONE)])
    assert got == [] and t == 3000
    d = amd.on_tone("fax_ced", 600, 2600)
    assert d is not None and (d.result, d.reason, d.decision_ms) == ("machine", "fax", 3000)
    long = AmdDecider()
    got, _ = feed(long, [(S, 600), (S, 4400, TONE)])
    assert [(g.result, g.reason, g.decision_ms) for g in got] == [("unknown", "too_long", 5000)]


def test_a_tonal_run_shorter_than_a_word_inside_speech_leaves_the_voicing_after_it_alone() -> None:
    # a nasal murmur can read tonal for a few frames; the voice after it still counts (not a tone's hangover)
    got, _ = feed(AmdDecider(), [(S, 300), (V, 200), (V, 80, TONE), (V, 1300)])
    assert [(g.result, g.reason, g.decision_ms, g.features["greeting_ms"]) for g in got] == [
        ("machine", "long_greeting", 300 + 200 + 80 + 1300, 1500)
    ]
    got, _ = feed(AmdDecider(), [(S, 300), (V, 200), (V, 100, TONE), (V, 1420)])  # a tone: 120 ms after it dropped
    assert [(g.decision_ms, g.features["greeting_ms"]) for g in got] == [(300 + 200 + 100 + 1420, 1500)]


def test_an_unknown_tone_kind_raises() -> None:
    with pytest.raises(ValueError, match="dtmf"):
        AmdDecider().on_tone("dtmf", 0, 100)


def test_a_beep_after_a_machine_decision_is_reported_separately_within_wait_for_beep_ms() -> None:
    amd = AmdDecider(AmdConfig(wait_for_beep_ms=10000))
    got, t = feed(amd, [(S, 300), (V, 1600)])
    assert got[0].reason == "long_greeting" and got[0].decision_ms == 1800
    assert amd.wants_beep(t)
    assert amd.on_tone("beep", 6000, 6300) is None  # not a second decision
    assert amd.beep == AmdBeep(6000, 6300)
    assert not amd.wants_beep(6400)
    assert amd.decision is got[0]


def test_a_beep_too_late_or_after_a_human_decision_is_not_kept() -> None:
    late = AmdDecider(AmdConfig(wait_for_beep_ms=1000))
    feed(late, [(S, 300), (V, 1600)])
    assert not late.wants_beep(1800 + 1001)
    late.on_tone("beep", 5000, 5200)
    assert late.beep is None
    human = AmdDecider()
    feed(human, [(S, 300), (V, 500), (S, 800)])
    assert not human.wants_beep(1700)
    human.on_tone("beep", 1700, 1900)
    assert human.beep is None


# ---- config -----------------------------------------------------------------------------------


def test_the_defaults_are_asterisks_and_jambonz_word_count() -> None:
    c = AmdConfig()
    assert (c.initial_silence_ms, c.greeting_ms, c.after_greeting_silence_ms, c.total_analysis_ms) == (
        2500,
        1500,
        800,
        5000,
    )
    assert (c.min_word_ms, c.between_words_silence_ms, c.max_words, c.max_word_ms) == (100, 50, 3, 5000)
    assert c.machine_words == 9
    assert "음성 사서함" in c.phrases and "leave a message" in c.phrases


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"greeting_ms": 0}, "greeting_ms must be >= 1, got 0"),
    ({"after_greeting_silence_ms": -20}, "after_greeting_silence_ms must be >= 1, got -20"),
    ({"between_words_silence_ms": -1}, "between_words_silence_ms must be >= 0, got -1"),
    ({"max_words": 0}, "max_words must be >= 1, got 0"),
    ({"wait_for_beep_ms": -5}, "wait_for_beep_ms must be >= 0, got -5"),
    ({"min_word_ms": 1.5}, "min_word_ms must be an integer, got 1.5"),
    ({"phrases": ("  ", "삐 소리")}, "has no letters or digits"),
])  # fmt: skip
def test_a_bad_config_value_raises_a_message_naming_the_field_and_the_value(
    kwargs: dict[str, object], needle: str
) -> None:
    with pytest.raises(ValueError) as e:
        AmdConfig(**kwargs)  # type: ignore[arg-type]
    assert needle in str(e.value)


@pytest.mark.parametrize(("mapping", "needle"), [
    ({"greting_ms": 1000}, "greting_ms"),
    ({"greeting_ms": "1500"}, "greeting_ms"),
    ({"max_words": True}, "max_words"),
    ({"phrases": "음성 사서함"}, "phrases"),
    ({"phrases": ["ok", 3]}, "phrases"),
    ({"greeting": -1}, "greeting must be >= 1, got -1"),
    ({"initial_silence_ms": 0}, "initial_silence_ms must be >= 1, got 0"),
])  # fmt: skip
def test_from_mapping_rejects_an_unknown_key_or_a_wrong_type_naming_the_key(
    mapping: dict[str, object], needle: str
) -> None:
    with pytest.raises(ValueError) as e:
        AmdConfig.from_mapping(mapping)
    assert needle in str(e.value)


def test_from_mapping_takes_amd_conf_names_and_extends_the_default_phrases() -> None:
    c = AmdConfig.from_mapping(
        {"maximum_number_of_words": 2, "after_greeting_silence_ms": 600, "phrases": ["잠시 후 연결"]}
    )
    assert c.max_words == 2 and c.after_greeting_silence_ms == 600
    assert c.phrases[: len(DEFAULT_PHRASES)] == DEFAULT_PHRASES and c.phrases[-1] == "잠시 후 연결"
    d = AmdDecider(c).on_transcript(1500, "잠시후 연결 해 드리겠습니다", final=True)
    assert d is not None and d.features["phrase"] == "잠시 후 연결"


def test_a_decision_serialises_to_json() -> None:
    got, _ = feed(AmdDecider(), [(S, 500), (V, 400), (S, 800)])
    d = got[0].to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["result"] == "human" and d["features"]["words"] == 1  # type: ignore[index]


# ---- the corpus and the real VAD ------------------------------------------------------------

needs_tools = pytest.mark.skipif(
    not (shutil.which("espeak-ng") and shutil.which("sox")), reason="espeak-ng and sox make the corpus"
)


@needs_tools
def test_the_corpus_is_deterministic_labelled_8k_and_reused_when_its_manifest_matches(tmp_path: Path) -> None:
    from bench.amd_corpus import generate, load

    a = generate(tmp_path / "a", count=20, seed=3)
    assert len(a) == 20 and load(tmp_path / "a") == a
    assert {c.expected for c in a} == {"human", "machine", "unknown"}
    for c in a:
        with wave.open(str(tmp_path / "a" / c.file), "rb") as w:
            assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (8000, 1, 2)
            assert w.getnframes() <= 12 * 8000
        assert all(0 <= t.start_ms < t.end_ms <= c.duration_ms for t in c.tones)
        if c.kind == "machine_beep":
            assert [t.kind for t in c.tones] == ["beep"] and 100 <= c.tones[0].end_ms - c.tones[0].start_ms <= 1500
    mtimes = {c.file: (tmp_path / "a" / c.file).stat().st_mtime_ns for c in a}
    assert generate(tmp_path / "a", count=20, seed=3) == a
    assert {c.file: (tmp_path / "a" / c.file).stat().st_mtime_ns for c in a} == mtimes  # not made again
    b = generate(tmp_path / "b", count=4, seed=3)
    assert b == a[:4]
    assert all((tmp_path / "a" / c.file).read_bytes() == (tmp_path / "b" / c.file).read_bytes() for c in b)


@needs_tools
def test_the_real_vad_and_the_decider_get_at_least_10_of_12_corpus_answers_right(tmp_path: Path) -> None:
    from bench.amd_corpus import generate
    from workers.vad import Vad

    cases = generate(tmp_path, count=12, seed=1, kinds=("human", "machine", "machine_beep", "silence"))
    assert {c.expected for c in cases} == {"human", "machine"}
    assert {c.kind for c in cases} == {"human", "machine", "machine_beep", "silence"}
    right = []
    for case in cases:
        with wave.open(str(tmp_path / case.file), "rb") as w:
            pcm = w.readframes(w.getnframes())
        vad = Vad(8000)  # webrtcvad takes 8 kHz as it is
        amd = AmdDecider()
        fb = vad.frame_bytes
        for k in range(len(pcm) // fb):
            # a fresh webrtcvad flags ~100 ms of any noise onset: hold its first frames, as the worker does
            voiced = vad.is_voiced(pcm[k * fb : (k + 1) * fb]) and k > 5
            if amd.on_frame(k * 20, voiced) is not None:
                break
        amd.on_end(len(pcm) // 16)
        assert amd.decision is not None
        right.append(amd.decision.result == case.expected)
    assert sum(right) >= 10, [(c.file, ok) for c, ok in zip(cases, right)]


@needs_tools
def test_the_evaluator_prints_a_confusion_table_and_decision_times(tmp_path: Path) -> None:
    from bench.amd_corpus import generate
    from bench.amd_eval import evaluate, report

    cases = generate(tmp_path, count=4, seed=1, kinds=("human", "silence"))
    calls: list[tuple[str, int]] = []

    class Detector:
        def __init__(self) -> None:
            self.fed = 0

        def feed(self, samples: npt.NDArray[np.int16]) -> list[object]:
            assert samples.dtype == np.int16 and samples.size == 160
            calls.append(("feed", self.fed))
            self.fed += 20
            return []

        def flush(self) -> list[object]:
            return []

        def is_tonal(self, offset_ms: int) -> bool:
            assert offset_ms < self.fed  # asked only about audio it was fed
            calls.append(("is_tonal", offset_ms))
            return False

    results = evaluate(cases, tmp_path, tone_detector_factory=Detector)  # type: ignore[arg-type]
    text = report(results)
    assert "expected \\ got" in text and "p50" in text and "tone classification" in text
    assert calls.count(("feed", 0)) == len(cases)  # one detector per case, fed from the answer on
    assert ("is_tonal", 0) in calls and ("is_tonal", 20) in calls
    default = evaluate(cases[:1], tmp_path)  # the real detector by default
    assert default[0].tones is not None
    assert evaluate(cases[:1], tmp_path, tone_detector_factory=None)[0].tones is None
