"""The worker's loop, wired from parts:

    source -> intake (decode, assemble) -> filter -> batch -> admit -> score -> outputs
           -> guarantee (settle, commit, recover)

:meth:`Worker.step` is one turn and only delegates; each part has a narrow
interface and unit tests of its own (docs/architecture.md has the table). The live
worker and a replay differ only in the parts they pass: the source, the event
filter, the admission and extra sensors.

Threads: the loop owns the consumer, the intake, the batcher and the checkpoint.
Scoring runs inline or on the inference thread (``--inference-queue``) and talks
back only through :class:`~worker.core.outputs.Outputs`; the loop waits for that
thread to go idle before a transaction commits or aborts and before it exits.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

from worker.config import WorkerConfig
from worker.contract.records import Event
from worker.core.admission import Admission, StageRoom
from worker.core.backpressure import Backpressure
from worker.core.batcher import Batcher
from worker.core.checkpoint import Checkpoint
from worker.core.dispatch import Dispatch
from worker.core.filters import EventFilter, Everything
from worker.core.guarantee import AtLeastOnce, ExactlyOnce, Guarantee, Parts
from worker.core.incomplete import IncompletePolicy
from worker.core.intake import Intake
from worker.core.liveness import Liveness
from worker.core.outputs import Outputs
from worker.core.retry import Retry
from worker.core.score import Scorer
from worker.core.sensors import Gauges, Outcomes, Sensor, Sensors, StatsSensor, WorkerStats
from worker.core.sources import GroupSource, Source, poll, put_back
from worker.core.stage import BatchStage
from worker.edge.client import Clients, Consumer
from worker.inference.model import ModelRunner

__all__ = ["Clock", "Worker", "WorkerStats", "inference_depth", "wall_ms"]

log = logging.getLogger(__name__)

Clock = Callable[[], int]
SourceFactory = Callable[[Consumer], Source]
AdmissionFactory = Callable[[BatchStage[Event]], Admission]


def inference_depth(config: WorkerConfig, provider: str) -> int:
    """``--inference-queue``, with -1 (auto) resolved: 2 on CUDA, 0 (inline) on CPU, where
    ORT's own threads already use every core (docs/benchmarks.md)."""
    if config.inference_queue >= 0:
        return config.inference_queue
    return 2 if provider == "CUDAExecutionProvider" else 0


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


