"""Sensors: what the loop observes, kept out of the loop.

The loop reports what happened to one :class:`Sensor` (faust's pattern:
metrics are observed, not inlined). :class:`StatsSensor` keeps the run's
:class:`WorkerStats` (the summary a command prints), :class:`MetricsSensor`
feeds the Prometheus metrics, :class:`Sensors` fans out to several.

Outcomes (a prediction or a dead letter acknowledged, an event incomplete or
outside the window) are reported through :class:`Outcomes`: at-least-once they
reach the sensor at once; exactly-once they are held until their transaction
commits and dropped when it aborts, so the counts say what a read_committed
reader sees, also after an abort and a rewind.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from worker.ops.metrics import WorkerMetrics


@dataclass(frozen=True)
class Gauges:
    """What the worker holds, read once per loop turn."""

    pending_events: int
    pending_bytes: int
    unacked_outputs: int
    unacked_output_bytes: int
    paused_partitions: int
    assigned_partitions: int
    uncommitted_records: int
    out_of_group_s: float = 0.0  # how long the member has been out of its group


class Sensor(Protocol):
    def beat(self, now_s: float) -> None: ...

    def consumed(self, modality: str) -> None:
        """A record was read; ``modality``: its model input, or "unknown"."""

    def skipped_finished(self) -> None:
        """A record the last checkpoint lists as already finished was skipped."""

    def duplicate_part(self) -> None: ...

    def completed(self) -> None:
        """An event's parts all arrived."""

    def batch(self, size: int, seconds: float) -> None:
        """ONNX Runtime ran a batch of ``size`` events in ``seconds``."""

    def predicted(self, latency_s: float | None) -> None:
        """A prediction was acknowledged (``latency_s``: from its newest part)."""

    def dead_lettered(self, reason: str) -> None: ...

    def incomplete(self, action: str) -> None:
        """An event expired incomplete and ``action`` (dlq, drop, infer) was applied."""

    def evicted(self, action: str) -> None:
        """An incomplete event was pushed out by the pending bound (``action`` as above)."""

    def outside_window(self) -> None:
        """An event belongs to a neighbouring window and was finished without output."""

    def commit(self, ok: bool) -> None: ...

    def transaction(self, result: str) -> None:
        """A transaction ``committed`` or ``aborted``, or the producer was ``rebuilt``."""

    def rebalance(self) -> None: ...

    def gauges(self, g: Gauges) -> None: ...


class NullSensor:
    """Observes nothing: a base for sensors that care about a few of the calls."""

    def beat(self, now_s: float) -> None:
        pass

    def consumed(self, modality: str) -> None:
        pass

    def skipped_finished(self) -> None:
        pass

    def duplicate_part(self) -> None:
        pass

    def completed(self) -> None:
        pass

    def batch(self, size: int, seconds: float) -> None:
        pass

    def predicted(self, latency_s: float | None) -> None:
        pass

    def dead_lettered(self, reason: str) -> None:
        pass

    def incomplete(self, action: str) -> None:
        pass

    def evicted(self, action: str) -> None:
        pass

    def outside_window(self) -> None:
        pass

    def commit(self, ok: bool) -> None:
        pass

    def transaction(self, result: str) -> None:
        pass

    def rebalance(self) -> None:
        pass

    def gauges(self, g: Gauges) -> None:
        pass


@dataclass
class WorkerStats:
    """Counters of one worker run (also logged at exit)."""

    consumed: int = 0
    predicted: int = 0
    dead_lettered: dict[str, int] = field(default_factory=dict)
    batches: int = 0
    duplicate_parts: int = 0
    skipped_finished: int = 0
    incomplete: int = 0
    evicted: int = 0
    outside_window: int = 0
    commits: int = 0
    aborts: int = 0
    provider: str = ""
    first_consumed_ms: int | None = None
    last_acked_ms: int | None = None


