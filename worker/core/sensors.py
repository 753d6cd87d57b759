"""Sensors: what the loop observes, kept out of the loop.

The loop reports what happened to one :class:`Sensor` (faust's pattern:
metrics are observed, not inlined); a sensor overrides the calls it cares
about. :class:`StatsSensor` keeps the run's :class:`WorkerStats` (the summary a
command prints), :class:`Sensors` fans out to several; the Prometheus sensor is
handed in by the caller (:class:`worker.ops.metrics.MetricsSensor`).

Outcomes (a prediction or a dead letter acknowledged, an event incomplete or
outside the window) are reported through :class:`Outcomes`: at-least-once they
reach the sensor at once; exactly-once they are held until their transaction
commits and dropped when it aborts, so the counts say what a read_committed
reader sees, also after an abort and a rewind.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


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


class Sensor:
    """What the loop reports: each call a no-op here, so a sensor overrides the ones it
    observes (this class is the interface, written once)."""

    def beat(self, now_s: float) -> None:
        """A turn of the loop began (``now_s``: Unix time)."""

    def consumed(self, modality: str) -> None:
        """A record was read; ``modality``: its model input, or "unknown"."""

    def skipped_finished(self) -> None:
        """A record the last checkpoint lists as already finished was skipped."""

    def duplicate_part(self) -> None:
        """A part arrived again for an input its event already had."""

    def completed(self) -> None:
        """An event's parts all arrived."""

    def batch(self, size: int, seconds: float) -> None:
        """ONNX Runtime ran a batch of ``size`` events in ``seconds``."""

    def predicted(self, latency_s: float | None) -> None:
        """A prediction was acknowledged (``latency_s``: from its newest part)."""

    def dead_lettered(self, reason: str) -> None:
        """A dead letter with this reason code was acknowledged."""

    def incomplete(self, action: str) -> None:
        """An event expired incomplete and ``action`` (dlq, drop, infer) was applied."""

    def evicted(self, action: str) -> None:
        """An incomplete event was pushed out by the pending bound (``action`` as above)."""

    def outside_window(self) -> None:
        """An event belongs to a neighbouring window and was finished without output."""

    def commit(self, ok: bool) -> None:
        """An offset commit (or a transaction's) succeeded or failed."""

    def transaction(self, result: str) -> None:
        """A transaction ``committed`` or ``aborted``, or the producer was ``rebuilt``."""

    def rebalance(self) -> None:
        """Partitions were revoked."""

    def gauges(self, g: Gauges) -> None:
        """What the worker holds, once per turn."""


#: The calls of the interface, in the order written above.
CALLS = tuple(n for n, v in vars(Sensor).items() if callable(v) and not n.startswith("_"))


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


class StatsSensor(Sensor):
    """Keeps :class:`WorkerStats`; ``clock`` (ms) stamps the first read and the last ack."""

    def __init__(self, stats: WorkerStats, clock: Callable[[], int]) -> None:
        self.stats = stats
        self.clock = clock

    def consumed(self, modality: str) -> None:
        self.stats.consumed += 1
        if self.stats.first_consumed_ms is None:
            self.stats.first_consumed_ms = self.clock()

    def skipped_finished(self) -> None:
        self.stats.skipped_finished += 1

    def duplicate_part(self) -> None:
        self.stats.duplicate_parts += 1

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


class Sensors(Sensor):
    """Several sensors as one: each call goes to the sensors that override it."""

    def __init__(self, sensors: Sequence[Sensor]) -> None:
        self.sensors = tuple(sensors)
        for name in CALLS:
            base = getattr(Sensor, name)
            calls = [getattr(s, name) for s in self.sensors]
            # A bound method of the base is a no-op; anything else (an override, a nested
            # fan-out's own function) observes the call.
            setattr(
                self, name, _fan_out([c for c in calls if getattr(c, "__func__", c) is not base])
            )


def _fan_out(calls: Sequence[Callable[..., None]]) -> Callable[..., None]:
    if len(calls) == 1:
        return calls[0]

    def call(*args: object) -> None:
        for c in calls:
            c(*args)

    return call


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
