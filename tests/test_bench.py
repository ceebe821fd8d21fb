"""The bench harness: its statistics, its call scripts, its pairing of answers with
utterances, a real short run against a real node, a ramp, and the vosk sender.

The integration tests start a real ``farm up`` (real model) and run the bench's own
command line against it; they are short (a few calls, a few seconds) so the module
stays under about 90 s.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench import cli
from bench.audio import CORPORA, DATA, CallScript, Utterance, build_script, sentence, speech_span
from bench.measure import call_samples, finals_per_utterance, utterance_cer, verdict
from bench.run import BenchConfig, Slo, capacity_at, check_slo, run_step
from bench.senders import VOSK_EOF, VOSK_RESET, CallRecord, Observation, prompt_schedule
from bench.stats import percentile, summarize

from .conftest import Node, start_node


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# -- statistics ----------------------------------------------------------------------


class TestPercentiles:
    def test_percentile_interpolates_like_numpy(self) -> None:
        rng = random.Random(3)
        values = [rng.expovariate(0.01) for _ in range(101)]
        for q in (0, 50, 95, 99, 100):
            assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))

    def test_percentile_of_known_values(self) -> None:
        assert percentile([1, 2, 3, 4], 50) == 2.5
        assert percentile([5], 95) == 5
        assert percentile([3, 1, 2], 100) == 3
        assert math.isnan(percentile([], 50))
        with pytest.raises(ValueError):
            percentile([1], 101)

    def test_summary_has_count_and_quantiles(self) -> None:
        s = summarize(list(range(1, 101)))
        assert s == {"n": 100, "p50": 50.5, "p95": 95.0, "p99": 99.0, "max": 100}

    def test_slo_breaks_on_each_term(self) -> None:
        step: dict[str, Any] = {
            "calls": 2,
            "stages": {"eos_final": summarize([300, 350]), "onset_speech_start": summarize([90, 100])},
            "lost_messages": 0,
            "overrun_bytes": 0,
            "real_time_calls": 2,
        }
        assert check_slo(step, Slo())["held"]
        assert not check_slo(step, Slo(final_p95_ms=340))["held"]
        assert not check_slo(step, Slo(onset_p95_ms=95))["held"]
        assert not check_slo({**step, "lost_messages": 1}, Slo())["held"]
        assert not check_slo({**step, "real_time_calls": 1}, Slo())["held"]
        assert check_slo({**step, "real_time_calls": 1}, Slo(real_time=False))["held"]
        assert not check_slo({**step, "stages": {}}, Slo())["held"], "no final at all cannot hold"

    def test_capacity_under_another_slo_is_the_last_step_before_the_first_break(self) -> None:
        def step(calls: int, final_ms: float, real_time: int) -> dict[str, Any]:
            return {
                "calls": calls,
                "stages": {"eos_final": summarize([final_ms])},
                "lost_messages": 0,
                "overrun_bytes": 0,
                "real_time_calls": real_time,
            }

        steps = [step(2, 300, 2), step(4, 500, 4), step(6, 300, 6), step(8, 2000, 7)]
        assert capacity_at(steps, Slo()) == 2  # 4 broke; 6 holding again does not count
        assert capacity_at(steps, Slo(final_p95_ms=1000)) == 6
        assert capacity_at(steps, Slo(final_p95_ms=math.inf, real_time=False)) == 8
        assert capacity_at([step(2, 500, 2)], Slo()) == 0


# -- call scripts --------------------------------------------------------------------


class TestCallScripts:
    def test_sentence_is_trimmed_to_its_speech(self) -> None:
        s = sentence("ko_02", 16000)
        a, b = speech_span(s, 16000)
        assert a == 0 and b == len(s) - len(s) % 160
        assert 1.5 < len(s) / 16000 < 2.6  # the file is 2.6 s with leading and trailing silence

    @pytest.mark.parametrize("rate", [8000, 16000])
    def test_script_has_the_asked_length_rate_and_speech_fraction(self, rate: int) -> None:
        s = build_script("c", rate=rate, duration_s=120, speech_fraction=0.4, rng=random.Random(5))
        assert s.rate == rate and len(s.pcm) == 120 * rate * 2
        assert 0.3 < s.speech_ms / s.duration_ms < 0.5

    def test_utterance_spans_are_speech_and_pauses_are_line_noise(self) -> None:
        s = build_script("c", rate=8000, duration_s=40, speech_fraction=0.4, rng=random.Random(7))
        pcm = np.frombuffer(s.pcm, dtype="<i2").astype(np.float64)
        ms = 8
        prev_end = 0
        for u in s.utterances:
            assert 0 <= u.start_ms < u.end_ms <= s.duration_ms
            gap = pcm[prev_end * ms : u.start_ms * ms]
            if len(gap):
                assert np.abs(gap).max() <= 70  # noise floor only: nobody speaks during the prompt
            if u.complete:
                assert np.sqrt(np.mean(pcm[u.start_ms * ms : u.end_ms * ms] ** 2)) > 1000
            prev_end = u.end_ms
        assert all(u.complete for u in s.utterances[1:-1])
        assert s.utterances[1].start_ms - s.utterances[0].end_ms >= 600  # longer than the VAD hangover

    def test_calls_start_at_different_points_of_their_script(self) -> None:
        rng = random.Random(1)
        a = build_script("a", rate=8000, duration_s=20, speech_fraction=0.4, rng=rng)
        b = build_script("b", rate=8000, duration_s=20, speech_fraction=0.4, rng=rng)
        assert [u.start_ms for u in a.utterances] != [u.start_ms for u in b.utterances]
        again = build_script("a", rate=8000, duration_s=20, speech_fraction=0.4, rng=random.Random(1))
        assert again == a, "the seed makes a run repeatable"

    @pytest.mark.parametrize("rate", [8000, 16000])
    def test_every_corpus_sentence_is_its_spoken_part_pauses_inside_kept(self, rate: int) -> None:
        pauses = json.loads((DATA / "pauses.json").read_text())
        for name in CORPORA["mixed"]:
            s = sentence(name, rate)
            assert 0.5 < len(s) / rate < 8, name
            if name.startswith("pause_"):
                a, b = pauses[f"{name}.wav"]["phrases"][0][0], pauses[f"{name}.wav"]["phrases"][-1][1]
                assert abs(len(s) * 1000 / rate - (b - a)) <= 20, name  # first to last phrase, pauses in
        assert set(CORPORA["mixed"]) == {*CORPORA["espeak"], *CORPORA["pauses"], *CORPORA["recorded"]}

    def test_a_script_draws_from_the_corpus_it_is_given(self) -> None:
        s = build_script(
            "c", rate=8000, duration_s=60, speech_fraction=0.5, rng=random.Random(2), sentences=CORPORA["pauses"]
        )
        assert {u.source for u in s.utterances} <= set(CORPORA["pauses"])

    def test_speech_fraction_must_be_a_fraction(self) -> None:
        with pytest.raises(ValueError):
            build_script("c", rate=8000, duration_s=5, speech_fraction=1.5, rng=random.Random(1))

    def test_a_silent_caller_is_line_noise_only(self) -> None:
        s = build_script("c", rate=8000, duration_s=5, speech_fraction=0, rng=random.Random(1))
        pcm = np.frombuffer(s.pcm, dtype="<i2")
        assert s.utterances == () and len(pcm) == 5 * 8000 and 0 < np.abs(pcm).max() <= 70


# -- pairing answers with utterances --------------------------------------------------


def _record(utterances: list[Utterance], observations: list[Observation]) -> CallRecord:
    script = CallScript("c", 8000, b"\0\0" * 8000 * 10, tuple(utterances))
    r = CallRecord(script, "amigniter", 20)
    r.send_ns = [1_000_000_000 + i * 20_000_000 for i in range(500)]  # frame i left at 1 s + 20 ms * i
    r.messages_sent = r.messages_received = 500
    r.end_ns, r.done_ns = r.send_ns[-1], r.send_ns[-1] + 400_000_000
    r.observations = observations
    return r


def _at(ms: float) -> int:
    return 1_000_000_000 + int(ms * 1_000_000)


class TestPairing:
    def test_latencies_are_measured_from_the_scripts_own_speech_times(self) -> None:
        u1, u2 = Utterance(1000, 3000, "ko_01"), Utterance(5000, 7000, "ko_02")
        obs = [
            Observation(
                "speech_start",
                _at(1080),
                1000,
                stamps={"recv": 1_000_000, "commit": 2_000_000, "read": 62_000_000, "vad": 63_000_000},
            ),
            Observation("partial", _at(1500), 1200, "안녕"),
            Observation("final", _at(2000), 1900, "안녕", reason="endpoint"),  # mid-utterance: not the answer
            Observation(
                "final", _at(3380), 2980, "하세요", reason="vad", stamps={"recv": _at(2990), "publish": _at(3379)}
            ),
            Observation("speech_start", _at(4500), 4500),  # noise in the pause: belongs to no utterance
            Observation("speech_start", _at(5100), 5020),
            Observation("final", _at(7500), 6980, "네", reason="vad"),
        ]
        obs += [
            Observation("partial", _at(4990), text="하세요"),  # vosk-server repeating u1's last partial
            Observation("partial", _at(5050), text="하세요"),  # ... still, after u2 began
            Observation("partial", _at(5400), text="네"),
        ]
        s = call_samples(_record([u1, u2], obs))
        assert s["onset_speech_start"] == [80.0, 100.0]
        assert s["eos_final"] == [400.0, 520.0]  # from the frame with the last speech sample (2980 ms, 6980 ms)
        assert s["first_partial"] == [500.0, 400.0]
        assert s["eos_final_farm"] == [390.0]
        assert s["publish"] == [1.0]
        assert s["ingress"] == [1.0] and s["dispatch"] == [60.0] and s["vad"] == [1.0]

    def test_finals_per_sentence_count_splits_but_not_vosk_endpoints(self) -> None:
        u1, u2, u3 = Utterance(1000, 3000, "pause_01"), Utterance(5000, 7000, "ko_02"), Utterance(8000, 9000, "ko_03")
        obs = [
            Observation("final", _at(2000), 1100, "네", reason="vad"),  # split at a pause inside u1...
            Observation("final", _at(3400), 2100, "좋아요", reason="vad"),  # ... and its second half
            Observation("final", _at(6000), 5000, "안녕", reason="endpoint"),  # Vosk's own: not a split
            Observation("final", _at(7400), 5600, "하세요", reason="vad"),
            Observation("final", _at(7500), 6100, "", reason="vad"),  # empty: nothing said
        ]
        assert finals_per_utterance(_record([u1, u2, u3], obs)) == [("pause_01", 2), ("ko_02", 1), ("ko_03", 0)]

    def test_accuracy_joins_the_finals_of_a_sentence_and_skips_unknown_words(self) -> None:
        u1, u2, u3 = Utterance(1000, 3000, "ko_02"), Utterance(4000, 6000, "pause_01"), Utterance(7000, 8000, "x")
        obs = [
            Observation("final", _at(3400), 1100, "네 맞습니다 잠시만", reason="vad"),
            Observation("final", _at(3500), 2000, "기다려 주세요", reason="vad"),
            Observation("final", _at(6400), 4100, "네 좋아", reason="vad"),
            Observation("final", _at(8400), 7100, "hello", reason="vad"),
        ]
        got = utterance_cer(_record([u1, u2, u3], obs))
        assert got == [0.0, 1 / 4]  # "네좋아요": one character missing; "x" has no known words

    def test_incomplete_utterances_are_not_measured_and_a_final_answers_one_utterance(self) -> None:
        cut = Utterance(0, 800, "ko_01", complete=False)
        u1, u2 = Utterance(2000, 3000, "ko_02"), Utterance(4000, 5000, "ko_03")
        obs = [Observation("final", _at(900), 780, "x", reason="vad"), Observation("final", _at(5600), 4980, "y")]
        r = _record([cut, u1, u2], obs)
        s = call_samples(r)
        assert s["eos_final"] == [2620.0]  # u1 waited for the only final after it; u2 got none
        v = verdict(r, s, lag_limit_ms=1000)
        assert v.missed_finals == 1 and v.real_time

    def test_a_call_that_lost_audio_or_lagged_is_not_in_real_time(self) -> None:
        r = _record([Utterance(1000, 2000, "ko_01")], [])
        r.messages_received = 499
        assert not verdict(r, {}, 1000).real_time
        r = _record([Utterance(1000, 2000, "ko_01")], [])
        r.done_ns = r.end_ns + 1_500_000_000  # call_end 1.5 s after the last frame
        assert not verdict(r, {}, 1000).real_time
        r.done_ns = 0  # never ended
        assert verdict(r, {}, 1000).lag_ms == math.inf


# -- against a real node --------------------------------------------------------------


@pytest.fixture(scope="module")
def bench_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    n = start_node(tmp_path_factory.mktemp("bench-farm"))
    yield n
    n.stop()


def _bench(node: Node, out: Path, *extra: str) -> dict[str, Any]:
    argv = ["--target", node.url, "--events", node.events, "--farm-log", str(node.log_path)]
    argv += ["--out", str(out), "--no-progress", "--stagger", "0.5", "--seed", "2", *extra]
    assert cli.main(argv) == 0
    return json.loads(out.read_text())


def test_a_short_run_reports_every_stage_writes_json_and_a_plot(bench_node: Node, tmp_path: Path, capsys) -> None:
    doc = _bench(bench_node, tmp_path / "run.json", "--calls", "3", "--duration", "7", "--speech-fraction", "0.6")
    step = doc["result"]["steps"][0]
    stages = ("ingress", "dispatch", "vad", "asr", "publish", "eos_final_farm", "eos_final", "onset_speech_start")
    # (partials of a call whose recognition is behind are not published: first_partial is
    # there on an idle machine, maybe not on a busy one; its computation is checked above)
    for stage in (*stages, *(["first_partial"] if "first_partial" in step["stages"] else [])):
        assert step["stages"][stage]["n"] > 0, stage
        assert len(step["samples"][stage]) == step["stages"][stage]["n"]
        assert all(v >= 0 for v in step["samples"][stage]), stage
    # Causality, not speed: nothing is answered before the audio it answers was sent.
    assert step["stages"]["onset_speech_start"]["p50"] > 0 and step["stages"]["eos_final"]["p50"] > 0
    assert step["messages_sent"] == step["messages_received"] == 3 * 7 * 50
    assert step["lost_messages"] == 0
    _check_the_verdicts_add_up(step, calls=3)
    roles = step["procs"]["roles"]
    assert {"worker", "ingress", "broker", "supervisor"} <= set(roles)
    assert roles["worker"]["cpu_s"] > 0 and roles["worker"]["pss_mb_peak"] > 0
    png = tmp_path / "run-cdf.png"
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 10_000
    printed = capsys.readouterr().out
    assert "end of speech -> final" in printed and "onset -> speech_start" in printed and "worker-0" in printed


def _check_the_verdicts_add_up(step: dict[str, Any], calls: int) -> None:
    """What the bench computes from its per-call verdicts, whatever the machine's speed."""
    details = step["calls_detail"]
    assert len(details) == step["calls"] == calls
    assert step["real_time_calls"] == sum(d["real_time"] for d in details)
    assert step["worst_lag_ms"] == max(d["lag_ms"] for d in details) >= 0
    for d in details:
        # a call keeps real time exactly when it lagged within the limit and lost nothing
        ok = d["lag_ms"] <= 1000 and not d["lost_messages"] and not d["overrun_bytes"] and not d["errors"]
        assert d["real_time"] == ok, d
    assert step["missed_finals"] == sum(d["missed_finals"] for d in details) >= 0
    assert len(step["samples"]["eos_final"]) == sum(d["utterances"] for d in details) - step["missed_finals"]
    # the SLO verdict follows from the same numbers
    assert step["slo"]["held"] == (not step["slo"]["broken"])
    per = step["finals_per_sentence"]
    assert per["sentences"] == sum(d["utterances"] for d in details)
    assert per["split"] <= per["sentences"] and per["without_final"] <= per["sentences"]