class StatsSensor:
    """Keeps :class:`WorkerStats`; ``clock`` (ms) stamps the first read and the last ack."""

    def __init__(self, stats: WorkerStats, clock: Callable[[], int]) -> None:
        self.stats = stats
        self.clock = clock

    def beat(self, now_s: float) -> None:
        pass

    def consumed(self, modality: str) -> None:
        self.stats.consumed += 1
        if self.stats.first_consumed_ms is None:
            self.stats.first_consumed_ms = self.clock()

    def skipped_finished(self) -> None:
        self.stats.skipped_finished += 1

    def duplicate_part(self) -> None:
        self.stats.duplicate_parts += 1

    def completed(self) -> None:
        pass

    def batch(self, size: int, seconds: float) -> None:
        self.stats.batches += 1

    def predicted(self, latency_s: float | None) -> None:
        self.stats.predicted += 1
        self.stats.last_acked_ms = self.clock()

    def dead_lettered(self, reason: str) -> None:
        self.stats.dead_lettered[reason] = self.stats.dead_lettered.get(reason, 0) + 1
        self.stats.last_acked_ms = self.clock()

    def incomplete(self, action: str) -> None:
        self.stats.incomplete += 1

    def evicted(self, action: str) -> None:
        self.stats.evicted += 1

    def outside_window(self) -> None:
        self.stats.outside_window += 1

    def commit(self, ok: bool) -> None:
        if ok:
            self.stats.commits += 1

    def transaction(self, result: str) -> None:
        if result == "aborted":
            self.stats.aborts += 1

    def rebalance(self) -> None:
        pass

    def gauges(self, g: Gauges) -> None:
        pass


class MetricsSensor:
    """Feeds :class:`~worker.ops.metrics.WorkerMetrics` (Prometheus)."""

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

    def skipped_finished(self) -> None:
        pass

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

    def outside_window(self) -> None:
        pass

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


class Sensors:
    """Several sensors as one."""

    def __init__(self, sensors: Sequence[Sensor]) -> None:
        self.sensors = tuple(sensors)

    def beat(self, now_s: float) -> None:
        for s in self.sensors:
            s.beat(now_s)

    def consumed(self, modality: str) -> None:
        for s in self.sensors:
            s.consumed(modality)

    def skipped_finished(self) -> None:
        for s in self.sensors:
            s.skipped_finished()

    def duplicate_part(self) -> None:
        for s in self.sensors:
            s.duplicate_part()

    def completed(self) -> None:
        for s in self.sensors:
            s.completed()

    def batch(self, size: int, seconds: float) -> None:
        for s in self.sensors:
            s.batch(size, seconds)

    def predicted(self, latency_s: float | None) -> None:
        for s in self.sensors:
            s.predicted(latency_s)

    def dead_lettered(self, reason: str) -> None:
        for s in self.sensors:
            s.dead_lettered(reason)

    def incomplete(self, action: str) -> None:
        for s in self.sensors:
            s.incomplete(action)

    def evicted(self, action: str) -> None:
        for s in self.sensors:
            s.evicted(action)

    def outside_window(self) -> None:
        for s in self.sensors:
            s.outside_window()

    def commit(self, ok: bool) -> None:
        for s in self.sensors:
            s.commit(ok)

    def transaction(self, result: str) -> None:
        for s in self.sensors:
            s.transaction(result)

    def rebalance(self) -> None:
        for s in self.sensors:
            s.rebalance()

    def gauges(self, g: Gauges) -> None:
        for s in self.sensors:
            s.gauges(g)


class Outcomes:
    """The outcomes of work, for a sensor: at once, or (``held``) kept until :meth:`commit`."""

    def __init__(self, sensor: Sensor, *, held: bool) -> None:
        self.sensor = sensor
        self.held = held
        self._pending: list[Callable[[Sensor], None]] = []

    def _report(self, observation: Callable[[Sensor], None]) -> None:
        if self.held:
            self._pending.append(observation)
        else:
            observation(self.sensor)

    def predicted(self, latency_s: float | None) -> None:
        self._report(lambda s: s.predicted(latency_s))

    def dead_lettered(self, reason: str) -> None:
        self._report(lambda s: s.dead_lettered(reason))

    def incomplete(self, action: str) -> None:
        self._report(lambda s: s.incomplete(action))

    def evicted(self, action: str) -> None:
        self._report(lambda s: s.evicted(action))

    def outside_window(self) -> None:
        self._report(lambda s: s.outside_window())

    def commit(self) -> None:
        """Their transaction committed: the held outcomes happened."""
        pending, self._pending = self._pending, []
        for observation in pending:
            observation(self.sensor)

    def discard(self) -> None:
        """Their transaction aborted: the held outcomes never happened."""
        self._pending.clear()
