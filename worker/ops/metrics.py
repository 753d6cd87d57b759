"""Prometheus metrics of one worker, served at ``GET /metrics`` (see :mod:`worker.ops.http`).

Every metric is declared once, in :data:`METRICS` below; docs/operations.md ("Reading the
metrics") lists them in a table that tests/test_metrics_http.py checks against
:data:`METRICS` (``python -m worker.ops.metrics`` prints its rows).

Each :class:`WorkerMetrics` owns its own ``CollectorRegistry`` (never the process-global
one), so several workers in one process -- tests, mostly -- do not clash.

With ``--processes N`` the metrics of all N worker processes are served on one port by
the launcher, in prometheus_client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``,
set by :mod:`worker.ops.processes` for its children): each child writes its values to
per-process files there, and :class:`PoolMetrics` in the launcher merges them with the
library's ``MultiProcessCollector``. Counters and histograms add up over the processes;
each gauge says how in its declared ``multiprocess_mode``. Multiprocess mode exports no
``*_created`` series.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from worker.contract.errors import ConfigError, Reason
from worker.core.sensors import Gauges, Sensor

#: The variable that puts prometheus_client in multiprocess mode (read when it is imported).
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

BATCH_SIZE_BUCKETS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0)
INFERENCE_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
)
END_TO_END_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
INCOMPLETE_ACTIONS = ("dlq", "drop", "infer")
COMMIT_RESULTS = ("ok", "failed")
TRANSACTION_RESULTS = ("committed", "aborted", "rebuilt")
UNKNOWN_MODALITY = "unknown"

MetricType = Literal["counter", "gauge", "histogram"]
#: prometheus_client's ``Gauge(multiprocess_mode=...)`` values.
GaugeMode = Literal[
    "all",
    "liveall",
    "min",
    "livemin",
    "max",
    "livemax",
    "sum",
    "livesum",
    "mostrecent",
    "livemostrecent",
]
Collector = Counter | Gauge | Histogram


@dataclass(frozen=True)
class Metric:
    """One metric as ``/metrics`` exports it, and the :class:`WorkerMetrics` attribute
    that holds its collector."""

    attr: str
    #: The exported name: a counter's ends in ``_total``, a histogram's is its base name.
    name: str
    type: MetricType
    help: str
    labels: tuple[str, ...] = ()
    #: Values of the (only) label created at 0 up front, so that ``rate()`` and
    #: ``increase()`` work from the first scrape.
    zero: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()
    #: How ``--processes N`` merges a gauge over the processes (counters and histograms add up).
    multiprocess_mode: GaugeMode = "all"

    def __post_init__(self) -> None:
        if (self.type == "counter") != self.name.endswith("_total"):
            raise ValueError(f"{self.name}: only a counter's name ends in _total")
        if (self.type == "histogram") != bool(self.buckets):
            raise ValueError(f"{self.name}: buckets are for histograms, and they need them")
        if self.type != "gauge" and self.multiprocess_mode != "all":
            raise ValueError(f"{self.name}: multiprocess_mode is for gauges")
        if self.zero and len(self.labels) != 1:
            raise ValueError(f"{self.name}: zero values need exactly one label")

    def build(self, registry: CollectorRegistry) -> Collector:
        """This metric's collector, registered on ``registry``, with its ``zero`` series."""
        collector: Collector
        if self.type == "counter":
            # prometheus_client names a counter without _total and adds it on export.
            collector = Counter(self.name, self.help, self.labels, registry=registry)
        elif self.type == "gauge":
            collector = Gauge(
                self.name,
                self.help,
                self.labels,
                registry=registry,
                multiprocess_mode=self.multiprocess_mode,
            )
        else:
            collector = Histogram(
                self.name, self.help, self.labels, registry=registry, buckets=self.buckets
            )
        for value in self.zero:
            collector.labels(value)
        return collector

    @property
    def cell(self) -> str:
        """How docs/operations.md's table names it: ``name{label,...}``."""
        return self.name + ("{" + ",".join(self.labels) + "}" if self.labels else "")


