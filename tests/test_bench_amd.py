"""``farm bench --amd`` (bench/amd_live.py): a short real run of the AMD corpus through a
real farm, and the intent stages of bench/measure.py.

What is checked is what the bench computes (every case has a row, the tables add up,
the JSON is written, on/off costs are there), not the machine's speed; the accuracy
only for sanity.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench import cli
from bench.audio import CallScript
from bench.measure import call_samples
from bench.senders import CallRecord, Observation

from .conftest import Node, start_node


CASES, CONCURRENT = 4, 4  # one round per pass: the suite has 15 minutes in all


@pytest.fixture(scope="module")
def amd_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    n = start_node(tmp_path_factory.mktemp("amd-farm"))
    yield n
    n.stop()


def test_a_short_live_amd_run_scores_every_case_and_writes_json(
    amd_node: Node, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "amd.json"
    argv = ["--amd", str(tmp_path / "corpus"), "--count", str(CASES), "--calls", str(CONCURRENT)]
    argv += ["--target", amd_node.url, "--events", amd_node.events, "--farm-log", str(amd_node.log_path)]
    argv += ["--cost", "--micro", "--json", str(out), "--no-progress"]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    doc = json.loads(out.read_text())

    rows = doc["cases"]
    assert len(rows) == CASES and len({r["file"] for r in rows}) == CASES
    assert all(not r["errors"] and not r["refused"] for r in rows)  # admission is off on this node
    # the confusion table's rows add up to the cases
    table = [line.split() for line in text.split("correct:")[0].splitlines() if line.split()[:1]]
    totals = [int(cells[-1]) for cells in table if cells[0] in ("human", "machine", "unknown")]
    assert sum(totals) == CASES
    right = sum(r["correct"] for r in rows)
    assert f"correct: {right}/{CASES}" in text and right >= CASES // 2
    for r in rows:
        assert r["amd_events"] <= 1  # one decision per call
        assert (r["got"] == "none") == (r["decision_ms"] is None)
        if r["stats"]["from_ms"] == 0:  # call_end's stats agree (a call moved to another worker counts from there)
            assert r["stats"]["amd"] == (None if r["got"] == "none" else r["got"])
    for line in text.splitlines():
        if "decided right" in line and line.split()[-3] != "0":
            p50, p95 = (int(x) for x in line.split()[-2:])
            assert p50 <= p95
    # the on/off pair: both runs watched the workers
    assert doc["run"]["procs"]["roles"]["worker"]["cpu_s_per_call_s"] > 0
    assert doc["off"]["procs"]["roles"]["worker"]["cpu_s_per_call_s"] > 0
    assert doc["off"]["call_seconds"] == doc["run"]["call_seconds"] > 0
    assert "cost, workers' CPU s per call-second" in text
    assert doc["micro"]["amd_tones_ms_per_s"] > 0 and doc["micro"]["tones_ms_per_s"] > 0


def _obs(kind: str, got_ms: int, stamps: dict[str, int], **data: object) -> Observation:
    return Observation(kind, got_ms * 1_000_000, 0, stamps={k: v * 1_000_000 for k, v in stamps.items()}, data=data)


def test_intent_latency_is_measured_from_the_end_of_speech_and_early_ones_against_their_final() -> None:
    record = CallRecord(CallScript("c", 8000, b"\0" * 16000, ()), "amigniter")
    final = _obs("final", 1500, {"recv": 1000, "commit": 900, "asr": 1400, "publish": 1490})
    final.reason = "vad"
    endpoint = _obs("final", 3500, {"recv": 3000, "commit": 3000, "asr": 3400, "publish": 3490})
    endpoint.reason = "endpoint"
    record.observations = [final, endpoint]
    record.dialer = [
        _obs("intent", 1200, {"recv": 1100, "asr": 1150, "publish": 1190}, early=True),  # 300 ms before its final
        _obs("intent", 1495, {"recv": 1000, "asr": 1400, "publish": 1492}, early=False),  # the final's stamps
        _obs("intent", 3495, {"recv": 3000, "asr": 3400, "publish": 3492}, early=False),  # endpoint: no eos
    ]
    samples = call_samples(record)
    assert samples["early_intent_lead"] == [300.0]
    assert samples["eos_intent_farm"] == [492.0]
