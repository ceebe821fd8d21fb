"""Per-call options for AMD, tones and intents (workers/analysis.py), and what a node
refuses to start with. End to end through a real node: tests/test_dialer.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from farm.config import Config
from farm.intents import IntentLibrary, IntentsError
from farm.protocol.call_stats import CallStats
from workers.amd import AmdConfig
from workers.analysis import TONE_BLOCK_MS, CallAnalysis, Options, node_amd_config, options_for


ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "deploy" / "intents" / "ko-example.toml"
NONE = IntentLibrary("")


def opts(
    metadata: dict[str, object], config: Config | None = None, library: IntentLibrary = NONE
) -> tuple[Options, list[str]]:
    config = config or Config()
    return options_for({"metadata": metadata}, config, library, node_amd_config(config))


class TestOptions:
    def test_nothing_asked_gives_tones_only(self) -> None:
        options, errors = opts({})
        assert (options.amd, options.tones, options.intents, errors) == (None, True, None, [])

    @pytest.mark.parametrize("raw", [True, "1", "true", " on ", "yes"])
    def test_amd_is_asked_for_in_json_in_a_url_query_or_a_channel_variable(self, raw: object) -> None:
        for key in ("amd", "farm_amd"):
            options, errors = opts({key: raw})
            assert options.amd == AmdConfig() and not errors

    def test_a_call_sends_its_own_amd_settings_over_the_nodes(self) -> None:
        config = Config(amd_params='{"greeting_ms": 1200, "max_words": 4}')
        options, _ = opts({"farm_amd": '{"greeting": 1000}'}, config)
        assert options.amd is not None and (options.amd.greeting_ms, options.amd.max_words) == (1000, 4)

    def test_amd_all_is_every_call_unless_one_says_false(self) -> None:
        config = Config(amd="all")
        assert opts({}, config)[0].amd is not None
        assert opts({"amd": False}, config)[0].amd is None
        assert opts({"amd": "0"}, config)[0].amd is None

    @pytest.mark.parametrize(
        ("metadata", "message"),
        [
            ({"amd": "maybe"}, "amd: must be true, false or an object, got 'maybe'"),
            ({"amd": {"greeting_ms": -1}}, "amd: greeting_ms must be >= 1, got -1"),
            ({"amd": {"loudness": 3}}, "amd: unknown amd setting 'loudness'"),
            ({"farm_amd": "{not json"}, "amd: not a JSON object"),
            ({"tones": "loud"}, "tones: must be true or false, got 'loud'"),
            ({"intents": 7}, "intents: must be a set's name, an object or false, got '7'"),
            ({"intents": {"yes": {"patterns": ["(a+)+"]}}}, "intents: "),
            ({"intents": "sales"}, "intents: no intent set named 'sales' (known: none"),
        ],
    )
    def test_a_bad_option_is_an_error_and_the_call_goes_on_without_that_part(
        self, metadata: dict[str, object], message: str
    ) -> None:
        options, errors = opts(metadata, Config(amd="all"), IntentLibrary(str(EXAMPLE)))
        assert len(errors) == 1 and errors[0].startswith(message), errors
        part = next(iter(metadata)).removeprefix("farm_")
        if part == "amd":
            assert options.amd is None  # not the node's settings either
        if part == "intents":
            assert options.intents is None

    def test_tones_may_be_turned_off_but_amd_keeps_its_own(self) -> None:
        assert opts({"tones": False})[0].tones is False
        assert opts({"tones": False, "amd": True})[0].tones is True  # AMD listens for beeps

    def test_intents_come_from_the_node_file_a_named_set_or_the_call(self, tmp_path: Path) -> None:
        assert opts({}, library=IntentLibrary(str(EXAMPLE)))[0].intents is not None
        (tmp_path / "default.toml").write_text(EXAMPLE.read_text())
        (tmp_path / "short.json").write_text('{"intents": {"ok": {"phrases": ["좋아"]}}}')
        library = IntentLibrary(str(tmp_path))
        assert set(library.sets) == {"default", "short"}
        default = opts({}, library=library)[0].intents
        assert default is not None and "hold_on" in default.names
        short = opts({"intents": "short"}, library=library)[0].intents
        assert short is not None and short.names == ("ok",)
        inline = opts({"intents": {"later": {"phrases": ["나중에"]}}}, library=library)[0].intents
        assert inline is not None and inline.names == ("later",)
        assert opts({"intents": False}, library=library)[0].intents is None


class TestNodeRefuses:
    @pytest.mark.parametrize(
        ("flag", "value", "message"),
        [
            ("--amd-params", '{"greeting_ms": 0}', "amd_params: greeting_ms must be >= 1, got 0"),
            ("--amd-params", "[1]", "amd_params must be a JSON object"),
            ("--intents", "/nonexistent/intents.toml", "No such file"),
            ("--amd", "some", "invalid choice"),
        ],
    )
    def test_farm_up_refuses_bad_dialer_settings_before_starting_anything(
        self, flag: str, value: str, message: str
    ) -> None:
        done = subprocess.run(
            [sys.executable, "-m", "farm.cli", "up", flag, value], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 2 and message in done.stderr, done.stderr

    def test_a_malformed_intents_file_names_its_problem(self, tmp_path: Path) -> None:
        bad = tmp_path / "bad.toml"
        bad.write_text('[intents.yes]\nphrases = ["네"]\ncolour = "red"\n')
        with pytest.raises(IntentsError, match="colour"):
            IntentLibrary(str(bad))


class TestCallAnalysis:
    @pytest.mark.parametrize("block_ms", [20, TONE_BLOCK_MS])
    def test_a_tone_is_not_a_word_of_the_greeting(self, block_ms: int) -> None:
        """A busy signal heard by a VAD that voices it: without the tone detector's view
        the cadence would count its bursts as words (a machine, max_words); with it they
        are neither voice nor silence and the tone decides."""
        rate = 8000
        t = np.arange(rate // 2) / rate
        tone = (8000 * np.sin(2 * np.pi * 480 * t) + 8000 * np.sin(2 * np.pi * 620 * t)).astype("<i2")
        gap = np.zeros(rate // 2, dtype="<i2")
        audio = np.concatenate([gap[: rate * 3 // 10], tone, gap, tone, gap, tone, gap, tone, gap])
        analysis = CallAnalysis(rate, Options(amd=AmdConfig()), 0, resumed=False, tone_block_ms=block_ms)
        found = []
        for i in range(0, len(audio), 160):  # 20 ms at a time, audio before its VAD frame
            found += analysis.on_audio(audio[i : i + 160])
            voiced = bool(np.abs(audio[i : i + 160]).max() > 1000)
            found += analysis.on_frame(i * 1000 // rate, voiced)
        found += analysis.on_end()
        kinds = [(t, d.get("kind") or d.get("result")) for t, _, d in found]
        assert ("tone", "busy") in kinds
        [amd] = [d for t, _, d in found if t == "amd"]
        assert amd["reason"] == "busy" and amd["result"] == "unknown", amd

    def test_tones_fed_in_blocks_give_the_same_beep_and_decision_at_most_a_block_later(self) -> None:
        """The tone detector is fed TONE_BLOCK_MS at a time (its cost is per feed): a
        machine's greeting and its beep give the same events as fed 20 ms at a time, the
        same beep times; each comes at most one block of audio later."""
        rate = 8000
        rng = np.random.default_rng(7)
        greeting = (3000 * rng.standard_normal(rate * 3)).astype("<i2")  # voiced, not tonal
        t = np.arange(rate * 45 // 100) / rate
        beep = (9000 * np.sin(2 * np.pi * 1000 * t)).astype("<i2")
        quiet = np.zeros(rate // 2, dtype="<i2")
        audio = np.concatenate([quiet, greeting, quiet[: rate // 5], beep, quiet, quiet])

        def run(block_ms: int) -> list[tuple[str, int, dict[str, Any], int]]:
            analysis = CallAnalysis(rate, Options(amd=AmdConfig(total_analysis_ms=10000)), 0, False, tone_block_ms=block_ms)
            got = []
            for i in range(0, len(audio), 160):
                fed_ms = (i + 160) * 1000 // rate  # audio in when it came
                chunk = audio[i : i + 160]
                for kind, offset, data in analysis.on_audio(chunk) + analysis.on_frame(
                    i * 1000 // rate, bool(np.abs(chunk).max() > 1000)
                ):
                    got.append((kind, offset, data, fed_ms))
            return got

        frame_by_frame, blocks = run(20), run(TONE_BLOCK_MS)
        [beep_20] = [g for g in frame_by_frame if g[0] == "beep"]
        [beep_100] = [g for g in blocks if g[0] == "beep"]
        assert beep_100[2] == beep_20[2]  # the same beep: start, end, frequency, level
        assert 0 <= beep_100[3] - beep_20[3] <= TONE_BLOCK_MS
        [amd_20] = [g for g in frame_by_frame if g[0] == "amd"]
        [amd_100] = [g for g in blocks if g[0] == "amd"]
        assert (amd_100[2]["result"], amd_100[2]["reason"]) == (amd_20[2]["result"], amd_20[2]["reason"])
        assert 0 <= amd_100[2]["decision_ms"] - amd_20[2]["decision_ms"] <= TONE_BLOCK_MS

    def test_a_resumed_call_gets_no_amd_but_keeps_tones_and_intents(self) -> None:
        options = Options(amd=AmdConfig(), intents=IntentLibrary(str(EXAMPLE)).default)
        analysis = CallAnalysis(8000, options, 4000, resumed=True)
        assert analysis.amd is None and analysis.tones is not None and not analysis.deciding
        [(kind, _, data)] = analysis.on_transcript(5000, "잠시 만 기다려 주세요", final=True)
        assert kind == "intent" and data["intent"] == "hold_on"


class TestCallStats:
    def test_the_figures_of_a_call_come_from_its_events(self) -> None:
        stats = CallStats()
        for type, offset, data in [
            ("speech_start", 1200, {}),
            ("flush", 1300, {}),
            ("speech_end", 2000, {"duration_ms": 800}),
            ("amd", 2800, {"result": "human"}),
            ("speech_start", 5000, {}),
            ("intent", 5600, {"intent": "yes"}),
            ("speech_end", 5600, {"duration_ms": 600}),
        ]:
            stats.observe(type, 0, offset, data)
        stats.observe("speech_start", 1, 9000, {})  # the bot's channel is not the caller
        stats.played(2000)
        assert stats.summary(6000) == {
            "from_ms": 0,
            "first_speech_ms": 1200,
            "talk_ms": 1400,
            "utterances": 2,
            "longest_silence_ms": 3000,
            "playback_ms": 2000,
            "talk_to_playback": 0.7,
            "barge_ins": 1,
            "amd": "human",
            "intents": ["yes"],
        }
        assert CallStats(from_ms=3000).summary(10_000)["longest_silence_ms"] == 7000  # never spoke
