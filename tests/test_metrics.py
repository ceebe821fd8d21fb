"""``/metrics`` through a real Prometheus, and the Grafana dashboard against a real scrape.

A node takes a few calls of committed speech; a Prometheus of our own (Debian's
``prometheus`` binary, on a free loopback port, with a temporary config and TSDB)
scrapes it every second, and the tests ask Prometheus's HTTP API what it stored. The
dashboard test reads every PromQL expression of deploy/grafana/farm.json, checks that
Prometheus accepts it, and that every metric it names is in the node's scrape.

Prometheus is not optional here: .ci/run installs it, so a machine without it fails.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from farm.broker import wire
from farm.ingress.metrics import END_UNKNOWN, Metrics
from farm.protocol.events import END_REASONS, Event
from farm.protocol.latency import LATENCY_STAGES

from .conftest import DATA, MS, Node, free_port, run_call, start_node


DASHBOARD = Path(__file__).parent.parent / "deploy" / "grafana" / "farm.json"
# Stages every audio_stream call with speech passes (barge-in needs playback: not here).
CALL_STAGES = ("ingress", "dispatch", "vad", "asr", "publish", "end_of_speech_to_final")


def http_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        return str(r.read().decode())


def wait_for(what: str, check: Any, timeout: float = 120_000 * MS) -> Any:
    """Poll ``check()`` until it returns something truthy; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except OSError as exc:  # not listening yet
            last = exc
        else:
            if last:
                return last
        time.sleep(0.5)
    pytest.fail(f"{what}: not within {timeout:.0f} s (last: {last!r})")


# -- a Prometheus of our own ---------------------------------------------------------------


@dataclass
class Prometheus:
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    def query(self, promql: str) -> dict[str, Any]:
        """The answer of /api/v1/query (instant query, now), whatever its status."""
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                answer: dict[str, Any] = json.load(r)
        except urllib.error.HTTPError as exc:  # 400 for a bad expression: the body says why
            answer = json.load(exc)
        return answer

    def value(self, promql: str) -> float | None:
        """The single value of a query whose answer is one series, or None while it has none."""
        answer = self.query(promql)
        assert answer["status"] == "success", (promql, answer)
        result = answer["data"]["result"]
        if answer["data"]["resultType"] == "scalar":
            return float(result[1])
        assert len(result) <= 1, (promql, result)
        return float(result[0]["value"][1]) if result else None


def _prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found is None:
        # Not a skip: CI installs it (.ci/run), and a machine without it must say so.
        pytest.fail("the prometheus binary is not installed: apt-get install prometheus (as .ci/run does)")
    return found


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """A node that has served a short load: three calls of speech at once, in real time."""
    node = start_node(tmp_path_factory.mktemp("farm"), workers=2)
    try:

        async def calls() -> list[Any]:
            wavs = ("ko_01.wav", "ko_02.wav", "pause_01.wav")
            return await asyncio.gather(*(run_call(node, DATA / w, timeout=180_000 * MS) for w in wavs))

        runs = asyncio.run(calls())
        assert all(run.of("final") for run in runs), [run.events for run in runs]
        yield node
    finally:
        assert node.stop() == 0


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory, loaded: Node) -> Iterator[Prometheus]:
    """Prometheus scraping ``loaded`` every second; stopped (and its TSDB gone) at the end."""
    binary = _prometheus_binary()
    tmp = tmp_path_factory.mktemp("prometheus")
    config = tmp / "prometheus.yml"
    config.write_text(
        "global:\n"
        "  scrape_interval: 1s\n"
        "  scrape_timeout: 1s\n"
        "  evaluation_interval: 1s\n"
        "scrape_configs:\n"
        "  - job_name: farm\n"
        "    metrics_path: /metrics\n"
        "    static_configs:\n"
        f"      - targets: ['127.0.0.1:{loaded.port}']\n"
    )
    port = free_port()
    log_path = tmp / "prometheus.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=tmp,
        )
    prom = Prometheus(proc, port, log_path)
    try:
        wait_for(
            "prometheus ready",
            lambda: proc.poll() is None and "Ready" in http_text(f"http://127.0.0.1:{port}/-/ready"),
        )
        yield prom
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30_000 * MS)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        assert proc.returncode is not None


# -- the tests -------------------------------------------------------------------------------