#: Every metric of a worker, in the order ``/metrics`` exports them.
METRICS: tuple[Metric, ...] = (
    Metric(
        "records_consumed",
        "mmstream_records_consumed_total",
        "counter",
        # Header values never become labels: an unknown modality would add a series.
        "Records read from the input topic, by model input named in mm-modality (else unknown)",
        ("modality",),
    ),
    Metric(
        "events_completed",
        "mmstream_events_completed_total",
        "counter",
        "Events assembled complete",
    ),
    Metric(
        "events_incomplete",
        "mmstream_events_incomplete_total",
        "counter",
        "Events timed out incomplete, by the action taken",
        ("action",),
        zero=INCOMPLETE_ACTIONS,
    ),
    Metric(
        "events_evicted",
        "mmstream_events_evicted_total",
        "counter",
        "Incomplete events pushed out by the pending bound, by the action taken",
        ("action",),
        zero=INCOMPLETE_ACTIONS,
    ),
    Metric(
        "duplicate_parts",
        "mmstream_duplicate_parts_total",
        "counter",
        "Parts that replaced an earlier part of the same input of an event",
    ),
    Metric(
        "predictions",
        "mmstream_predictions_total",
        "counter",
        "Predictions acknowledged by the broker",
    ),
    Metric(
        "dead_letters",
        "mmstream_dead_letters_total",
        "counter",
        "Records sent to the dead-letter topic, by reason",
        ("reason",),
        zero=tuple(reason.value for reason in Reason),
    ),
    Metric(
        "batch_size",
        "mmstream_batch_size",
        "histogram",
        "Events per model call",
        buckets=BATCH_SIZE_BUCKETS,
    ),
    Metric(
        "inference_seconds",
        "mmstream_inference_seconds",
        "histogram",
        "Wall time of one ONNX Runtime call",
        buckets=INFERENCE_BUCKETS,
    ),
    Metric(
        "end_to_end_seconds",
        "mmstream_end_to_end_seconds",
        "histogram",
        "Newest part's record timestamp to prediction acknowledged",
        buckets=END_TO_END_BUCKETS,
    ),
    # The pending, unacked, partition and commit-lag gauges add up to a pod's total.
    Metric(
        "pending_events",
        "mmstream_pending_events",
        "gauge",
        "Events waiting for parts or a batch",
        multiprocess_mode="livesum",
    ),
    Metric(
        "pending_bytes",
        "mmstream_pending_bytes",
        "gauge",
        "Payload bytes held by pending events",
        multiprocess_mode="livesum",
    ),
    Metric(
        "unacked_outputs",
        "mmstream_unacked_outputs",
        "gauge",
        "Predictions and dead letters sent, not yet acknowledged by the broker",
        multiprocess_mode="livesum",
    ),
    Metric(
        "unacked_output_bytes",
        "mmstream_unacked_output_bytes",
        "gauge",
        "Bytes of the outputs sent, not yet acknowledged",
        multiprocess_mode="livesum",
    ),
    Metric(
        "paused_partitions",
        "mmstream_paused_partitions",
        "gauge",
        "Partitions paused for back-pressure",
        multiprocess_mode="livesum",
    ),
    Metric(
        "assigned_partitions",
        "mmstream_assigned_partitions",
        "gauge",
        "Input partitions assigned",
        multiprocess_mode="livesum",
    ),
    Metric(
        "uncommitted_records",
        "mmstream_uncommitted_records",
        "gauge",
        "Records consumed past the committed position",
        multiprocess_mode="livesum",
    ),
    # The pod is as far out of its group as its furthest-out process.
    Metric(
        "out_of_group",
        "mmstream_out_of_group_seconds",
        "gauge",
        "Seconds this member has been out of its consumer group (0 while in it); at "
        "--progress-timeout-s the worker exits to be restarted",
        multiprocess_mode="livemax",
    ),
    Metric(
        "commits",
        "mmstream_commits_total",
        "counter",
        "Offset commits, by result",
        ("result",),
        zero=COMMIT_RESULTS,
    ),
    Metric(
        "transactions",
        "mmstream_transactions_total",
        "counter",
        "Kafka transactions, by result",
        ("result",),
        zero=TRANSACTION_RESULTS,
    ),
    Metric(
        "rebalances",
        "mmstream_partitions_revoked_total",
        "counter",
        "Rebalances that revoked partitions",
    ),
    # 1 for each provider some process uses.
    Metric(
        "provider",
        "mmstream_execution_provider",
        "gauge",
        "1 for the ONNX Runtime execution provider in use",
        ("provider",),
        multiprocess_mode="max",
    ),
    # One series per live process (label pid), so that a stalled process shows (a max
    # would hide it behind the others).
    Metric(
        "loop_last_iteration",
        "mmstream_loop_last_iteration_seconds",
        "gauge",
        "Unix time of the poll loop's last iteration",
        multiprocess_mode="liveall",
    ),
)


