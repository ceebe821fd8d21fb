"""``GET /metrics``: the node's figures in Prometheus's text format, by prometheus_client.

One collector reads, at scrape time, what the ingress knows: its call table, its
counters and latency histograms (:mod:`farm.ingress.metrics`), and the broker's last
``I_STATUS`` with every live worker's report. The metrics and their labels are listed
in README.md ("Metrics"); labels are bounded (protocol, state, stage, reason, event
type, worker index), never a call id.

Values are what the text format says they are: ``farm_workers_live 2.0``. Names kept
from the hand-written exposition this replaced keep their meaning.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, ProcessCollector, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from farm.ingress.broker_link import HEARTBEAT_S
from farm.ingress.calls import CallRegistry
from farm.ingress.metrics import DROP_RECOGNITION_BEHIND, Metrics


if TYPE_CHECKING:
    from farm.broker.wire import WorkerReport


__all__ = ["CONTENT_TYPE", "NodeCollector", "Exposition"]

# The text format version 0.0.4, as the node has always said it (the body is UTF-8).
CONTENT_TYPE = "text/plain; version=0.0.4"

PROTOCOLS = ("audio_stream", "socket_audio", "vosk")
# A call's state in the ingress: its stream is open (and the farm plays audio to it,
# or not), or its stream ended and its worker is finishing its last utterance.
CALL_STATES = ("streaming", "playing", "finishing")

# _created series double every counter for no use here: one switch for the process.
disable_created_metrics()  # type: ignore[no-untyped-call]


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _labelled(
    kind: type[GaugeMetricFamily] | type[CounterMetricFamily],
    name: str,
    doc: str,
    labels: list[str],
    values: Iterable[tuple[list[str], float]],
) -> Metric:
    family = kind(name, doc, labels=labels)
    for label_values, value in values:
        family.add_metric(label_values, value)
    return family


class NodeCollector(Collector):
    """Everything ``/metrics`` shows but the ingress process's own CPU and memory."""

    def __init__(self, registry: CallRegistry, metrics: Metrics) -> None:
        self.registry = registry
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        yield from self._calls()
        yield from self._traffic()
        yield from self._capacity()
        yield from self._broker()
        yield from self._canary()
        yield from self._workers(self.registry.link.status.reports)
        yield from self.metrics.latency.collect()
        yield _labelled(
            CounterMetricFamily,
            "farm_llm_requests",
            "Finals sent to the LLM fallback, by outcome (intent, or why unknown)",
            ["outcome"],
            (([o], n) for o, n in self.metrics.llm_outcomes.items()),
        )
        yield from self.metrics.llm_latency.collect()

    def _calls(self) -> Iterator[Metric]:
        m, calls = self.metrics, self.registry.served
        active = [c for c in calls if not c.closed_at]
        states = {(p, s): 0 for p in PROTOCOLS for s in CALL_STATES}
        for c in calls:
            state = "finishing" if c.closed_at else "playing" if c.ring.playing else "streaming"
            states[c.protocol, state] = states.get((c.protocol, state), 0) + 1
        yield _labelled(
            GaugeMetricFamily,
            "farm_calls_by_state",
            "Calls in the ingress, by protocol and state (streaming, playing, finishing)",
            ["protocol", "state"],
            (([p, s], n) for (p, s), n in sorted(states.items())),
        )
        yield _gauge("farm_calls_active", "Calls whose stream is open", len(active))
        yield _labelled(
            GaugeMetricFamily,
            "farm_calls_active_by_protocol",
            "Calls whose stream is open, by protocol",
            ["protocol"],
            (([p], sum(c.protocol == p for c in active)) for p in PROTOCOLS),
        )
        playing = sum(bool(c.ring.playing) for c in active)
        yield _gauge("farm_calls_playing", "Calls the farm is playing audio to", playing)
        speaking = sum(bool(c.ring.in_speech) for c in active)
        yield _gauge("farm_calls_in_speech", "Calls whose caller is speaking now", speaking)
        yield _counter("farm_calls", "Calls taken", m.calls_total)
        yield _labelled(
            CounterMetricFamily,
            "farm_calls_ended",
            "Calls ended (their call_end events), by reason",
            ["reason"],
            (([r], n) for r, n in m.ended.items()),
        )
        yield _counter("farm_barge_ins", "Playback cut because the caller spoke over it", m.barge_ins)
        yield _labelled(
            CounterMetricFamily,
            "farm_connections_refused",
            "Connections and calls refused, by reason",
            ["reason"],
            (([r], n) for r, n in sorted(m.calls_rejected.items())),
        )

    def _traffic(self) -> Iterator[Metric]:
        m, calls = self.metrics, self.registry.served
        yield _counter("farm_audio_bytes", "Audio bytes received from FreeSWITCH", m.audio_bytes)
        yield _counter("farm_audio_messages", "Audio messages received from FreeSWITCH", m.frames)
        yield _counter(
            "farm_ring_overrun_bytes",
            "Audio bytes overwritten before a worker read them",
            m.overrun_bytes + sum(c.ring.overrun_bytes for c in calls),
        )
        yield _counter(
            "farm_ring_overruns",
            "Ring writes that overwrote audio a worker had not read",
            m.overruns + sum(c.ring.overrun_count for c in calls),
        )
        yield _labelled(
            CounterMetricFamily,
            "farm_events",
            "Events seen on the node's event stream, by type",
            ["type"],
            (([t], n) for t, n in sorted(m.events.items())),
        )
        yield _counter("farm_events_relayed", "Events sent back on the calls' own connections", m.events_relayed)
        yield _counter("farm_events_stored", "Events written to the Redis stream (--redis-url)", m.events_stored)
        dropped = {**m.dropped, DROP_RECOGNITION_BEHIND: m.partials_dropped}
        yield _labelled(
            CounterMetricFamily,
            "farm_events_dropped",
            "Events not delivered or not published, by reason",
            ["reason"],
            (([r], n) for r, n in sorted(dropped.items())),
        )

    def _capacity(self) -> Iterator[Metric]:
        r = self.registry
        yield _gauge("farm_workers_live", "Recognition workers registered with the broker", r.link.status.workers)
        yield _gauge("farm_calls_assigned", "Calls the broker has assigned to workers", r.link.status.calls)
        yield _gauge(
            "farm_recognition_lag_ms",
            "Audio waiting for recognition on the least loaded worker, ms",
            r.link.status.lag_ms,
        )
        yield _gauge("farm_overloaded", "1 while new calls are refused: recognition is behind", int(r.link.overloaded))
        yield _gauge(
            "farm_capacity_calls", "calls the node's CPUs hold within the SLO (0: no limit)", r.link.status.capacity
        )
        yield _gauge(
            "farm_call_cpu_ms", "CPU ms a call costs per second, as admission counts it", r.link.status.call_cpu_ms
        )

    def _canary(self) -> Iterator[Metric]:
        m, failing = self.metrics, self.registry.canary_failing
        yield _gauge(
            "farm_canary_passing", "1 while the canary's last probe passed (or the canary is off)", int(not failing)
        )
        yield _labelled(
            CounterMetricFamily,
            "farm_canary_probes",
            "Canary probes, by result (ok, wrong words, late final, lost)",
            ["result"],
            (([r], n) for r, n in m.canary_probes.items()),
        )
        doc = "End of speech -> final of the canary's last probe that passed, seconds"
        yield _gauge("farm_canary_end_of_speech_to_final_seconds", doc, m.canary_latency_s)

    def _broker(self) -> Iterator[Metric]:
        r = self.registry
        age = r.link.age
        yield _gauge("farm_broker_up", "1 while the broker answers the ingress", int(age <= 3 * HEARTBEAT_S))
        yield _gauge("farm_broker_last_seen_seconds", "Seconds since the broker last answered", age)
        relay = int(r.relay.subscribed)
        yield _gauge("farm_event_relay_connected", "1 once the broker's event relay takes the ingress's events", relay)
        lost = r.link.status.workers_lost
        yield _counter(
            "farm_workers_lost", "Workers the broker declared dead (exited, missed heartbeats or replaced)", lost
        )
        yield _counter("farm_calls_moved", "Calls moved between workers to balance them", r.link.status.calls_moved)

    def _workers(self, reports: tuple[WorkerReport, ...]) -> Iterator[Metric]:
        live = {r.index: r.load for r in reports}  # a replacement registered under the same index wins
        totals = sorted(self.metrics.workers.items())
        for name, doc, member in _WORKER_GAUGES:
            values = (([str(i)], getattr(load, member)) for i, load in sorted(live.items()))
            yield _labelled(GaugeMetricFamily, name, doc, ["worker"], values)
        yield _labelled(
            GaugeMetricFamily,
            "farm_recognizers",
            "A worker's recognizers: warm in its pool (idle) or serving an utterance (busy)",
            ["worker", "state"],
            (
                item
                for i, load in sorted(live.items())
                for item in (([str(i), "idle"], load.recognizers_idle), ([str(i), "busy"], load.recognizers_busy))
            ),
        )
        for name, doc, member, scale in _WORKER_COUNTERS:
            values = (([str(i)], t.counters[member] * scale) for i, t in totals)
            yield _labelled(CounterMetricFamily, name, doc, ["worker"], values)
        restarts = (([str(i)], t.restarts) for i, t in totals)
        doc = "Worker processes replaced under an index"
        yield _labelled(CounterMetricFamily, "farm_worker_restarts", doc, ["worker"], restarts)


