"""What the node counts: the ingress's counters, stage latencies, and every worker's figures.

How the figures of every process reach one ``/metrics`` (and why not prometheus_client's
multiprocess mode): the ingress is the only process that serves HTTP, and it already
hears everything worth counting.

* Latency. Every event carries its stage stamps (:mod:`farm.protocol.events`), and the
  ingress subscribes to the whole event stream (it relays events to the calls'
  WebSockets). So it turns each event it receives into histogram observations
  (:func:`farm.protocol.latency.stage_latencies`), in one process and one place,
  whichever worker produced the event and however often workers restart.
* Workers. Each worker's heartbeat to the broker (``W_HEARTBEAT``, every 250 ms, every
  second while it has no call, from its loop) carries a :class:`~farm.broker.wire.Load` with its
  figures: calls, lag, recognition queue, CPU, RSS, recognizer pool, events
  published and dropped. The broker passes the live workers' last loads to the
  ingress in ``I_STATUS`` (every second) with its own counters. No new socket, no
  new thread, and a worker that stops heartbeating stops being reported, which is
  what liveness means anyway.
* Counters that must not go backwards. A worker's counters start at zero when the
  process does; :meth:`Metrics.note_status` adds up the *increments* per worker index
  (a new pid starts from zero again and counts as a restart), so the node's counters
  only grow while the ingress lives, as Prometheus expects of a counter.

Multiprocess mode would have needed a shared directory of mmapped files that every
process writes (set before prometheus_client is imported, which the forked workers
inherit), cleanup of dead workers' files on every restart, an aggregation mode per
gauge, and it cannot serve collectors that compute a value at scrape time (the call
table, the broker's state), which is most of what the ingress exports.

The hot path (each audio message) only adds to plain ints; prometheus_client objects
are touched per event (histograms) and at scrape time (:mod:`farm.ingress.exposition`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import Histogram

from farm.broker import wire
from farm.llm import REASONS as LLM_REASONS
from farm.protocol.events import END_REASONS, EVENT_TYPES, Event
from farm.protocol.latency import LATENCY_STAGES, stage_latencies


__all__ = [
    "Metrics",
    "WorkerTotals",
    "LATENCY_BUCKETS",
    "WORKER_COUNTERS",
    "REFUSALS",
    "DROP_WS_BACKLOG",
    "DROP_MALFORMED",
    "DROP_RECOGNITION_BEHIND",
    "DROP_REDIS",
    "CANARY_RESULTS",
    "END_UNKNOWN",
    "LLM_OUTCOMES",
]

# Seconds. Fine around the SLOs (onset -> speech_start 150 ms, end of speech -> final
# 400 ms), from the ingress's tens of microseconds to a recognizer seconds behind.
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.25,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    1.5,
    2.5,
    5.0,
    10.0,
)

# The Load members that are counters (the rest are gauges): added up by increments.
WORKER_COUNTERS = (
    "cpu_ms",
    "recognizers_created",
    "recognizers_retired",
    "events_published",
    "partials_dropped",
)

# Refusals the code makes under fixed names: exported at 0 from the start, so a rate()
# over them is defined before the first refusal. Others appear when they happen.
REFUSALS = (
    "at capacity",
    "broker not answering",
    "too many calls",
    "farm is shutting down",
    "unauthorized",
    "not allowed",
)

# Why an event the ingress handled did not go where it was going (farm_events_dropped_total).
DROP_WS_BACKLOG = "websocket backlog"  # the call's WebSocket stopped taking them
DROP_MALFORMED = "malformed"  # not an event of this schema
DROP_RECOGNITION_BEHIND = "recognition behind"  # a worker's partial, its call's recognition late
DROP_REDIS = "redis unreachable"  # --redis-url: more were waiting for Redis than --redis-buffer
# How a canary probe ended (farm/ingress/canary.py): passed, wrong words, final too late, no end.
CANARY_RESULTS = ("ok", "wrong", "late", "lost")

# farm_calls_ended_total's reason for a call_end whose reason is not one of END_REASONS
# (an older worker's, which says none): the label stays bounded whatever an event says.
END_UNKNOWN = "unknown"

# What became of a final sent to the LLM fallback (farm_llm_requests_total's outcome): an
# intent, one of farm.llm's reasons for unknown, or the wiring's own (farm/ingress/llm_intents.py).
LLM_OUTCOMES = ("intent", *LLM_REASONS, "no_rules", "call_ended")


@dataclass
class WorkerTotals:
    """One worker index's counters, summed over its processes' increments."""

    counters: dict[str, int] = field(default_factory=lambda: dict.fromkeys(WORKER_COUNTERS, 0))
    restarts: int = 0  # a new pid under this index after the first one the ingress saw
    pid: int = 0  # the process last reported under this index


class Metrics:
    """The ingress's counters (sites add to the ints), latency histograms, worker figures."""

    def __init__(self) -> None:
        self.calls_total = 0
        self.calls_rejected: dict[str, int] = dict.fromkeys(REFUSALS, 0)
        self.audio_bytes = 0
        self.frames = 0  # audio messages
        self.events_relayed = 0  # events sent back on the calls' own connections
        self.events_stored = 0  # events written to the Redis stream (--redis-url)
        self.overrun_bytes = 0  # of calls already finished (live calls' are in their rings)
        self.overruns = 0  # likewise, writes that overwrote unread audio
        self.barge_ins = 0
        self.canary_probes = dict.fromkeys(CANARY_RESULTS, 0)  # by result (farm/ingress/canary.py)
        self.canary_latency_s = 0.0  # end of speech -> final of the last probe that passed
        self.events: dict[str, int] = dict.fromkeys(sorted(EVENT_TYPES), 0)  # seen on the event stream
        self.ended: dict[str, int] = dict.fromkeys(END_REASONS, 0)  # call_end events, by their reason
        self.dropped: dict[str, int] = dict.fromkeys((DROP_WS_BACKLOG, DROP_MALFORMED), 0)
        self.workers: dict[int, WorkerTotals] = {}
        self._last: dict[tuple[int, int], wire.Load] = {}  # per (index, pid): counters to count increments from
        self.latency = Histogram(
            "farm_stage_latency_seconds",
            "Per-stage latency from the events' stamps (ARCHITECTURE.md, per-stage latency vocabulary)",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=None,  # collected by farm.ingress.exposition's collector, not a global registry
        )
        for stage in LATENCY_STAGES:
            self.latency.labels(stage)  # every stage exported from the start, at 0
        self.llm_outcomes: dict[str, int] = dict.fromkeys(LLM_OUTCOMES, 0)
        self.llm_latency = Histogram(
            "farm_llm_latency_seconds",
            "From a final marked llm_intent to the LLM's answer or the budget's end (requests sent)",
            buckets=LATENCY_BUCKETS,
            registry=None,
        )

    def reject(self, reason: str) -> None:
        """Count a refused connection or call, by a bounded reason (no client text, no numbers)."""
        self.calls_rejected[reason] = self.calls_rejected.get(reason, 0) + 1

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    def observe(self, event: Event, received_ns: int) -> None:
        """An event arrived on the event stream at ``received_ns``: count it, time its stages."""
        self.events[event.type] = self.events.get(event.type, 0) + 1
        if event.type == "call_end":
            reason = event.get("reason")
            key = reason if isinstance(reason, str) and reason in END_REASONS else END_UNKNOWN
            self.ended[key] = self.ended.get(key, 0) + 1
        for stage, ns in stage_latencies(event, received_ns):
            self.latency.labels(stage).observe(ns / 1e9)

    def note_status(self, status: wire.Status) -> None:
        """The broker's I_STATUS: add the workers' counter increments since the last one."""
        seen: set[tuple[int, int]] = set()
        for report in status.reports:
            key = (report.index, report.pid)
            seen.add(key)
            totals = self.workers.setdefault(report.index, WorkerTotals())
            if totals.pid and totals.pid != report.pid and key not in self._last:
                totals.restarts += 1
            totals.pid = report.pid
            last = self._last.get(key)
            for name in WORKER_COUNTERS:
                now = getattr(report.load, name)
                before = getattr(last, name) if last is not None else 0
                totals.counters[name] += max(0, now - before)
            self._last[key] = report.load
        for key in set(self._last) - seen:
            del self._last[key]  # that process is gone: a pid reused later starts from zero

    @property
    def partials_dropped(self) -> int:
        return sum(t.counters["partials_dropped"] for t in self.workers.values())
