"""The worker's pipeline, in one place:

    consume -> decode -> assemble -> batch -> infer -> publish -> commit

* consume: ``KafkaConsumer.poll`` (auto-commit off, cooperative-sticky). Each
  record is tracked as open in the :class:`~worker.core.offsets.OffsetTracker`;
  records the last commit's metadata lists as already finished are skipped.
  While the held events or bytes are at their bound, fetching is paused (the
  loop keeps polling, so the consumer stays in its group).
* decode: :func:`~worker.core.decode.decode_record` -> a part, or a dead-letter
  record with a reason code.
* assemble: :class:`~worker.core.assemble.Assembler` -> complete events. Events
  still incomplete after ``assembly_timeout_ms`` are dead-lettered, dropped
  (counted) or inferred with blank inputs, as ``on_incomplete`` says.
* batch: :class:`~worker.core.batcher.Batcher` -> batches of up to ``max_batch_size``,
  released when full or when the oldest event waited ``max_batch_delay_ms``.
* infer: :class:`~worker.inference.model.ModelRunner` (ONNX Runtime), on the inference
  thread (:class:`~worker.core.stage.BatchStage`, ``inference_queue`` batches deep),
  so that inference and publishing overlap the next poll and decode. A batch
  that makes ORT fail is split in halves until the poison event is isolated; it
  goes to the dead-letter topic and the rest are predicted.
* publish: one prediction per event (acks=all), sent from the inference thread;
  delivery callbacks hand the acknowledgements back to the loop.
* commit, at-least-once: a record's offset is done when every output depending
  on it is acknowledged; every ``commit_interval_ms`` the safe positions (plus
  the offsets finished beyond them, in the metadata) are committed.
* commit, exactly-once: outputs and offsets go in one Kafka transaction per
  commit interval (``send_offsets_to_transaction``). Any failure, or a
  revocation, aborts it and rewinds every partition to its committed position,
  so read_committed readers see each prediction once.

In at-least-once mode a delivery that the broker does not acknowledge stops
the worker with :class:`BrokerError` before anything beyond it is committed.

Threads: the loop (``run``) owns the consumer, the assembler, the batcher and
the offset tracker; nothing else touches them. The inference thread runs
``_infer`` (ORT, ``producer.send``, which is thread-safe) and reports back only
through queues: delivery acks and failures (from the producer's IO thread), and
in exactly-once mode the sources of what it sent. The loop waits for the
inference thread to go idle before it commits or aborts a transaction and
before it exits, so no send can straddle a transaction boundary.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from kafka.errors import CommitFailedError, KafkaError, RebalanceInProgressError

from worker.config import WorkerConfig
from worker.contract.errors import BrokerError, ConfigError, InferenceError, Reason, RecordError
from worker.contract.records import (
    HEADER_CONTENT_TYPE,
    HEADER_ERROR,
    HEADER_ERROR_DETAIL,
    HEADER_MODALITY,
    HEADER_SOURCE,
    Event,
    Prediction,
    RawRecord,
    SourceRef,
)
from worker.core.assemble import Assembler, Incomplete
from worker.core.batcher import Batcher
from worker.core.decode import Limits, decode_record
from worker.core.offsets import OffsetTracker
from worker.core.stage import BatchStage
from worker.edge.kafka_io import (
    QueueingListener,
    committed,
    make_consumer,
    make_producer,
    to_offsets,
    to_raw,
)
from worker.inference.model import ModelRunner
from worker.ops.metrics import WorkerMetrics

log = logging.getLogger(__name__)

Clock = Callable[[], int]
#: Resume fetching once held events/bytes fall below this share of their bound.
RESUME_AT = 0.8
#: Dead-letter values are cut to this size (Kafka's default message limit is ~1 MB).
DLQ_MAX_VALUE_BYTES = 512 * 1024
HEADER_VALUE_TRUNCATED = "mm-value-truncated"
#: More single events than this failing in a row means a broken model or device.
MAX_POISON_STREAK = 8


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
    commits: int = 0
    aborts: int = 0
    provider: str = ""
    first_consumed_ms: int | None = None
    last_acked_ms: int | None = None


@dataclass(frozen=True)
class _Ack:
    kind: str  # "prediction" or a dead-letter reason
    sources: tuple[SourceRef, ...]
    last_part_ms: int | None
    generation: int


class Worker:
    """Runs the pipeline until ``stop`` is set or ``max_events`` predictions are acknowledged."""

    def __init__(
        self,
        config: WorkerConfig,
        runner: ModelRunner,
        clock: Clock = wall_ms,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        if config.on_incomplete == "infer" and not runner.manifest.accepts_missing:
            raise ConfigError(
                "--on-incomplete infer: the model's manifest does not say it accepts missing "
                "inputs (accepts_missing); use dlq or drop"
            )
        self.config = config
        self.runner = runner
        self.clock = clock
        self.metrics = metrics or WorkerMetrics()
        self.metrics.set_provider(runner.info.provider)
        self.eos = config.guarantee == "exactly-once"
        self.limits = Limits(config.max_part_bytes, config.max_image_pixels)
        self.assembler = Assembler(runner.required_inputs)
        self.batcher = Batcher(config.max_batch_size, config.max_batch_delay_ms)
        self.tracker = OffsetTracker()
        self.stats = WorkerStats(provider=runner.info.provider)
        self.listener = QueueingListener()
        # Delivery results arrive on the producer's IO thread.
        self._acks: queue.SimpleQueue[_Ack] = queue.SimpleQueue()
        self._failures: queue.SimpleQueue[tuple[int, BaseException]] = queue.SimpleQueue()
        # Sources whose work is done without an ack to wait for (exactly-once sends, the
        # duplicates of a dead-lettered event), reported by the inference thread.
        self._done_q: queue.SimpleQueue[tuple[int, tuple[SourceRef, ...]]] = queue.SimpleQueue()
        self._generation = 0  # bumped by every abort: late callbacks of aborted sends are ignored
        self._in_txn = False
        self._paused = False
        self._poison_streak = 0
        self._last_commit_ms = 0
        self.consumer = make_consumer(config)
        extra: dict[str, Any] = dict(config.kafka_security())
        if self.eos:
            extra["transactional_id"] = config.transactional_id
        self.producer = make_producer(config.bootstrap_servers, config.client_id, **extra)
        self.ready = threading.Event()
        if config.assembly_timeout_ms == 0:
            log.warning(
                "--assembly-timeout-ms 0: incomplete events are held forever; if they fill "
                "--max-pending-events the worker pauses and cannot resume"
            )
        self._input_names = frozenset(i.name for i in runner.manifest.inputs)
        self.stage: BatchStage[Event] = BatchStage(
            self._infer, inference_depth(config, runner.info.provider), name="mmstream-infer"
        )

    # ------------------------------------------------------------------ loop

    def run(self, stop: threading.Event) -> WorkerStats:
        c = self.config
        drained = False
        try:
            if self.eos:
                self.producer.init_transactions()
            self._join()
            log.info(
                "worker: %s -> %s (dlq %s), group %s, %s, model %s %s on %s",
                c.input_topic,
                c.output_topic,
                c.dlq_topic,
                c.group_id,
                c.guarantee,
                self.runner.manifest.name,
                self.runner.manifest.version,
                self.stats.provider,
            )
            while not stop.is_set() and not self._done():
                self._step()
            self._drain()
            drained = True
        except KafkaError as exc:
            raise BrokerError(f"Kafka failed: {exc!r}") from exc
        finally:
            self.stage.close(timeout_s=self.config.shutdown_timeout_s, discard=not drained)
            self.consumer.close(autocommit=False)
            self.producer.close(timeout=5)
        log.info("worker stopped: %s", self.stats)
        return self.stats

    # ------------------------------------------------------------------ hooks
    # The live worker's choices; mmstream replay (worker/backfill/replay.py) overrides them.

    def _join(self) -> None:
        """Start consuming: join the group on the input topic."""
        self.consumer.subscribe([self.config.input_topic], listener=self.listener)
        self._await_topic_metadata()

    def _owned(self) -> set[tuple[str, int]]:
        """Partitions whose offsets this worker may commit."""
        return self.listener.assigned

    def _admit(self, raw: RawRecord) -> bool:
        """Whether a polled record is input at all (replay: inside its offset range)."""
        return True

    def _accept(self, event: Event) -> bool:
        """Whether a complete event is predicted (replay: its time window); an event
        not accepted is finished as it is, without output."""
        return True

    def _can_submit(self, events: int) -> bool:
        """Whether a batch of ``events`` may go to inference now (replay: ``--rate``)."""
        return self.stage.has_room()

    def _after_poll(self) -> None:
        """Called once per loop turn after the polled records are consumed."""

    def _seed(self, tp: tuple[str, int]) -> tuple[int | None, str]:
        """The committed position and metadata a partition's offset tracking starts from."""
        return committed(self.consumer, tp)

    def _rewind(self) -> None:
        """After an abort: every partition back to its committed position."""
        for tp in self.consumer.assignment():
            pos, _meta = committed(self.consumer, (tp.topic, tp.partition))
            if pos is None:
                if self.config.auto_offset_reset == "earliest":
                    self.consumer.seek_to_beginning(tp)
                else:
                    self.consumer.seek_to_end(tp)
            else:
                self.consumer.seek(tp, pos)

    def _resumable(self) -> set[Any]:
        """Paused partitions that backpressure may resume (replay keeps finished ones paused)."""
        return set(self.consumer.paused())

    def _blocked_wait_ms(self) -> int:
        """How long to poll while a ready batch may not be submitted yet."""
        return 2

    # ------------------------------------------------------------------ loop turns

    def _await_topic_metadata(self, timeout_s: float = 30.0) -> None:
        """Know the input topic's partitions before joining: a group leader without them
        assigns nothing and, in kafka-python, may not rejoin until the next metadata refresh."""
        deadline = time.monotonic() + timeout_s
        while not self.consumer.partitions_for_topic(self.config.input_topic):
            if time.monotonic() > deadline:
                log.warning("no metadata for %s after %.0f s", self.config.input_topic, timeout_s)
                return
            time.sleep(0.1)

    def _step(self) -> None:
        self.metrics.beat(time.time())
        self.stage.check()
        room = self._backpressure()
        wait = self.batcher.wait_ms(self.clock())
        timeout = 100 if wait is None else min(wait, 100)
        if timeout == 0 and not self._can_submit(min(len(self.batcher), self.batcher.max_size)):
            timeout = self._blocked_wait_ms()  # a batch waits (inference thread, --rate)
        polled = self.consumer.poll(
            timeout_ms=timeout, max_records=max(1, min(self.config.max_poll_records, room))
        )
        if self._handle_revocations():
            polled = {}  # fetched before the rewind: they are read again from the commit
        if self.listener.joined or self.consumer.assignment():
            self.ready.set()
        for records in polled.values():
            for rec in records:
                raw = to_raw(rec)
                if self._admit(raw):
                    self._consume(raw)
        self._after_poll()
        self._expire()
        while self.batcher.ready(self.clock()) and self._can_submit(
            min(len(self.batcher), self.batcher.max_size)
        ):
            self._submit(self.batcher.take())
        self._settle()
        self._maybe_commit(force=False)
        self._update_gauges()

    def _done(self) -> bool:
        return 0 < self.config.max_events <= self.stats.predicted

    def _drain(self) -> None:
        """Finish what was assembled: run pending batches, wait for acks, commit."""
        while len(self.batcher):
            self._submit(self.batcher.take())
        self.stage.wait_idle()
        self.stage.check()
        if not self.eos:
            try:
                self.producer.flush(timeout=self.config.shutdown_timeout_s)
            except KafkaError as exc:
                log.error("flush at shutdown failed: %s", exc)
        self._settle()
        self._maybe_commit(force=True)
        self._settle()

    # ------------------------------------------------------------------ stages

    def _consume(self, raw: RawRecord) -> None:
        src = raw.source
        tp = (src.topic, src.partition)
        now = self.clock()
        self.stats.consumed += 1
        if self.stats.first_consumed_ms is None:
            self.stats.first_consumed_ms = now
        if not self.tracker.known(tp):
            self.tracker.seed(tp, *self._seed(tp))
        self.tracker.track(tp, src.offset)
        # Label only with the model's input names: header values are producer-controlled,
        # and a label per arbitrary value would grow the metric series without bound.
        modality = (raw.header(HEADER_MODALITY) or b"").decode("utf-8", "replace")
        self.metrics.records_consumed.labels(
            modality if modality in self._input_names else "unknown"
        ).inc()
        if self.tracker.finished_before(tp, src.offset):
            # Its event was predicted before the last restart (commit metadata says so).
            self.stats.skipped_finished += 1
            self.tracker.done(tp, src.offset)
            return
        try:
            part = decode_record(raw, self.runner.manifest, self.limits)
        except RecordError as err:
            self._dead_letter(raw, err.reason, str(err))
            return
        event = self.assembler.add(part, now)
        if self.assembler.duplicate_parts > self.stats.duplicate_parts:
            self.metrics.duplicate_parts.inc(
                self.assembler.duplicate_parts - self.stats.duplicate_parts
            )
            self.stats.duplicate_parts = self.assembler.duplicate_parts
        if event is not None:
            self.metrics.events_completed.inc()
            self._batch(event, now)

    def _batch(self, event: Event, now: int) -> None:
        """Queue an event for inference, or finish it without output if not accepted."""
        if self._accept(event):
            self.batcher.add(event, now)
        else:
            self._mark_done(event.sources)

    def _expire(self) -> None:
        timeout = self.config.assembly_timeout_ms
        if timeout <= 0:
            return
        now = self.clock()
        for inc in self.assembler.expire(now, timeout):
            self._incomplete(inc, now)

    def _incomplete(self, inc: Incomplete, now: int) -> None:
        action = self.config.on_incomplete
        self.stats.incomplete += 1
        self.metrics.events_incomplete.labels(action).inc()
        detail = (
            f"event {inc.event_id!r} still lacks {list(inc.missing)} "
            f"{self.config.assembly_timeout_ms} ms after its first part"
        )
        if action == "infer":
            event = Event(
                event_id=inc.event_id,
                partition=inc.partition,
                parts=inc.parts,
                first_seen_ms=inc.first_seen_ms,
                completed_ms=now,
                duplicates=tuple(p.source for p in inc.duplicates),
                missing=inc.missing,
            )
            self._batch(event, now)
        elif action == "dlq":
            for part in inc.all_parts:
                raw = part.raw or RawRecord(part.source, inc.event_id.encode(), b"", ())
                self._dead_letter(raw, Reason.INCOMPLETE_EVENT, detail)
        else:  # drop: the operator's explicit choice; counted and logged
            log.info("dropping incomplete %s", detail)
            self._mark_done(tuple(p.source for p in inc.all_parts))

    def _submit(self, events: Sequence[Event]) -> None:
        """Hand a batch to the inference thread (exactly-once: inside a transaction)."""
        if self.eos and not self._in_txn:
            self.producer.begin_transaction()
            self._in_txn = True
        self.stage.submit(events)

    def _infer(self, events: Sequence[Event]) -> None:
        """Inference thread: run ORT on a batch and publish (or dead-letter) each event."""
        started = time.perf_counter()
        try:
            preds = self.runner.predict(events, self.clock)
        except InferenceError as err:
            if len(events) == 1:
                self._poison_streak += 1
                if self._poison_streak > MAX_POISON_STREAK:
                    # Every event fails alone: the model or the device is broken, not the
                    # input. Stop before dead-lettering the whole stream; nothing past the
                    # last commit is lost (a restart re-reads it).
                    raise InferenceError(
                        f"ONNX Runtime failed on {self._poison_streak} events in a row, each "
                        f"alone: stopping (last error: {err})"
                    ) from err
                self._dead_letter_event(events[0], str(err))
            else:  # split to isolate the poison event
                mid = len(events) // 2
                self._infer(events[:mid])
                self._infer(events[mid:])
            return
        self._poison_streak = 0
        self.metrics.inference_seconds.observe(time.perf_counter() - started)
        self.metrics.batch_size.observe(len(events))
        self.stats.batches += 1
        for event, pred in zip(events, preds, strict=True):
            self._publish(event, pred)

    def _publish(self, event: Event, pred: Prediction) -> None:
        value = json.dumps(pred.to_json_dict(self.runner.model_ref), separators=(",", ":")).encode()
        headers = [(HEADER_CONTENT_TYPE, b"application/json")]
        self._send(
            self.config.output_topic,
            event.event_id.encode(),
            value,
            headers,
            "prediction",
            event.sources,
            event.last_part_ms,
        )

    def _dead_letter(self, raw: RawRecord, reason: Reason, detail: str) -> None:
        log.warning("dead-letter %s: %s: %s", raw.source, reason.value, detail)
        drop = (HEADER_ERROR, HEADER_ERROR_DETAIL, HEADER_SOURCE)
        headers = [(k, v) for k, v in raw.headers if k.lower() not in drop]
        headers += [
            (HEADER_ERROR, reason.value.encode()),
            (HEADER_ERROR_DETAIL, detail.encode("utf-8", "replace")[:4000]),
            (HEADER_SOURCE, str(raw.source).encode()),
        ]
        value = raw.value
        if value is not None and len(value) > DLQ_MAX_VALUE_BYTES:
            # Keep the dead-letter record under the broker's message size; the original
            # stays on the input topic at mm-source until retention.
            headers.append((HEADER_VALUE_TRUNCATED, str(len(value)).encode()))
            value = value[:DLQ_MAX_VALUE_BYTES]
        self._send(
            self.config.dlq_topic, raw.key, value, headers, reason.value, (raw.source,), None
        )

    def _dead_letter_event(self, event: Event, detail: str) -> None:
        for part in event.parts.values():
            raw = part.raw or RawRecord(part.source, event.event_id.encode(), b"", ())
            self._dead_letter(raw, Reason.INFERENCE_ERROR, detail)
        self._done_q.put((self._generation, event.duplicates))

    def _send(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: list[tuple[str, bytes]],
        kind: str,
        sources: tuple[SourceRef, ...],
        last_part_ms: int | None,
    ) -> None:
        # Exactly-once: the loop began the transaction before handing out work (_submit,
        # _dead_letter from the loop), and commits it only once the inference thread is idle.
        if self.eos and not self._in_txn:
            self.producer.begin_transaction()
            self._in_txn = True
        try:
            future = self.producer.send(topic, key=key, value=value, headers=headers)
        except KafkaError as exc:
            raise BrokerError(f"cannot send to {topic}: {exc}") from exc
        if self.eos:
            # Committed atomically with the offsets, or aborted with them.
            self._done_q.put((self._generation, sources))
        ack = _Ack(kind, sources, last_part_ms, self._generation)
        future.add_callback(lambda _md: self._acks.put(ack))
        gen = self._generation
        future.add_errback(lambda exc: self._failures.put((gen, exc)))

    # ------------------------------------------------------------------ commit

    def _mark_done(self, sources: tuple[SourceRef, ...]) -> None:
        for s in sources:
            self.tracker.done((s.topic, s.partition), s.offset)

    def _settle(self) -> None:
        """Apply results from the producer's and the inference thread (loop thread only)."""
        while not self._done_q.empty():
            gen, sources = self._done_q.get()
            if gen == self._generation:
                self._mark_done(sources)
        while not self._failures.empty():
            gen, exc = self._failures.get()
            if gen != self._generation:
                continue  # a send of an aborted transaction
            if self.eos:
                log.warning("send failed inside a transaction (%s): aborting", exc)
                self._abort_and_rewind()
                return
            raise BrokerError(f"a record was not acknowledged by the broker: {exc}")
        now = self.clock()
        while not self._acks.empty():
            ack = self._acks.get()
            if ack.generation != self._generation:
                continue
            if not self.eos:
                self._mark_done(ack.sources)
            self.stats.last_acked_ms = now
            if ack.kind == "prediction":
                self.stats.predicted += 1
                self.metrics.predictions.inc()
                if ack.last_part_ms is not None:
                    self.metrics.end_to_end_seconds.observe(
                        max(0.0, (now - ack.last_part_ms) / 1000.0)
                    )
            else:
                self.stats.dead_lettered[ack.kind] = self.stats.dead_lettered.get(ack.kind, 0) + 1
                self.metrics.dead_letters.labels(ack.kind).inc()

    def _maybe_commit(self, force: bool) -> None:
        now = self.clock()
        if not force and now - self._last_commit_ms < self.config.commit_interval_ms:
            return
        self._last_commit_ms = now
        if self.eos:
            # Everything sent in this transaction must be known before its offsets are.
            self.stage.wait_idle()
            self.stage.check()
            self._settle()
        positions = {tp: pm for tp, pm in self.tracker.committable().items() if tp in self._owned()}
        if self.eos:
            self._commit_transaction(positions)
            return
        if not positions:
            return
        try:
            self.consumer.commit(offsets=to_offsets(positions))
        except (CommitFailedError, KafkaError) as exc:
            self.metrics.commits.labels("failed").inc()
            # Expected while a rebalance is in progress; anything else is worth a warning.
            level = logging.DEBUG if isinstance(exc, RebalanceInProgressError) else logging.WARNING
            log.log(level, "commit of %s failed (will retry): %r", positions, exc)
            return
        self.tracker.mark_committed(positions)
        self.stats.commits += 1
        self.metrics.commits.labels("ok").inc()

    def _commit_transaction(self, positions: dict[tuple[str, int], tuple[int, str]]) -> None:
        if not positions and not self._in_txn:
            return
        if not self.listener.events.empty():
            # A revocation landed since the poll (the listener runs on kafka-python's IO
            # thread): this transaction may hold outputs of a partition we no longer own.
            self._handle_revocations()
            return
        try:
            if not self._in_txn:
                self.producer.begin_transaction()
                self._in_txn = True
            if positions:
                self.producer.send_offsets_to_transaction(
                    to_offsets(positions), self.consumer.group_metadata()
                )
            self.producer.commit_transaction()
        except KafkaError as exc:
            log.warning("transaction commit failed (%r): aborting and rewinding", exc)
            self._abort_and_rewind()
            return
        self._in_txn = False
        self.tracker.mark_committed(positions)
        self.stats.commits += 1
        self.metrics.transactions.labels("committed").inc()
        self.metrics.commits.labels("ok").inc()
        self._settle()

    def _abort_and_rewind(self) -> None:
        """Exactly-once: abort the open transaction and re-read from the committed positions."""
        self.stage.wait_idle()  # its sends belong to the transaction being aborted
        self._generation += 1
        if self._in_txn:
            try:
                self.producer.abort_transaction()
            except KafkaError as exc:
                raise BrokerError(
                    f"cannot abort the transaction ({exc!r}): the producer is unusable"
                ) from exc
            self._in_txn = False
        self.stats.aborts += 1
        self.metrics.transactions.labels("aborted").inc()
        self.assembler.clear()
        self.batcher.clear()
        self.tracker.clear()
        self._rewind()
        log.info("transaction aborted; rewound %d partitions", len(self.consumer.assignment()))

    def _handle_revocations(self) -> bool:
        """Apply revocations; True if the partitions were rewound (exactly-once)."""
        rewound = False
        while not self.listener.events.empty():
            rev = self.listener.events.get()
            self.metrics.rebalances.inc()
            if self.eos:
                # Outputs in the open transaction may belong to revoked partitions: abort it
                # and rewind the partitions we keep. Nothing of it becomes visible.
                self._abort_and_rewind()
                rewound = True
                continue
            parts = {p for _, p in rev.partitions}
            dropped = self.assembler.drop_partitions(parts) + self.batcher.drop_partitions(parts)
            self.tracker.forget(set(rev.partitions))
            if dropped:
                log.info(
                    "revoked %s: dropped %d pending events (the new owner re-reads them)",
                    sorted(rev.partitions),
                    dropped,
                )
        return rewound

    # ------------------------------------------------------------------ bounds, gauges

    def _pending_events(self) -> int:
        return len(self.assembler) + len(self.batcher) + self.stage.pending_items

    def _backpressure(self) -> int:
        """Pause fetching at the bounds, resume below them; return how many records may come."""
        c = self.config
        events = self._pending_events()
        nbytes = self.assembler.pending_bytes
        full = events >= c.max_pending_events or nbytes >= c.max_pending_bytes
        if full:
            assigned = self.consumer.assignment()
            if assigned:
                self.consumer.pause(*assigned)  # also covers newly assigned partitions
            if not self._paused:
                log.info("pending bound reached (%d events, %d bytes): pausing", events, nbytes)
            self._paused = True
        elif self._paused and (
            events <= RESUME_AT * c.max_pending_events and nbytes <= RESUME_AT * c.max_pending_bytes
        ):
            self.consumer.resume(*self._resumable())
            self._paused = False
            log.info("pending below the bound (%d events, %d bytes): resuming", events, nbytes)
        return max(0, c.max_pending_events - events)

    def _update_gauges(self) -> None:
        m = self.metrics
        m.pending_events.set(self._pending_events())
        m.pending_bytes.set(self.assembler.pending_bytes)
        m.paused_partitions.set(len(self.consumer.paused()))
        m.assigned_partitions.set(len(self._owned()))
        m.uncommitted_records.set(self.tracker.uncommitted())