class Worker:
    """Runs the loop until ``stop`` is set, ``max_events`` predictions are acknowledged,
    or a bounded source is exhausted and everything it gave is finished."""

    def __init__(
        self,
        config: WorkerConfig,
        runner: ModelRunner,
        clock: Clock = wall_ms,
        *,
        clients: Clients,
        source: SourceFactory | None = None,
        events: EventFilter | None = None,
        admission: AdmissionFactory | None = None,
        sensors: Sequence[Sensor] = (),
    ) -> None:
        self.config, self.runner, self.clock = config, runner, clock
        exactly_once = config.guarantee == "exactly-once"
        events = events or Everything()
        policy = IncompletePolicy.of(config, events, runner.manifest.accepts_missing)
        self.stats = WorkerStats(provider=runner.info.provider)
        self.sensor = Sensors([StatsSensor(self.stats, clock), *sensors])
        # Exactly-once, outcomes count once their transaction commits (dropped on abort).
        outcomes = Outcomes(self.sensor, held=exactly_once)
        self.liveness = Liveness(config.progress_timeout_s, config.group_id, clock)
        retry = Retry(config.progress_timeout_s, clock, sleep=self._retry_pause)
        self.consumer = clients.consumer(config)
        try:
            producer = clients.producer(config)
        except BaseException:
            self.consumer.close()
            raise
        self.source = (source or _group_source(config))(self.consumer)
        self.checkpoint = Checkpoint(
            self.consumer, producer, exactly_once=exactly_once,
            interval_ms=config.commit_interval_ms, owned=self.source.owned, retry=retry,
        )  # fmt: skip
        self.outputs = Outputs(
            self.checkpoint, outcomes, clock, topic=config.output_topic,
            dlq_topic=config.dlq_topic, done_on_ack=not exactly_once,
        )  # fmt: skip
        self.batcher = Batcher(config.max_batch_size, config.max_batch_delay_ms)
        self.intake = Intake(
            config, runner.manifest, runner.required_parts, policy=policy, consumer=self.consumer,
            checkpoint=self.checkpoint, outputs=self.outputs, outcomes=outcomes,
            sensor=self.sensor, batcher=self.batcher, clock=clock,
        )  # fmt: skip
        self.backpressure = Backpressure(config.max_pending_events, config.max_pending_bytes)
        scorer = Scorer(runner, self.outputs, self.sensor, clock)
        depth = inference_depth(config, runner.info.provider)
        self.stage: BatchStage[Event] = BatchStage(scorer, depth, name="mmstream-infer")
        self.dispatch = Dispatch(
            self.batcher, (admission or StageRoom)(self.stage), self.stage, self.outputs,
            self.checkpoint, max_events=config.max_pending_events,
            max_bytes=config.max_pending_bytes, clock=clock,
        )  # fmt: skip
        parts = Parts(
            self.consumer, self.checkpoint, self.outputs, outcomes, self.sensor,
            self.intake, self.batcher, self.liveness,
        )  # fmt: skip
        self.guarantee: Guarantee = AtLeastOnce(parts)
        if exactly_once:
            self.guarantee = ExactlyOnce(
                parts, source=self.source, stage=self.stage, retry=retry,
                new_producer=lambda: clients.producer(config),
            )  # fmt: skip
        self.ready = threading.Event()

    def run(self, stop: threading.Event) -> WorkerStats:
        drained = False
        try:
            self.guarantee.start()
            self.source.join()
            c, m = self.config, self.runner.manifest
            log.info(
                "worker: %s -> %s (dlq %s), group %s, %s, model %s %s on %s",
                c.input_topic, c.output_topic, c.dlq_topic, c.group_id, c.guarantee,
                m.name, m.version, self.stats.provider,
            )  # fmt: skip
            while not stop.is_set() and not self._finished():
                self.step()
            self.drain()
            self._observe_gauges()  # also hands the last turn's counts to the sensors
            drained = True
        finally:
            self.stage.close(timeout_s=self.config.shutdown_timeout_s, discard=not drained)
            self.consumer.close()
            self.checkpoint.producer.close(timeout_s=5)
        log.info("worker stopped: %s", self.stats)
        return self.stats

    def step(self) -> None:
        """One turn: bound, poll, take the records in, expire, batch, settle, commit."""
        self.sensor.beat(time.time())
        self.stage.check()
        self.liveness.check(self._work_waiting, lambda: not self.consumer.in_group())
        pressure = self.backpressure.decide(
            self.pending_events() + self.outputs.records, self._bytes_held()
        )
        if pressure.pause:
            self.consumer.pause(self.consumer.assignment())  # also newly assigned ones
        elif pressure.resume:
            self.consumer.resume(self.source.resumable())
        limit = max(1, min(self.config.max_poll_records, pressure.room))
        records = poll(self.consumer, self.dispatch.poll_timeout_ms(), limit)
        if self.guarantee.revoked():
            records = []  # fetched before the rewind: read again from the checkpoint
        if self.consumer.joined():
            self.ready.set()
        for i, raw in enumerate(records):
            if self._bytes_held() >= self.config.max_pending_bytes:
                put_back(self.consumer, records[i:])  # e.g. large poison records, acks lagging
                break
            if self.source.admits(raw):
                self.intake.take(raw)
        self.source.after_poll()
        self.intake.expire(self.source.exhausted())
        if pressure.pause and not (
            len(self.batcher) or self.stage.pending_items or self.outputs.records
        ):
            self.intake.evict_at_bound(self.backpressure)  # only incomplete events hold the bound
        self.dispatch.submit_ready()
        self.guarantee.settle()
        now = self.clock()
        if self.checkpoint.due(now):
            self.guarantee.commit(now)
        self._observe_gauges()

    def drain(self) -> None:
        """Finish what was assembled: run pending batches, wait for acks, commit."""
        self.dispatch.submit_all()
        self.stage.wait_idle()
        self.stage.check()
        self.guarantee.flush(self.config.shutdown_timeout_s)
        self.guarantee.settle()
        self.guarantee.commit(self.clock())
        self.guarantee.settle()

    def pending_events(self) -> int:
        """Events held: waiting for parts, a batch or inference."""
        return len(self.intake) + len(self.batcher) + self.stage.pending_items

    def _retry_pause(self, pause_s: float) -> None:
        # Retrying within --progress-timeout-s is the loop at work: /healthz must not restart it.
        time.sleep(pause_s)
        self.sensor.beat(time.time())

    def _work_waiting(self) -> bool:
        return self.outputs.records > 0 or self.checkpoint.waiting()

    def _bytes_held(self) -> int:
        return self.intake.pending_bytes + self.outputs.nbytes

    def _finished(self) -> bool:
        if 0 < self.config.max_events <= self.stats.predicted:
            return True
        return (
            self.intake.flushed
            and self.pending_events() == 0
            and self.checkpoint.open_records() == 0
        )

    def _observe_gauges(self) -> None:
        self.sensor.gauges(
            Gauges(
                pending_events=self.pending_events(),
                pending_bytes=self.intake.pending_bytes,
                unacked_outputs=self.outputs.records,
                unacked_output_bytes=self.outputs.nbytes,
                paused_partitions=len(self.consumer.paused()),
                assigned_partitions=len(self.source.owned()),
                uncommitted_records=self.checkpoint.uncommitted(),
                out_of_group_s=self.liveness.out_of_group_s(),
            )
        )


def _group_source(config: WorkerConfig) -> SourceFactory:
    def make(consumer: Consumer) -> Source:
        return GroupSource(consumer, config.input_topic, config.auto_offset_reset)

    return make