def test_no_calls_measures_what_the_idle_server_costs(bench_node: Node, tmp_path: Path, capsys) -> None:
    doc = _bench(bench_node, tmp_path / "idle.json", "--calls", "0", "--duration", "2")
    step = doc["result"]["steps"][0]
    assert step["idle"] and step["calls"] == 0 and step["cores"] >= 0
    roles = step["procs"]["roles"]
    assert {"worker", "ingress", "broker", "supervisor"} <= set(roles)
    assert step["cores"] == pytest.approx(sum(r["cpu_s_per_call_s"] for r in roles.values()), abs=1e-3)
    assert "no calls for 2 s: the server used" in capsys.readouterr().out


def test_prompts_start_in_the_pause_and_the_caller_speaks_over_them() -> None:
    script = CallScript(
        "c",
        16000,
        b"",
        (
            Utterance(0, 1500, "ko_01", complete=False),  # cut by the call's start: no prompt
            Utterance(4000, 6000, "ko_02"),  # long pause: the prompt leads by 1 s
            Utterance(6900, 8000, "ko_03"),  # 900 ms pause: starts 600 ms after speech, 300 ms lead
            Utterance(8300, 9000, "ko_04"),  # 300 ms pause: no room for a prompt
        ),
    )
    assert prompt_schedule(script, 3000, 1000) == [(3000, 4000), (6600, 6900)]
    assert prompt_schedule(script, 1000, 1000) == [(6600, 6900)]  # all of it before the caller speaks


