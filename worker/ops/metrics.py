"""Prometheus metrics of one worker, served at ``GET /metrics`` (see :mod:`worker.ops.http`).

Each :class:`WorkerMetrics` owns its own ``CollectorRegistry`` (never the process-global
one), so several workers in one process -- tests, mostly -- do not clash.

With ``--processes N`` the metrics of all N worker processes are served on one port by
the launcher, in prometheus_client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``,
set by :mod:`worker.ops.processes` for its children): each child writes its values to
per-process files there, and :class:`PoolMetrics` in the launcher merges them with the
library's ``MultiProcessCollector``. Counters and histograms add up over the processes;
each gauge says how in its ``multiprocess_mode``: the pending, partition and commit-lag
gauges are summed over the live processes (``livesum``), the loop's last iteration is
one series per live process (``liveall``: a ``pid`` label), the provider gauge is the
maximum (``max``: 1 for every provider some process uses). Multiprocess mode exports no
``*_created`` series.

Consume::

    mmstream_records_consumed_total{modality}     counter
        Records read from the input topic, by their ``mm-modality`` header when it
        names a model input ("unknown" otherwise: header values never become labels).
    mmstream_assigned_partitions                  gauge
        Input partitions currently assigned to this worker.
    mmstream_paused_partitions                    gauge
        Assigned partitions paused for back-pressure (pending events/bytes over limit).
    mmstream_partitions_revoked_total             counter
        Rebalances that took partitions away from this worker.
    mmstream_out_of_group_seconds                 gauge
        How long this member has been out of its consumer group (lost, rejoining,
        its coordinator unreachable); 0 while in it. At --progress-timeout-s the
        worker exits so that it is restarted.

Assemble::

    mmstream_events_completed_total               counter
        Events whose parts all arrived.
    mmstream_events_incomplete_total{action}      counter
        Events that timed out incomplete; action = dlq | drop | infer, the
        --on-incomplete policy that was applied.
    mmstream_events_evicted_total{action}         counter
        Incomplete events pushed out because they filled --max-pending-events/bytes
        (dead-lettered as evicted_at_bound with --on-incomplete dlq): a bound too
        small for how far apart the parts of an event are in the log.
    mmstream_duplicate_parts_total                counter
        Parts that arrived again for an input the event already had (the later
        one replaces the earlier; both offsets settle with the event).
    mmstream_pending_events                       gauge
        Events held in memory: waiting for parts, a batch or inference.
    mmstream_pending_bytes                        gauge
        Payload bytes held by those pending events.
    mmstream_unacked_outputs                      gauge
        Predictions and dead letters sent and not yet acknowledged by the broker
        (counted with the pending events against --max-pending-events).
    mmstream_unacked_output_bytes                 gauge
        Their bytes: key, value, headers (counted against --max-pending-bytes).

Infer::

    mmstream_batch_size                           histogram
        Events per model call (buckets 1, 2, 4, ... 512).
    mmstream_inference_seconds                    histogram
        Wall time of one ONNX Runtime call (buckets 0.1 ms .. 1 s).
    mmstream_execution_provider{provider}         gauge
        1 for the ONNX Runtime execution provider in use (e.g. CUDAExecutionProvider);
        it is the only series.

Produce::

    mmstream_predictions_total                    counter
        Prediction records acknowledged by the broker.
    mmstream_dead_letters_total{reason}           counter
        Records sent to the dead-letter topic, by reason code (the ``mm-error``
        header; see worker.contract.errors.Reason).
    mmstream_end_to_end_seconds                   histogram
        From the newest part's record timestamp to the prediction's acknowledgement
        (buckets 1 ms .. 60 s).

Commit::

    mmstream_uncommitted_records                  gauge
        Commit lag: records consumed past the committed position (in flight or
        awaiting commit).
    mmstream_commits_total{result}                counter
        Offset commits; result = ok | failed.
    mmstream_transactions_total{result}           counter
        Kafka transactions (exactly-once mode); result = committed | aborted |
        rebuilt (the producer could neither commit nor abort and was replaced: the
        new one fenced it and the broker aborted its transaction).

Loop::

    mmstream_loop_last_iteration_seconds          gauge
        Unix time of the poll loop's last iteration; ``/healthz`` fails when it
        stops advancing (see worker.ops.http.loop_health).

Counters also expose ``*_created`` series (their creation time), as prometheus_client does.
Label values from a fixed set (action, reason, result) start at 0 so that ``rate()`` and
``increase()`` work from the first scrape.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from worker.contract.errors import ConfigError, Reason

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


class WorkerMetrics:
    """All metrics of one worker, registered on ``registry`` (a new one by default)."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        on_beat: Callable[[float], None] | None = None,
    ) -> None:
        """``on_beat``: called with each :meth:`beat`'s time too (a ``--processes`` child
        reports its loop to the launcher through it)."""
        self.registry = registry if registry is not None else CollectorRegistry()
        reg = self.registry
        self.records_consumed = Counter(
            "mmstream_records_consumed",
            "Records read from the input topic, by model input named in mm-modality (else unknown)",
            ["modality"],
            registry=reg,
        )
        self.events_completed = Counter(
            "mmstream_events_completed", "Events assembled complete", registry=reg
        )
        self.events_incomplete = Counter(
            "mmstream_events_incomplete",
            "Events timed out incomplete, by the action taken",
            ["action"],
            registry=reg,
        )
        self.events_evicted = Counter(
            "mmstream_events_evicted",
            "Incomplete events pushed out by the pending bound, by the action taken",
            ["action"],
            registry=reg,
        )
        self.duplicate_parts = Counter(
            "mmstream_duplicate_parts",
            "Parts that replaced an earlier part of the same input of an event",
            registry=reg,
        )
        self.predictions = Counter(
            "mmstream_predictions", "Predictions acknowledged by the broker", registry=reg
        )
        self.dead_letters = Counter(
            "mmstream_dead_letters",
            "Records sent to the dead-letter topic, by reason",
            ["reason"],
            registry=reg,
        )
        self.batch_size = Histogram(
            "mmstream_batch_size",
            "Events per model call",
            buckets=BATCH_SIZE_BUCKETS,
            registry=reg,
        )
        self.inference_seconds = Histogram(
            "mmstream_inference_seconds",
            "Wall time of one ONNX Runtime call",
            buckets=INFERENCE_BUCKETS,
            registry=reg,
        )
        self.end_to_end_seconds = Histogram(
            "mmstream_end_to_end_seconds",
            "Newest part's record timestamp to prediction acknowledged",
            buckets=END_TO_END_BUCKETS,
            registry=reg,
        )
        # --processes N: these add up over the live processes (a pod's total).
        self.pending_events = Gauge(
            "mmstream_pending_events",
            "Events waiting for parts or a batch",
            registry=reg,
            multiprocess_mode="livesum",
        )
        self.pending_bytes = Gauge(
            "mmstream_pending_bytes",
            "Payload bytes held by pending events",
            registry=reg,
            multiprocess_mode="livesum",
        )
        self.unacked_outputs = Gauge(
            "mmstream_unacked_outputs",
            "Predictions and dead letters sent, not yet acknowledged by the broker",
            registry=reg,
            multiprocess_mode="livesum",
        )
        self.unacked_output_bytes = Gauge(
            "mmstream_unacked_output_bytes",
            "Bytes of the outputs sent, not yet acknowledged",
            registry=reg,
            multiprocess_mode="livesum",
        )
        self.paused_partitions = Gauge(
            "mmstream_paused_partitions",
            "Partitions paused for back-pressure",
            registry=reg,
            multiprocess_mode="livesum",
        )
        self.assigned_partitions = Gauge(
            "mmstream_assigned_partitions",
            "Input partitions assigned",
            registry=reg,
            multiprocess_mode="livesum",
        )
        self.uncommitted_records = Gauge(
            "mmstream_uncommitted_records",
            "Records consumed past the committed position",
            registry=reg,
            multiprocess_mode="livesum",
        )
        self.out_of_group = Gauge(
            "mmstream_out_of_group_seconds",
            "Seconds this member has been out of its consumer group (0 while in it); at "
            "--progress-timeout-s the worker exits to be restarted",
            registry=reg,
            multiprocess_mode="livemax",
        )
        self.commits = Counter(
            "mmstream_commits", "Offset commits, by result", ["result"], registry=reg
        )
        self.transactions = Counter(
            "mmstream_transactions", "Kafka transactions, by result", ["result"], registry=reg
        )
        self.rebalances = Counter(
            "mmstream_partitions_revoked", "Rebalances that revoked partitions", registry=reg
        )
        # --processes N: 1 for each provider some process uses.
        self.provider = Gauge(
            "mmstream_execution_provider",
            "1 for the ONNX Runtime execution provider in use",
            ["provider"],
            registry=reg,
            multiprocess_mode="max",
        )
        # --processes N: one series per live process (label pid), so that a stalled
        # process shows (a max would hide it behind the others).
        self.loop_last_iteration = Gauge(
            "mmstream_loop_last_iteration_seconds",
            "Unix time of the poll loop's last iteration",
            registry=reg,
            multiprocess_mode="liveall",
        )
        self._on_beat = on_beat
        self._last_beat: float | None = None
        self._provider_name: str | None = None
        for action in INCOMPLETE_ACTIONS:
            self.events_incomplete.labels(action=action)
            self.events_evicted.labels(action=action)
        for reason in Reason:
            self.dead_letters.labels(reason=reason.value)
        for result in COMMIT_RESULTS:
            self.commits.labels(result=result)
        for result in TRANSACTION_RESULTS:
            self.transactions.labels(result=result)

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