def test_prometheus_scrapes_the_stage_histograms_of_a_node_under_load(prometheus: Prometheus) -> None:
    # The target is up and has been scraped since the calls ended.
    wait_for("farm target up", lambda: prometheus.value('up{job="farm"}') == 1)
    eos = 'farm_stage_latency_seconds_count{job="farm",stage="end_of_speech_to_final"}'
    wait_for("end of speech -> final counted", lambda: (prometheus.value(eos) or 0) > 0)
    for stage in CALL_STAGES:
        count = prometheus.value(f'farm_stage_latency_seconds_count{{job="farm",stage="{stage}"}}')
        assert count is not None and count > 0, stage
    # Stages that did not happen are exported too, at 0: their panels show 0, not "no data".
    assert prometheus.value('farm_stage_latency_seconds_count{job="farm",stage="barge_in"}') == 0
    p95 = prometheus.value(
        'histogram_quantile(0.95, sum by (le) (farm_stage_latency_seconds_bucket{job="farm",'
        'stage="end_of_speech_to_final"}))'
    )
    assert p95 is not None and math.isfinite(p95) and p95 > 0
    # Figures from the other processes arrive too: the workers' (through the broker) and the broker's.
    assert (prometheus.value('sum(farm_worker_events_published_total{job="farm"})') or 0) > 0
    assert prometheus.value('count(farm_worker_rss_bytes{job="farm"} > 0)') == 2
    assert prometheus.value('farm_workers_live{job="farm"}') == 2
    assert prometheus.value('farm_broker_up{job="farm"}') == 1
    assert (prometheus.value('farm_calls_total{job="farm"}') or 0) >= 3
    assert (prometheus.value('sum(farm_events_total{job="farm",type="final"})') or 0) >= 3
    # Each call's call_end, by its reason: the three calls hung up (closed their WebSockets).
    ended = 'farm_calls_ended_total{job="farm",reason="hangup"}'
    wait_for("call ends counted", lambda: (prometheus.value(ended) or 0) >= 3)
    assert prometheus.value('farm_calls_ended_total{job="farm",reason="error"}') == 0


# Words of PromQL that are not metric names.
_KEYWORDS = {
    *("and", "or", "unless", "bool", "offset", "inf", "nan"),
    *("by", "without", "on", "ignoring", "group_left", "group_right"),
}


def promql_metric_names(expr: str) -> set[str]:
    """The metric names an expression selects: identifiers that are not functions,
    aggregations, keywords, label names or Grafana variables."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings: label values, regexes
    e = re.sub(r"\{[^}]*\}", " ", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", " ", e)  # ranges, $__rate_interval
    e = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)  # label lists
    e = re.sub(r"\$\w+", " ", e)  # Grafana variables elsewhere
    names = set()
    for m in re.finditer(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*", e):
        if e[m.end() :].lstrip().startswith("(") or m.group().lower() in _KEYWORDS:
            continue  # a function or an aggregation, or a keyword
        names.add(m.group())
    return names


def test_promql_metric_names_finds_the_metrics_and_nothing_else() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, stage) (rate(farm_x_bucket{instance=~"$instance",stage="a b"}'
        "[$__rate_interval]))) / on (instance) group_left sum without (worker) (farm_y) > bool 1e3 "
        "unless farm_z offset 5m + Inf"
    )
    assert promql_metric_names(expr) == {"farm_x_bucket", "farm_y", "farm_z"}


def _dashboard_expressions() -> list[tuple[str, str]]:
    """(panel title, expression) of every target of every panel, rows' panels included,
    and the metrics the dashboard's variables query."""
    board = json.loads(DASHBOARD.read_text())
    found: list[tuple[str, str]] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            found.extend((panel["title"], t["expr"]) for t in panel.get("targets", []) if t.get("expr"))
            walk(panel.get("panels", []))

    walk(board["panels"])
    for var in board.get("templating", {}).get("list", []):
        query = var.get("query")
        query = query.get("query", "") if isinstance(query, dict) else query or ""
        if m := re.fullmatch(r"label_values\((.+),\s*\w+\)", query):
            found.append((f"variable {var['name']}", m.group(1)))
    return found