def test_a_socket_audio_run_measures_barge_in_at_freeswitch_and_in_the_farm(
    bench_node: Node, tmp_path: Path, capsys
) -> None:
    esl = f"127.0.0.1:{bench_node.esl_port}"
    doc = _bench(
        bench_node,
        tmp_path / "socket.json",
        *("--protocol", "socket_audio", "--esl", esl, "--commands", bench_node.commands, "--no-plot"),
        *("--calls", "2", "--duration", "8", "--speech-fraction", "0.5", "--prompt-ms", "2500"),
    )
    step = doc["result"]["steps"][0]
    assert step["rate"] == 16000 and not step["errors"]
    assert step["prompts"] >= 2 and step["flushes"] == step["prompts"]
    for stage in ("barge_in_flush", "barge_in_farm", "barge_in", "onset_speech_start", "eos_final", "ingress"):
        assert step["stages"][stage]["n"] > 0, stage
        assert all(v > 0 for v in step["samples"][stage]) or stage == "ingress", stage
    assert step["stages"]["barge_in_flush"]["n"] == step["prompts"]
    assert step["flush_idle"] == 0 and step["prompt_after_flush"] == 0 and step["playback_violations"] == []
    assert step["lost_messages"] == 0
    _check_the_verdicts_add_up(step, calls=2)
    printed = capsys.readouterr().out
    assert "barge-in: onset -> flush at FreeSWITCH" in printed and "flushes while idle 0" in printed