# Per-worker figures from the workers' heartbeats: (metric, help, Load member[, scale]).
_WORKER_GAUGES = (
    ("farm_worker_calls", "Calls a worker serves", "calls"),
    ("farm_worker_utterances", "Utterances in progress on a worker", "utterances"),
    ("farm_worker_lag_ms", "The most audio a call of a worker has waiting for recognition, ms", "lag_ms"),
    ("farm_worker_asr_queue", "Call channels waiting for a recognition thread", "queued"),
    ("farm_worker_call_cpu_ms", "CPU ms a call costs a worker per second (0: not yet measured)", "call_cpu_ms"),
    ("farm_worker_rss_bytes", "Resident memory of a worker", "rss_bytes"),
)
_WORKER_COUNTERS = (
    ("farm_worker_cpu_seconds", "CPU time of a worker process, every thread", "cpu_ms", 0.001),
    ("farm_recognizers_created", "Recognizers a worker created", "recognizers_created", 1.0),
    ("farm_recognizers_retired", "Recognizers a worker retired", "recognizers_retired", 1.0),
    ("farm_worker_events_published", "Events a worker published", "events_published", 1.0),
)


class Exposition:
    """The registry ``/metrics`` renders: the node's collector and the ingress process's own."""

    def __init__(self, registry: CallRegistry, metrics: Metrics) -> None:
        self.prometheus = CollectorRegistry(auto_describe=False)
        self.prometheus.register(NodeCollector(registry, metrics))
        ProcessCollector(namespace="farm_ingress", registry=self.prometheus)

    def render(self) -> str:
        """The body of ``GET /metrics`` (Content-Type :data:`CONTENT_TYPE`)."""
        return generate_latest(self.prometheus).decode("utf-8")