def markdown_table() -> str:
    """The rows of docs/operations.md's metrics table, from :data:`METRICS` (the help
    text as the first draft of "read it as"; "alert on" is the maintainer's)."""
    lines = ["| metric | type | read it as | alert on |", "|---|---|---|---|"]
    lines += [f"| `{m.cell}` | {m.type} | {m.help} | - |" for m in METRICS]
    return "\n".join(lines)


class WorkerMetrics:
    """All metrics of one worker, registered on ``registry`` (a new one by default)."""

    # Set from METRICS by __init__; declared here for type checkers.
    records_consumed: Counter
    events_completed: Counter
    events_incomplete: Counter
    events_evicted: Counter
    duplicate_parts: Counter
    predictions: Counter
    dead_letters: Counter
    batch_size: Histogram
    inference_seconds: Histogram
    end_to_end_seconds: Histogram
    pending_events: Gauge
    pending_bytes: Gauge
    unacked_outputs: Gauge
    unacked_output_bytes: Gauge
    paused_partitions: Gauge
    assigned_partitions: Gauge
    uncommitted_records: Gauge
    out_of_group: Gauge
    commits: Counter
    transactions: Counter
    rebalances: Counter
    provider: Gauge
    loop_last_iteration: Gauge

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        on_beat: Callable[[float], None] | None = None,
    ) -> None:
        """``on_beat``: called with each :meth:`beat`'s time too (a ``--processes`` child
        reports its loop to the launcher through it)."""
        self.registry = registry if registry is not None else CollectorRegistry()
        for metric in METRICS:
            setattr(self, metric.attr, metric.build(self.registry))
        self._on_beat = on_beat
        self._last_beat: float | None = None
        self._provider_name: str | None = None

    def set_provider(self, name: str) -> None:
        """Mark ``name`` as the execution provider in use (the only series, value 1).

        In multiprocess mode series cannot be removed (the library does not implement
        it): a previous provider is set to 0 instead."""
        previous, self._provider_name = self._provider_name, name
        if multiprocess_mode():
            if previous is not None and previous != name:
                self.provider.labels(provider=previous).set(0)
        else:
            self.provider.clear()
        self.provider.labels(provider=name).set(1)

    def beat(self, now_s: float) -> None:
        """The poll loop ran an iteration at unix time ``now_s``."""
        self._last_beat = now_s
        self.loop_last_iteration.set(now_s)
        if self._on_beat is not None:
            self._on_beat(now_s)

    @property
    def last_beat(self) -> float | None:
        """Unix time of the last :meth:`beat`, or None before the first."""
        return self._last_beat

    def render(self) -> bytes:
        """This registry in the Prometheus text exposition format."""
        return generate_latest(self.registry)

    def value(self, name: str, **labels: str) -> float | None:
        """One sample's value (full sample name, e.g. ``mmstream_predictions_total``), or None."""
        return self.registry.get_sample_value(name, labels)


def multiprocess_mode() -> bool:
    """Whether this process's metrics are multiprocess values (as prometheus_client decides:
    the variable is set; its lower-case spelling is the library's deprecated alias)."""
    return MULTIPROC_ENV in os.environ or MULTIPROC_ENV.lower() in os.environ