def test_a_ramp_stops_at_the_first_step_that_breaks_the_slo(bench_node: Node, tmp_path: Path) -> None:
    # An impossible SLO (p95 final within 1 ms): the first step breaks, capacity is 0.
    doc = _bench(
        bench_node,
        tmp_path / "ramp.json",
        "--ramp",
        "--ramp-calls",
        "1,2",
        "--duration",
        "5",
        "--speech-fraction",
        "0.6",
        "--slo-final-ms",
        "1",
        "--protocol",
        "sptmru",
    )
    result = doc["result"]
    assert result["capacity"] == 0
    assert [s["calls"] for s in result["steps"]] == [1], "the ramp must stop at the broken step"
    assert any("p95 final" in b for b in result["steps"][0]["slo"]["broken"])
    assert result["steps"][0]["messages_sent"] == 5 * 25  # sptmru: 40 ms bursts
    assert (tmp_path / "ramp-ramp.png").read_bytes()[:8] == PNG_MAGIC


def test_a_ramp_that_holds_reports_its_last_step(bench_node: Node, tmp_path: Path) -> None:
    doc = _bench(
        bench_node,
        tmp_path / "ramp.json",
        "--ramp",
        "--ramp-calls",
        "1",
        "--duration",
        "5",
        "--speech-fraction",
        "0.6",
        "--slo-final-ms",
        "5000",
        "--slo-onset-ms",
        "5000",
        "--no-plot",
    )
    assert doc["result"]["capacity"] == 1


