"""What the soak (bench/soak.py) concludes from its samples: flat, ended, nothing left."""

from __future__ import annotations

from typing import Any

from bench.soak import FLAT, soak_report, verdict


def _sample(t: float, workers_pss: float, fds: int = 30, rings: int = 3) -> dict[str, Any]:
    roles = {"workers": {"rss_mb": workers_pss, "pss_mb": workers_pss, "fds": fds, "procs": 2},
             "ingress": {"rss_mb": 40.0, "pss_mb": 32.0, "fds": fds, "procs": 1}}
    return {"t": t, "roles": roles, "rings": rings}


def _result(pss: list[float], *, end_fds: int = 20, end_rings: int = 0, no_call_end: int = 0) -> dict[str, Any]:
    samples = [_sample(0, 900, fds=20, rings=0)]
    samples += [_sample(30 * (i + 1), p) for i, p in enumerate(pss)]
    samples.append(_sample(30 * (len(pss) + 1), pss[-1], fds=end_fds, rings=end_rings))
    wave = {"calls": 8, "refused": 0, "no_call_end": no_call_end, "lost_messages": 0, "worst_lag_ms": 300,
            "eos_final_p95_ms": 480.0}
    return {"calls": 8, "seconds": 30 * len(pss), "sample_s": 30, "waves": [wave, dict(wave)], "samples": samples}


WARM_THEN_FLAT = [950, 1100, 1200, 1240, 1250, 1245, 1255, 1250, 1248, 1252, 1251, 1249]


def test_memory_that_settles_after_the_warm_up_is_flat() -> None:
    v = verdict(_result(WARM_THEN_FLAT))
    assert v["flat"] and v["ok"] and v["calls"] == 16
    assert abs(v["pss_growth_after_warmup"]["workers"]) < 0.01
    assert v["fds_left"] == {"workers": 0, "ingress": 0}


def test_memory_that_keeps_growing_is_not() -> None:
    growing = [1000 + 40 * i for i in range(12)]  # +440 MB over the last two thirds
    v = verdict(_result(growing))
    assert not v["flat"] and not v["ok"]
    assert v["pss_growth_after_warmup"]["workers"] > FLAT


def test_a_call_without_call_end_a_ring_or_fds_left_fail_the_soak() -> None:
    assert not verdict(_result(WARM_THEN_FLAT, no_call_end=1))["ok"]
    assert not verdict(_result(WARM_THEN_FLAT, end_rings=1))["ok"]
    v = verdict(_result(WARM_THEN_FLAT, end_fds=25))
    assert v["fds_left"]["workers"] == 5 and not v["ok"]
    assert verdict(_result(WARM_THEN_FLAT, end_fds=21))["ok"]  # a reconnecting socket's slack


def test_the_report_shows_the_samples_and_the_verdict() -> None:
    result = _result(WARM_THEN_FLAT)
    result["verdict"] = verdict(result)
    text = soak_report(result)
    assert "| 0 | 32 | 20 | 900 | 20 | 0 |" in text  # idle before the calls: ingress then workers
    assert "workers: PSS" in text and "verdict: ok" in text