class PoolMetrics:
    """The launcher's ``/metrics``: every worker process's values, merged from ``path``.

    ``path`` is the ``PROMETHEUS_MULTIPROC_DIR`` of the children; the launcher itself
    registers no metric of its own (its registry holds only the MultiProcessCollector, as
    the library prescribes)."""

    def __init__(self, path: Path) -> None:
        if not Path(path).is_dir():
            raise ConfigError(f"metrics directory {path} does not exist")
        self.path = Path(path)
        self.registry = CollectorRegistry()
        # The library's multiprocess module has no type hints.
        MultiProcessCollector(self.registry, path=str(self.path))  # type: ignore[no-untyped-call]

    def process_dead(self, pid: int) -> None:
        """Forget the ``live*`` gauges of process ``pid`` (it exited); its counters stay."""
        mark_process_dead(pid, str(self.path))  # type: ignore[no-untyped-call]

    def render(self) -> bytes:
        """All processes' metrics in the Prometheus text exposition format."""
        return generate_latest(self.registry)

    def value(self, name: str, **labels: str) -> float | None:
        """One merged sample's value (full sample name), or None."""
        return self.registry.get_sample_value(name, labels)


class MetricsSensor(Sensor):
    """Feeds :class:`WorkerMetrics` (Prometheus) from the loop's reports."""

    def __init__(self, metrics: WorkerMetrics) -> None:
        self.m = metrics
        # Per-record counts are added up here and handed to Prometheus once per loop turn
        # (gauges()): a counter's inc() takes a lock, and these run once per record.
        self._consumed: dict[str, int] = {}
        self._completed = 0
        self._predicted = 0

    def beat(self, now_s: float) -> None:
        self.m.beat(now_s)

    def consumed(self, modality: str) -> None:
        self._consumed[modality] = self._consumed.get(modality, 0) + 1

    def duplicate_part(self) -> None:
        self.m.duplicate_parts.inc()

    def completed(self) -> None:
        self._completed += 1

    def batch(self, size: int, seconds: float) -> None:
        self.m.inference_seconds.observe(seconds)
        self.m.batch_size.observe(size)

    def predicted(self, latency_s: float | None) -> None:
        self._predicted += 1
        if latency_s is not None:
            self.m.end_to_end_seconds.observe(latency_s)

    def dead_lettered(self, reason: str) -> None:
        self.m.dead_letters.labels(reason).inc()

    def incomplete(self, action: str) -> None:
        self.m.events_incomplete.labels(action).inc()

    def evicted(self, action: str) -> None:
        self.m.events_evicted.labels(action).inc()

    def commit(self, ok: bool) -> None:
        self.m.commits.labels("ok" if ok else "failed").inc()

    def transaction(self, result: str) -> None:
        self.m.transactions.labels(result).inc()

    def rebalance(self) -> None:
        self.m.rebalances.inc()

    def flush(self) -> None:
        """Hand the counts added up since the last turn to Prometheus."""
        for modality, n in self._consumed.items():
            self.m.records_consumed.labels(modality).inc(n)
        self._consumed.clear()
        if self._completed:
            self.m.events_completed.inc(self._completed)
            self._completed = 0
        if self._predicted:
            self.m.predictions.inc(self._predicted)
            self._predicted = 0

    def gauges(self, g: Gauges) -> None:
        self.flush()
        self.m.pending_events.set(g.pending_events)
        self.m.pending_bytes.set(g.pending_bytes)
        self.m.unacked_outputs.set(g.unacked_outputs)
        self.m.unacked_output_bytes.set(g.unacked_output_bytes)
        self.m.paused_partitions.set(g.paused_partitions)
        self.m.assigned_partitions.set(g.assigned_partitions)
        self.m.uncommitted_records.set(g.uncommitted_records)
        self.m.out_of_group.set(g.out_of_group_s)


if __name__ == "__main__":
    print(markdown_table())