# -- the vosk sender -----------------------------------------------------------------


class VoskStandIn:
    """A stand-in peer for vosk-server (alphacep/vosk-server websocket/asr_server.py), not
    vosk-server itself: the same message sequence without a model. A config text first;
    then one reply per message: ``{"partial": …}``, or ``{"text": …, "result": …}`` when
    its "endpointer" fires (here: ``ENDPOINT_CHUNKS`` quiet chunks after loud ones), a
    result for ``{"reset" : 1}``, and a last result for ``{"eof" : 1}``, then it closes."""

    ENDPOINT_CHUNKS = 15  # 300 ms of 20 ms chunks

    def __init__(self) -> None:
        self.configs: list[dict[str, Any]] = []
        self.texts: list[str] = []

    async def handler(self, ws: Any) -> None:
        loud_seen, quiet = False, 0
        async for message in ws:
            if isinstance(message, str):
                self.texts.append(message)
                if "config" in message:
                    self.configs.append(json.loads(message)["config"])
                    continue
                await ws.send(json.dumps({"text": "끝" if loud_seen else ""}))
                loud_seen = False
                if message == VOSK_EOF:
                    break
                continue
            level = np.abs(np.frombuffer(message, dtype="<i2")).max()
            if level > 1000:
                loud_seen, quiet = True, 0
                await ws.send(json.dumps({"partial": "안녕"}))
            elif loud_seen and (quiet := quiet + 1) >= self.ENDPOINT_CHUNKS:
                loud_seen = False
                await ws.send(json.dumps({"text": "안녕하세요", "result": [{"word": "안녕하세요", "conf": 1.0}]}))
            else:
                await ws.send(json.dumps({"partial": ""}))


