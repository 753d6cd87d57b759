"""The worker's loop, composed of parts:

    source -> decode -> assemble -> filter -> batch -> admit -> infer -> publish -> checkpoint

Assembly runs in stream time (:mod:`worker.core.streamtime`): an event times out
when its partition's records have moved past its first part's timestamp plus
``--assembly-timeout-ms``, whatever the wall clock says while fetching stalls;
events pushed out by a full pending bound are told apart (``evicted_at_bound``).

Each concern is a part with a narrow interface and unit tests of its own; the
loop (:meth:`Worker._step`) only wires them together and acts on their decisions:

* source: :class:`~worker.core.sources.GroupSource` (live: the consumer group) or
  :class:`~worker.backfill.source.RangeSource` (replay: fixed offset ranges);
* event filter: :class:`~worker.core.filters.Everything` (live) or
  :class:`~worker.core.filters.TimeWindow` (a replay's window rule);
* admission: :class:`~worker.core.admission.StageRoom` (live) or
  ``Paced(StageRoom, Pacer)`` (a replay's ``--rate``);

and, the same for both: the Kafka clients (:class:`~worker.edge.client.Clients`,
kafka-python by default), :class:`~worker.core.checkpoint.Checkpoint` (offsets,
commit metadata, transactions, the abort generation),
:class:`~worker.core.backpressure.Backpressure` (pause/resume at the bounds),
:func:`~worker.core.deadletter.dead_letter` (the dead-letter record),
:class:`~worker.core.poison.PoisonBudget` (a broken model stops the worker),
and the :mod:`sensors <worker.core.sensors>` that observe it all (stats, metrics,
progress).

Threads: the loop (:meth:`Worker.run`) owns the consumer, the assembler, the
batcher and the checkpoint; nothing else touches them. Inference and
publishing run inline or on the inference thread (:class:`~worker.core.stage.BatchStage`,
``--inference-queue``) and report back only through queues: delivery acks and
failures (from the producer's thread), and exactly-once the sources of what was
sent. The loop waits for the inference thread to go idle before it commits or
aborts a transaction and before it exits, so no send straddles a transaction.

Guarantees: at-least-once, a record's offset is done when every output that
depends on it is acknowledged, and a delivery the broker refuses stops the
worker (:class:`BrokerError`) before anything beyond it is committed.
Exactly-once, outputs and offsets go in one transaction per commit interval;
a failure or a revocation aborts it and rewinds the source to its checkpoints.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import orjson

from worker.config import WorkerConfig
from worker.contract.errors import BrokerError, ConfigError, InferenceError, Reason, RecordError
from worker.contract.records import (
    HEADER_CONTENT_TYPE,
    HEADER_MODALITY,
    Event,
    OutRecord,
    RawRecord,
    SourceRef,
)
from worker.core.admission import Admission, StageRoom
from worker.core.assemble import Assembler, Incomplete
from worker.core.backpressure import Backpressure
from worker.core.batcher import Batcher
from worker.core.checkpoint import Checkpoint, Commit
from worker.core.deadletter import dead_letter
from worker.core.decode import Limits, decode_record
from worker.core.filters import EventFilter, Everything
from worker.core.inflight import InFlight
from worker.core.poison import PoisonBudget
from worker.core.retry import Retry
from worker.core.sensors import (
    Gauges,
    MetricsSensor,
    Outcomes,
    Sensor,
    Sensors,
    StatsSensor,
    WorkerStats,
)
from worker.core.sources import Checkpoints, GroupSource, Source
from worker.core.stage import BatchStage
from worker.core.streamtime import StreamTime
from worker.core.watchdog import Watchdog
from worker.edge.client import Clients, Consumer, Fenced
from worker.inference.model import ModelRunner
from worker.ops.metrics import WorkerMetrics

__all__ = ["Clock", "Worker", "WorkerStats", "inference_depth", "wall_ms"]

log = logging.getLogger(__name__)

#: Pause after a poll that failed with a retriable error, before the next turn.
POLL_RETRY_S = 0.2

Clock = Callable[[], int]
SourceFactory = Callable[[Consumer], Source]
AdmissionFactory = Callable[[BatchStage[Event]], Admission]


def inference_depth(config: WorkerConfig, provider: str) -> int:
    """``--inference-queue``, with -1 (auto) resolved: 2 on CUDA, 0 (inline) on CPU.

    Measured on 2 CPUs (docs/benchmarks.md): with ORT's intra-op threads on every core,
    an inference thread beside the poll thread only adds GIL and core contention
    (~10% fewer events/s); with the model on a GPU the CPU is free while a batch runs.
    """
    if config.inference_queue >= 0:
        return config.inference_queue
    return 2 if provider == "CUDAExecutionProvider" else 0


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True)
class _Ack:
    kind: str  # "prediction" or a dead-letter reason
    sources: tuple[SourceRef, ...]
    last_part_ms: int | None
    generation: int


class Worker:
    """Runs the loop until ``stop`` is set, ``max_events`` predictions are acknowledged,
    or a bounded source is exhausted and everything it gave is finished."""

    def __init__(
        self,
        config: WorkerConfig,
        runner: ModelRunner,
        clock: Clock = wall_ms,
        metrics: WorkerMetrics | None = None,
        *,
        clients: Clients,
        source: SourceFactory | None = None,
        events: EventFilter | None = None,
        admission: AdmissionFactory | None = None,
        sensors: Sequence[Sensor] = (),
    ) -> None:
        if config.on_incomplete == "infer" and not runner.manifest.accepts_missing:
            raise ConfigError(
                "--on-incomplete infer: the model's manifest does not say it accepts missing "
                "inputs (accepts_missing); use dlq or drop"
            )
        if config.assembly_timeout_ms == 0:
            log.warning(
                "--assembly-timeout-ms 0: incomplete events are held until they fill "
                "--max-pending-events/bytes, then pushed out oldest first (evicted_at_bound)"
            )
        self.config = config
        self.runner = runner
        self.clock = clock
        self.eos = config.guarantee == "exactly-once"
        self.stats = WorkerStats(provider=runner.info.provider)
        self.metrics = metrics or WorkerMetrics()
        self.metrics.set_provider(runner.info.provider)
        self.sensor = Sensors(
            [StatsSensor(self.stats, clock), MetricsSensor(self.metrics), *sensors]
        )
        # Exactly-once, outcomes count once their transaction commits (dropped on abort).
        self.outcomes = Outcomes(self.sensor, held=self.eos)
        self.limits = Limits(config.max_part_bytes, config.max_image_pixels)
        self.part_names = runner.required_parts
        self.assembler = Assembler(runner.required_parts)
        self.stream = StreamTime()
        self.batcher = Batcher(config.max_batch_size, config.max_batch_delay_ms)
        self.backpressure = Backpressure(config.max_pending_events, config.max_pending_bytes)
        self.in_flight = InFlight()  # outputs sent, not yet acknowledged: held too
        self.poison = PoisonBudget()
        self.watchdog = Watchdog(config.progress_timeout_s)
        # A member lost from its group that never rejoins (its coordinator gone for good, a
        # join refused without end) has no work waiting either: it is timed on its own.
        self.membership = Watchdog(config.progress_timeout_s)
        self.retry = Retry(config.progress_timeout_s, clock, sleep=self._retry_pause)
        self.events = events or Everything()
        self.clients = clients
        self.consumer = clients.consumer(config)
        try:
            self.producer = clients.producer(config)
        except BaseException:
            self.consumer.close()
            raise
        self.source = (source or _group_source(config))(self.consumer)
        self.checkpoint = Checkpoint(
            self.consumer,
            self.producer,
            exactly_once=self.eos,
            interval_ms=config.commit_interval_ms,
            owned=self.source.owned,
            retry=self.retry,
        )
        self.stage: BatchStage[Event] = BatchStage(
            self._infer, inference_depth(config, runner.info.provider), name="mmstream-infer"
        )
        self.admission = (admission or StageRoom)(self.stage)
        self.ready = threading.Event()
        # Delivery results arrive on the producer's thread; sources whose work is done
        # without an ack to wait for (exactly-once sends, the duplicates of a dead-lettered
        # event) from the inference thread.
        self._acks: queue.SimpleQueue[_Ack] = queue.SimpleQueue()
        self._failures: queue.SimpleQueue[tuple[int, BaseException]] = queue.SimpleQueue()
        self._done_q: queue.SimpleQueue[tuple[int, tuple[SourceRef, ...]]] = queue.SimpleQueue()
        self._flushed = False  # a bounded source's leftovers were expired at its end

    # ------------------------------------------------------------------ the loop

    def run(self, stop: threading.Event) -> WorkerStats:
        drained = False
        try:
            if self.eos:
                self.producer.init_transactions()
            self.source.join()
            c, m = self.config, self.runner.manifest
            log.info(
                "worker: %s -> %s (dlq %s), group %s, %s, model %s %s on %s",
                c.input_topic, c.output_topic, c.dlq_topic, c.group_id, c.guarantee,
                m.name, m.version, self.stats.provider,
            )  # fmt: skip
            while not stop.is_set() and not self._finished():
                self._step()
            self._drain()
            self._observe_gauges()  # also hands the last turn's counts to the sensors
            drained = True
        finally:
            self.stage.close(timeout_s=self.config.shutdown_timeout_s, discard=not drained)
            self.consumer.close()
            self.producer.close(timeout_s=5)
        log.info("worker stopped: %s", self.stats)
        return self.stats

    def _step(self) -> None:
        self.sensor.beat(time.time())
        self.stage.check()
        self._check_progress()
        pressure = self.backpressure.decide(
            self._pending_events() + self.in_flight.records,
            self.assembler.pending_bytes + self.in_flight.nbytes,
        )
        if pressure.pause:
            self.consumer.pause(self.consumer.assignment())  # also newly assigned ones
        elif pressure.resume:
            self.consumer.resume(self.source.resumable())
        records = self._poll(max(1, min(self.config.max_poll_records, pressure.room)))
        if self._apply_revocations():
            records = []  # fetched before the rewind: read again from the checkpoint
        if self.consumer.joined():
            self.ready.set()
        for i, raw in enumerate(records):
            if self._bytes_full():  # e.g. a poll of large poison records while acks lag
                self._put_back(records[i:])
                break
            if self.source.admits(raw):
                self._consume(raw)
        self.source.after_poll()
        self._expire()
        if pressure.pause:
            self._evict_at_bound()
        while self.batcher.ready(self.clock()) and self._may_submit(self._next_batch()):
            self._submit(self.batcher.take())
        self._settle()
        self._maybe_commit(force=False)
        self._observe_gauges()

    def _poll(self, max_records: int) -> list[RawRecord]:
        """The consumer's poll; a retriable failure (a broker refusing connections while
        the cluster fails over) is a turn without records, after a short pause: the
        progress watchdog still bounds how long work may wait."""
        try:
            return self.consumer.poll(timeout_ms=self._poll_timeout_ms(), max_records=max_records)
        except BrokerError as exc:
            if not exc.retriable:
                raise
            log.warning("poll failed, retrying: %s", exc)
            time.sleep(POLL_RETRY_S)
            return []

    def _check_progress(self) -> None:
        now_s, limit = self.clock() / 1000, self.config.progress_timeout_s
        if self.watchdog.check(now_s, self._work_waiting) and self.watchdog.expired(now_s):
            raise BrokerError(
                f"no commit or transaction completed in {self.watchdog.stalled_s(now_s):.0f} s "
                f"while work waited (--progress-timeout-s {limit:g}): "
                "the Kafka client is not recovering; stopping so that the worker is restarted"
            )
        if self.membership.check(now_s, self._out_of_group) and self.membership.expired(now_s):
            raise BrokerError(
                f"out of consumer group {self.config.group_id!r} for "
                f"{self.membership.stalled_s(now_s):.0f} s (--progress-timeout-s {limit:g}): "
                "the Kafka client is not rejoining; stopping so that the worker is restarted"
            )

    def _retry_pause(self, pause_s: float) -> None:
        # Retrying within --progress-timeout-s is the loop at work, not stuck: /healthz's
        # --stall-timeout-s must not restart it first.
        time.sleep(pause_s)
        self.sensor.beat(time.time())

    def _out_of_group(self) -> bool:
        return not self.consumer.in_group()

    def _work_waiting(self) -> bool:
        return self.in_flight.records > 0 or self.checkpoint.waiting()

    def _bytes_full(self) -> bool:
        held = self.assembler.pending_bytes + self.in_flight.nbytes
        return held >= self.config.max_pending_bytes

    def _put_back(self, records: Sequence[RawRecord]) -> None:
        """Records polled but not taken: seek back to them (fetched again once room frees)."""
        first: dict[tuple[str, int], int] = {}
        for raw in records:
            tp = (raw.source.topic, raw.source.partition)
            first[tp] = min(first.get(tp, raw.source.offset), raw.source.offset)
        assigned = self.consumer.assignment()
        for tp, offset in first.items():
            if tp in assigned:
                self.consumer.seek(tp, offset)

    def _finished(self) -> bool:
        if 0 < self.config.max_events <= self.stats.predicted:
            return True
        return self._flushed and self._pending_events() == 0 and self.checkpoint.open_records() == 0

    def _drain(self) -> None:
        """Finish what was assembled: run pending batches, wait for acks, commit."""
        while len(self.batcher):
            self._submit(self.batcher.take())
        self.stage.wait_idle()
        self.stage.check()
        if not self.eos:
            try:
                self.producer.flush(timeout_s=self.config.shutdown_timeout_s)
            except BrokerError as exc:
                log.error("flush at shutdown failed: %s", exc)
        self._settle()
        self._maybe_commit(force=True)
        self._settle()

    # ------------------------------------------------------------------ turns' pieces

    def _next_batch(self) -> int:
        return min(len(self.batcher), self.batcher.max_size)

    def _may_submit(self, events: int) -> bool:
        """Admission says yes, and the outputs in flight leave room for this batch's (a
        batch still goes when nothing is in flight, so a bound below a batch cannot stall)."""
        c, held = self.config, self.in_flight
        full = held.records > 0 and (
            held.records + events > c.max_pending_events or held.nbytes >= c.max_pending_bytes
        )
        return not full and self.admission.admits(events)

    def _poll_timeout_ms(self) -> int:
        """Never past the next batch deadline (at most 100 ms), so partial batches leave on
        time; a ready batch that may not go yet waits as long as admission says."""
        wait = self.batcher.wait_ms(self.clock())
        timeout = 100 if wait is None else min(wait, 100)
        if timeout == 0 and not self._may_submit(self._next_batch()):
            timeout = self.admission.wait_ms(self._next_batch())
        return timeout

    def _consume(self, raw: RawRecord) -> None:
        # Label only with the model's part names: header values are producer-controlled,
        # and a label per arbitrary value would grow the metric series without bound.
        modality = (raw.header(HEADER_MODALITY) or b"").decode("utf-8", "replace")
        self.sensor.consumed(modality if modality in self.part_names else "unknown")
        src = raw.source
        if self.config.assembly_timeout_ms > 0:
            stream_ms = self.stream.observe(src.partition, src.timestamp_ms, self.clock())
            self._expire_partition(src.partition, stream_ms)
        if self.checkpoint.track(raw.source):
            self.sensor.skipped_finished()  # predicted before the last restart
            return
        try:
            part = decode_record(raw, self.runner.manifest, self.limits)
        except RecordError as err:
            self._dead_letter(raw, err.reason, str(err))
            return
        duplicates = self.assembler.duplicate_parts
        event = self.assembler.add(part, self.clock())
        if self.assembler.duplicate_parts > duplicates:
            self.sensor.duplicate_part()
        if event is not None:
            self.sensor.completed()
            self._batch(event)

    def _batch(self, event: Event) -> None:
        """Queue an event for inference, or finish it without output outside the filter."""
        if self.events.accepts(event.last_part_ms):
            self.batcher.add(event, self.clock())
        else:
            self.outcomes.outside_window()
            self.checkpoint.done(event.sources)

    def _expire(self) -> None:
        """Expire in stream time; a partition read to its end also advances with the wall
        clock (parts that never come still time out when nothing more is written)."""
        if not self._flushed and self.source.exhausted():
            # A bounded source at its ends: no more parts will come for what is pending.
            self._flushed = True
            for inc in self.assembler.expire_all():
                self._incomplete(inc)
            return
        if self.config.assembly_timeout_ms <= 0:
            return
        now, topic, paused = self.clock(), self.config.input_topic, self.consumer.paused()
        for p in self.assembler.partitions():
            tp = (topic, p)
            if tp not in paused and self.consumer.caught_up(tp):
                self._expire_partition(p, self.stream.idle(p, now))
            else:
                self.stream.busy(p)

    def _expire_partition(self, partition: int, stream_ms: int) -> None:
        for inc in self.assembler.expire(partition, stream_ms, self.config.assembly_timeout_ms):
            self._incomplete(inc)

    def _evict_at_bound(self) -> None:
        """Fetching is paused at the bound and only incomplete events hold it: stream time
        cannot move, so push out the oldest until fetching may resume."""
        if len(self.batcher) or self.stage.pending_items or self.in_flight.records:
            return  # these finish on their own and free the room
        bp, asm = self.backpressure, self.assembler
        while len(asm) and not bp.below_resume(len(asm), asm.pending_bytes):
            inc = asm.evict_oldest()
            if inc is None:
                break
            self._incomplete(inc, evicted=True)

    def _incomplete(self, inc: Incomplete, *, evicted: bool = False) -> None:
        """The event filter decides whose it is; this run's follow ``--on-incomplete``."""
        if not self.events.accepts(max(p.source.timestamp_ms for p in inc.parts.values())):
            self.outcomes.outside_window()
            self.checkpoint.done(p.source for p in inc.all_parts)
            return
        action = self.config.on_incomplete
        if evicted:
            self.outcomes.evicted(action)
        else:
            self.outcomes.incomplete(action)
        if action == "infer":
            self._batch(inc.as_event(self.clock()))
        elif action == "dlq":
            if evicted:
                reason = Reason.EVICTED_AT_BOUND
                detail = (
                    f"event {inc.event_id!r} still lacked {list(inc.missing)} when the pending "
                    f"bound (--max-pending-events {self.config.max_pending_events}, "
                    f"--max-pending-bytes {self.config.max_pending_bytes}) was full of "
                    "incomplete events: its parts are farther apart in the log than the bound holds"
                )
            else:
                reason = Reason.INCOMPLETE_EVENT
                detail = (
                    f"event {inc.event_id!r} still lacks {list(inc.missing)}: its partition's "
                    f"stream time passed its first part's timestamp + "
                    f"{self.config.assembly_timeout_ms} ms"
                )
            for part in inc.all_parts:
                raw = part.raw or RawRecord(part.source, inc.event_id.encode(), b"", ())
                self._dead_letter(raw, reason, detail)
        else:  # drop: the operator's explicit choice; counted and logged
            log.info("dropping incomplete event %r (lacks %s)", inc.event_id, list(inc.missing))
            self.checkpoint.done(p.source for p in inc.all_parts)

    def _submit(self, events: Sequence[Event]) -> None:
        """Hand a batch to inference (exactly-once: inside the transaction)."""
        self.checkpoint.sending()
        self.admission.submitted(len(events))
        self.stage.submit(events)

    # ------------------------------------------------------------------ inference thread

    def _infer(self, events: Sequence[Event]) -> None:
        """Run ORT on a batch and publish each event; split a failing batch to isolate
        the poison event, which is dead-lettered."""
        started = time.perf_counter()
        try:
            preds = self.runner.predict(events, self.clock)
        except InferenceError as err:
            if len(events) > 1:
                mid = len(events) // 2
                self._infer(events[:mid])
                self._infer(events[mid:])
            elif self.poison.failed_alone():
                # Every event fails alone: the model or the device is broken, not the
                # input. Stop before dead-lettering the whole stream; nothing past the
                # last commit is lost (a restart re-reads it).
                raise InferenceError(
                    f"ONNX Runtime failed on {self.poison.streak} events in a row, each "
                    f"alone: stopping (last error: {err})"
                ) from err
            else:
                self._dead_letter_event(events[0], str(err))
            return
        self.poison.succeeded()
        self.sensor.batch(len(events), time.perf_counter() - started)
        model = self.runner.model_ref
        headers = ((HEADER_CONTENT_TYPE, b"application/json"),)
        for event, pred in zip(events, preds, strict=True):
            value = orjson.dumps(pred.to_json_dict(model))
            record = OutRecord(self.config.output_topic, event.event_id.encode(), value, headers)
            self._send(record, "prediction", event.sources, event.last_part_ms)

    def _dead_letter(self, raw: RawRecord, reason: Reason, detail: str) -> None:
        log.warning("dead-letter %s: %s: %s", raw.source, reason.value, detail)
        record = dead_letter(self.config.dlq_topic, raw, reason, detail)
        self._send(record, reason.value, (raw.source,), None)

    def _dead_letter_event(self, event: Event, detail: str) -> None:
        for part in event.parts.values():
            raw = part.raw or RawRecord(part.source, event.event_id.encode(), b"", ())
            self._dead_letter(raw, Reason.INFERENCE_ERROR, detail)
        self._done_q.put((self.checkpoint.generation, event.duplicates))

    def _send(
        self,
        record: OutRecord,
        kind: str,
        sources: tuple[SourceRef, ...],
        last_part_ms: int | None,
    ) -> None:
        # Exactly-once: the loop opened the transaction before handing out work, and
        # commits it only once the inference thread is idle.
        self.checkpoint.sending()
        gen = self.checkpoint.generation
        ack = _Ack(kind, sources, last_part_ms, gen)
        nbytes = record.nbytes
        held = self.in_flight

        def acked() -> None:
            held.settled(gen, nbytes)
            self._acks.put(ack)

        def failed(exc: BaseException) -> None:
            held.settled(gen, nbytes)
            self._failures.put((gen, exc))

        held.sent(gen, nbytes)
        try:
            self.producer.send(record, on_ack=acked, on_error=failed)
        except BaseException:
            held.settled(gen, nbytes)
            raise
        if self.eos:  # committed atomically with the offsets, or aborted with them
            self._done_q.put((gen, sources))

    # ------------------------------------------------------------------ settle, commit

    def _settle(self) -> None:
        """Apply results from the producer's and the inference thread (loop thread only)."""
        gen = self.checkpoint.generation
        while not self._done_q.empty():
            g, sources = self._done_q.get()
            if g == gen:
                self.checkpoint.done(sources)
        while not self._failures.empty():
            g, exc = self._failures.get()
            if g != gen:
                continue  # a send of an aborted transaction
            if isinstance(exc, BrokerError) and not exc.retriable:
                # Not authorized, too large, ...: retrying (or aborting and redoing the
                # transaction) cannot help; stop with the cause, nothing of it committed.
                raise BrokerError(f"a record was refused by the broker: {exc}", retriable=False)
            if self.eos:
                log.warning("send failed inside a transaction (%s): aborting", exc)
                self._abort_and_rewind()
                return
            raise BrokerError(f"a record was not acknowledged by the broker: {exc}")
        now = self.clock()
        while not self._acks.empty():
            ack = self._acks.get()
            if ack.generation != gen:
                continue
            if not self.eos:
                self.checkpoint.done(ack.sources)
            if ack.kind == "prediction":
                latency = None
                if ack.last_part_ms is not None:
                    latency = max(0.0, (now - ack.last_part_ms) / 1000.0)
                self.outcomes.predicted(latency)
            else:
                self.outcomes.dead_lettered(ack.kind)

    def _maybe_commit(self, force: bool) -> None:
        now = self.clock()
        if not force and not self.checkpoint.due(now):
            return
        if self.eos:
            # Everything sent in this transaction must be known before its offsets are.
            self.stage.wait_idle()
            self.stage.check()
            self._settle()
            if self.consumer.revocation_pending():
                # A revocation landed since the poll (callbacks run on the client's
                # thread): this transaction may hold outputs of a partition we lost.
                self._apply_revocations()
                return
        result = self.checkpoint.commit(now)
        if result is Commit.MUST_ABORT:
            self._abort_and_rewind()
        elif result is not Commit.IDLE:
            self.sensor.commit(result is Commit.COMMITTED)
            if result is Commit.COMMITTED:
                self.watchdog.progressed()
            if result is Commit.COMMITTED and self.eos:
                # Committing flushed the transaction's last sends: take their acks first,
                # so that every outcome of this transaction counts with it.
                self._settle()
                self.sensor.transaction("committed")
                self.outcomes.commit()

    def _abort_and_rewind(self) -> None:
        """Exactly-once: abort the open transaction and re-read from the checkpoints."""
        self.stage.wait_idle()  # its sends belong to the transaction being aborted
        try:
            self.checkpoint.abort()
        except Fenced:
            raise  # a newer instance took over: this one stops
        except BrokerError as exc:
            self._rebuild_producer(exc)
        self.in_flight.reset(self.checkpoint.generation)
        self.outcomes.discard()
        self.sensor.transaction("aborted")
        self.assembler.clear()
        self.stream.clear()
        self.batcher.clear()
        self._flushed = False
        self.checkpoint.restart_from(self._rewind())
        log.info("transaction aborted; rewound %d partitions", len(self.consumer.assignment()))

    def _rewind(self) -> Checkpoints:
        """The source back to its checkpoints. Reading them needs the group coordinator: a
        cluster still failing over (no quorum, the coordinator moving) is waited out, as
        a poll is, within --progress-timeout-s; then the worker stops to be restarted."""
        return self.retry.call("rewinding to the checkpoints", self.source.rewind)

    def _rebuild_producer(self, cause: BrokerError) -> None:
        """The producer can neither commit nor abort (it lost its coordinator): replace it.
        The new one's ``init_transactions`` fences the old and has the broker abort its
        transaction; if that fails too, the worker stops (the watchdog bounds repeats)."""
        log.warning("the transactional producer is stuck (%s): replacing it", cause)

        def replace() -> None:
            # Each try closes the one before (the stuck one, then a new one that could not
            # initialise yet: no controller quorum, no producer id) and makes another.
            self.producer.close(timeout_s=1)
            self.producer = self.clients.producer(self.config)
            self.producer.init_transactions()

        self.retry.call("initialising a new transactional producer", replace)
        self.checkpoint.replace_producer(self.producer)
        self.sensor.transaction("rebuilt")

    def _apply_revocations(self) -> bool:
        """Apply revocations; True if the partitions were rewound (exactly-once)."""
        rewound = False
        for revoked in self.consumer.revocations():
            self.sensor.rebalance()
            if self.eos:
                # Outputs in the open transaction may belong to revoked partitions: abort it
                # and rewind the partitions we keep. Nothing of it becomes visible.
                self._abort_and_rewind()
                rewound = True
                continue
            parts = {p for _, p in revoked}
            dropped = self.assembler.drop_partitions(parts) + self.batcher.drop_partitions(parts)
            self.stream.forget(parts)
            self.checkpoint.forget(set(revoked))
            if dropped:
                log.info(
                    "revoked %s: dropped %d pending events (the new owner re-reads them)",
                    sorted(revoked),
                    dropped,
                )
        return rewound

    # ------------------------------------------------------------------ gauges

    def _pending_events(self) -> int:
        """Events held: waiting for parts, a batch or inference."""
        return len(self.assembler) + len(self.batcher) + self.stage.pending_items

    def _observe_gauges(self) -> None:
        self.sensor.gauges(
            Gauges(
                pending_events=self._pending_events(),
                pending_bytes=self.assembler.pending_bytes,
                unacked_outputs=self.in_flight.records,
                unacked_output_bytes=self.in_flight.nbytes,
                paused_partitions=len(self.consumer.paused()),
                assigned_partitions=len(self.source.owned()),
                uncommitted_records=self.checkpoint.uncommitted(),
                out_of_group_s=self.membership.stalled_s(self.clock() / 1000),
            )
        )


def _group_source(config: WorkerConfig) -> SourceFactory:
    def make(consumer: Consumer) -> Source:
        return GroupSource(consumer, config.input_topic, config.auto_offset_reset)

    return make