def test_every_metric_of_every_dashboard_panel_is_in_a_real_scrape(loaded: Node, prometheus: Prometheus) -> None:
    expressions = _dashboard_expressions()
    titles = {title for title, _ in expressions}
    assert len(titles) >= 10, titles  # capacity, latency per stage, refusals, barge-ins, worker health...
    scrape = http_text(f"http://127.0.0.1:{loaded.port}/metrics")
    exported = {s.name for f in text_string_to_metric_families(scrape) for s in f.samples}
    for title, expr in expressions:
        names = promql_metric_names(expr)
        assert names, (title, expr)
        assert names <= exported, (title, expr, names - exported)
        # ...and Prometheus itself accepts the expression (Grafana's variables filled in).
        promql = expr.replace("$__rate_interval", "1m").replace("$__interval", "15s").replace("$instance", ".*")
        answer = prometheus.query(promql)
        assert answer["status"] == "success", (title, promql, answer)


def test_the_readme_lists_every_metric_a_node_exports(loaded: Node) -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("### Metrics", 1)[1].split("\n### ", 1)[0]
    scrape = http_text(f"http://127.0.0.1:{loaded.port}/metrics")
    families = {f.name for f in text_string_to_metric_families(scrape)}
    listed = set(re.findall(r"`(farm_[a-z_]+?)(?:_total)?`", section))
    missing = {f for f in families if f.startswith("farm_") and not f.startswith("farm_ingress_process")} - listed
    assert not missing, f"README.md's Metrics section does not list {sorted(missing)}"
    assert "farm_ingress_process_*" in section


# -- counting the workers' counters (no node needed) -------------------------------------------


def _status(*reports: tuple[int, int, int]) -> wire.Status:
    """A broker status whose workers report ``(index, pid, events published)``."""
    return wire.Status(
        workers=len(reports),
        reports=tuple(wire.WorkerReport(i, pid, wire.Load(events_published=n)) for i, pid, n in reports),
    )


def test_worker_counters_only_grow_across_restarts_and_count_the_restarts() -> None:
    m = Metrics()
    m.note_status(_status((0, 100, 5), (1, 200, 7)))
    m.note_status(_status((0, 100, 9), (1, 200, 7)))
    assert [m.workers[i].counters["events_published"] for i in (0, 1)] == [9, 7]
    # worker 0 dies and is replaced: the new process counts from 0 again; the old one's
    # last report may still come with the new one's while the broker has not forgotten it
    m.note_status(_status((0, 100, 9), (0, 101, 2), (1, 200, 8)))
    m.note_status(_status((0, 101, 3), (1, 200, 8)))
    assert [m.workers[i].counters["events_published"] for i in (0, 1)] == [12, 8]
    assert [m.workers[i].restarts for i in (0, 1)] == [1, 0]


def test_a_final_ending_an_utterance_is_timed_from_the_end_of_speech() -> None:
    m = Metrics()
    final = Event("final", "c", 1, 0, {"text": "x", "reason": "vad"}, {"recv": 1_000, "commit": 2_000, "asr": 5_000})
    m.observe(final, 400_001_000)
    samples = {
        (s.name, s.labels.get("stage"), s.labels.get("le")): s.value for f in m.latency.collect() for s in f.samples
    }
    assert samples["farm_stage_latency_seconds_count", "end_of_speech_to_final", None] == 1
    assert samples["farm_stage_latency_seconds_bucket", "end_of_speech_to_final", "0.4"] == 1
    assert samples["farm_stage_latency_seconds_bucket", "end_of_speech_to_final", "0.3"] == 0
    assert {stage for _, stage, _ in samples} == set(LATENCY_STAGES)
    assert m.events["final"] == 1


def test_call_ends_are_counted_by_a_bounded_reason() -> None:
    m = Metrics()
    assert m.ended == dict.fromkeys(END_REASONS, 0)  # every reason exported from the start, at 0

    def end(call_id: str, data: dict[str, Any]) -> Event:
        return Event("call_end", call_id, 3, 0, data, {"publish": 1_000})

    m.observe(end("a", {"reason": "hangup", "detail": "close 1000", "duration_ms": 10}), 2_000)
    m.observe(end("b", {"reason": "refused", "detail": "at capacity", "duration_ms": 0}), 2_000)
    m.observe(end("c", {"reason": "hangup", "detail": "", "duration_ms": 20}), 2_000)
    m.observe(end("d", {"duration_ms": 5}), 2_000)  # an older worker's: no reason
    m.observe(end("e", {"reason": "caller said\nbye", "duration_ms": 5}), 2_000)  # not a reason: no new label
    assert m.ended["hangup"] == 2 and m.ended["refused"] == 1
    assert m.ended[END_UNKNOWN] == 2
    assert set(m.ended) == {*END_REASONS, END_UNKNOWN}
    assert m.events["call_end"] == 5