async def _vosk_run(reset: bool) -> tuple[dict[str, Any], VoskStandIn]:
    from websockets.asyncio.server import serve

    peer = VoskStandIn()
    async with serve(peer.handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        cfg = BenchConfig(
            protocol="vosk",
            target=f"ws://127.0.0.1:{port}",
            duration_s=8,
            speech_fraction=0.6,
            seed=4,
            stagger_s=0.2,
            vosk_reset=reset,
            progress=False,
        )
        step = await run_step(cfg, 2)
    return step, peer


def test_vosk_sender_follows_vosk_servers_sequence_and_times_finals_client_side() -> None:
    step, peer = asyncio.run(_vosk_run(reset=False))
    assert peer.configs == [{"sample_rate": 8000}] * 2
    assert peer.texts.count(VOSK_EOF) == 2 and VOSK_RESET not in peer.texts
    assert step["messages_sent"] == step["messages_received"] == 2 * 8 * 50
    assert step["lost_messages"] == 0
    eos = step["samples"]["eos_final"]
    utterances = sum(d["utterances"] for d in step["calls_detail"])
    assert utterances > 0 and len(eos) == utterances
    # The stand-in answers after 15 quiet chunks, due 14 x 20 ms after the chunk with the last
    # speech; that chunk left at most the bench's own worst lateness after it was due (a
    # busy machine makes the answer later, or the sender catch up by that much, no more). A
    # sentence ending less than 300 ms before the call does is answered by the reply to eof.
    late = max(d["bench_late_ms"] for d in step["calls_detail"])
    assert all(v > 0 for v in eos), eos
    assert len([v for v in eos if v >= 280 - late]) >= len(eos) - 2, (eos, late)
    assert step["samples"]["first_partial"] and len(step["samples"]["reply_lag"]) >= step["messages_sent"]
    assert "onset_speech_start" not in step["stages"]  # vosk-server has no such event
    # its replies carry no audio offset: no final can be given to a sentence, none is called missing
    assert step["finals_per_sentence"]["mean"] is None and step["finals_per_sentence"]["without_final"] == 0
    assert step["cer"]["mean"] is None
    _check_the_verdicts_add_up(step, calls=2)


def test_vosk_sender_can_reset_at_each_end_of_speech() -> None:
    step, peer = asyncio.run(_vosk_run(reset=True))
    utterances = sum(d["utterances"] for d in step["calls_detail"])
    # one reset per measured utterance (those the call's end did not cut), and the
    # reset's reply is the final: every utterance is answered by one
    assert peer.texts.count(VOSK_RESET) >= utterances > 0
    assert len(step["samples"]["eos_final"]) == utterances
    assert all(v > 0 for v in step["samples"]["eos_final"])


def test_physical_limit_is_cores_over_rtf_times_speech_fraction() -> None:
    from bench.rtf import limits

    lim = limits(rtf_speech=0.2, rtf_silence=0.05, cores=2, speech_fraction=0.4)
    assert lim["gated_calls"] == 25.0  # 2 / (0.2 x 0.4)
    assert lim["ungated_calls"] == round(2 / (0.2 * 0.4 + 0.05 * 0.6), 1)


def test_cer_counts_edits_against_the_reference_without_spaces() -> None:
    from bench.stats import cer

    assert cer("네 맞습니다", "네 맞 습니다") == 0.0
    assert cer("네 맞습니까", "네 맞습니다") == 1 / 5
    assert cer("", "안녕") == 1.0 and cer("안녕하세요", "") == 5.0


def test_decoder_options_parse_and_refuse_unknown_ones() -> None:
    from bench.rtf import parse_decoder

    assert parse_decoder("beam=8,max-active=2000") == {"beam": 8.0, "max-active": 2000.0}
    assert parse_decoder("") == {}
    with pytest.raises(ValueError, match="decoder option 'speed=9'"):
        parse_decoder("speed=9")
