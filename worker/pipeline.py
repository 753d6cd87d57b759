"""The worker's pipeline, in one place:

    consume -> decode -> assemble -> batch -> infer -> publish -> commit

* consume: ``KafkaConsumer.poll`` (auto-commit off); each record is tracked
  as open in the :class:`~worker.offsets.OffsetTracker`.
* decode: :func:`~worker.decode.decode_record` -> a part, or a dead-letter
  record with a reason code.
* assemble: :class:`~worker.assemble.Assembler` -> complete events.
* batch: :class:`~worker.batcher.Batcher` -> batches of up to ``max_batch_size``,
  released when full or when the oldest event waited ``max_batch_delay_ms``.
* infer: :class:`~worker.model.ModelRunner` (ONNX Runtime). A batch that makes
  ORT fail is split in halves until the poison event is isolated; it goes to
  the dead-letter topic and the rest are predicted.
* publish: one prediction per event (acks=all); its delivery callback marks
  every source offset of the event done.
* commit: every ``commit_interval_ms`` the tracker's safe positions are
  committed: never past a record whose output is not yet acknowledged.

A failed delivery stops the worker with :class:`BrokerError` and commits
nothing beyond it, so a restart re-reads the work (at-least-once).
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

from kafka.errors import CommitFailedError, KafkaError

from worker.assemble import Assembler
from worker.batcher import Batcher
from worker.config import WorkerConfig
from worker.decode import Limits, decode_record
from worker.errors import BrokerError, InferenceError, Reason, RecordError
from worker.kafka_io import QueueingListener, commit, make_consumer, make_producer, to_raw
from worker.model import ModelRunner
from worker.offsets import OffsetTracker
from worker.records import (
    HEADER_CONTENT_TYPE,
    HEADER_ERROR,
    HEADER_ERROR_DETAIL,
    HEADER_SOURCE,
    Event,
    Prediction,
    RawRecord,
    SourceRef,
)

log = logging.getLogger(__name__)

Clock = Callable[[], int]


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
    commits: int = 0
    provider: str = ""
    first_consumed_ms: int | None = None
    last_acked_ms: int | None = None


class Worker:
    """Runs the pipeline until ``stop`` is set or ``max_events`` predictions are acknowledged."""

    def __init__(self, config: WorkerConfig, runner: ModelRunner, clock: Clock = wall_ms) -> None:
        self.config = config
        self.runner = runner
        self.clock = clock
        self.limits = Limits(config.max_part_bytes, config.max_image_pixels)
        self.assembler = Assembler(runner.required_inputs)
        self.batcher = Batcher(config.max_batch_size, config.max_batch_delay_ms)
        self.tracker = OffsetTracker()
        self.stats = WorkerStats(provider=runner.info.provider)
        self.listener = QueueingListener()
        # Delivery results arrive on the producer's IO thread.
        self._acks: queue.SimpleQueue[tuple[str, tuple[SourceRef, ...]]] = queue.SimpleQueue()
        self._failures: queue.SimpleQueue[BaseException] = queue.SimpleQueue()
        self._last_commit_ms = 0
        self.consumer = make_consumer(
            config.bootstrap_servers,
            config.group_id,
            config.client_id,
            config.auto_offset_reset,
            config.max_poll_records,
        )
        self.producer = make_producer(config.bootstrap_servers, config.client_id)
        self.ready = threading.Event()

    # ------------------------------------------------------------------ loop

    def run(self, stop: threading.Event) -> WorkerStats:
        self.consumer.subscribe([self.config.input_topic], listener=self.listener)
        log.info(
            "worker: %s -> %s (dlq %s), group %s, model %s %s on %s",
            self.config.input_topic,
            self.config.output_topic,
            self.config.dlq_topic,
            self.config.group_id,
            self.runner.manifest.name,
            self.runner.manifest.version,
            self.stats.provider,
        )
        try:
            while not stop.is_set() and not self._done():
                self._step()
            self._drain()
        finally:
            self.consumer.close(autocommit=False)
            self.producer.close(timeout=5)
        log.info("worker stopped: %s", self.stats)
        return self.stats

    def _step(self) -> None:
        wait = self.batcher.wait_ms(self.clock())
        timeout = 100 if wait is None else min(wait, 100)
        polled = self.consumer.poll(timeout_ms=timeout)
        self._handle_revocations()
        if self.listener.assigned:
            self.ready.set()
        for records in polled.values():
            for rec in records:
                self._consume(to_raw(rec))
        while self.batcher.ready(self.clock()):
            self._infer(self.batcher.take())
        self._settle()
        self._maybe_commit(force=False)

    def _done(self) -> bool:
        return 0 < self.config.max_events <= self.stats.predicted

    def _drain(self) -> None:
        """Finish what was consumed: run pending batches, wait for acks, commit."""
        while len(self.batcher):
            self._infer(self.batcher.take())
        deadline = time.monotonic() + self.config.shutdown_timeout_s
        try:
            self.producer.flush(timeout=max(0.1, deadline - time.monotonic()))
        except KafkaError as exc:
            log.error("flush at shutdown failed: %s", exc)
        self._settle()
        self._maybe_commit(force=True)

    # ------------------------------------------------------------------ stages

    def _consume(self, raw: RawRecord) -> None:
        src = raw.source
        now = self.clock()
        self.stats.consumed += 1
        if self.stats.first_consumed_ms is None:
            self.stats.first_consumed_ms = now
        self.tracker.track((src.topic, src.partition), src.offset)
        try:
            part = decode_record(raw, self.runner.manifest, self.limits)
        except RecordError as err:
            self._dead_letter(raw, err.reason, str(err))
            return
        event = self.assembler.add(part, now)
        self.stats.duplicate_parts = self.assembler.duplicate_parts
        if event is not None:
            self.batcher.add(event, now)

    def _infer(self, events: Sequence[Event]) -> None:
        try:
            preds = self.runner.predict(events, self.clock)
        except InferenceError as err:
            if len(events) == 1:
                self._dead_letter_event(events[0], str(err))
            else:  # split to isolate the poison event
                mid = len(events) // 2
                self._infer(events[:mid])
                self._infer(events[mid:])
            return
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
        )

    def _dead_letter(self, raw: RawRecord, reason: Reason, detail: str) -> None:
        log.warning("dead-letter %s: %s: %s", raw.source, reason.value, detail)
        headers = [
            (k, v)
            for k, v in raw.headers
            if k.lower() not in (HEADER_ERROR, HEADER_ERROR_DETAIL, HEADER_SOURCE)
        ]
        headers += [
            (HEADER_ERROR, reason.value.encode()),
            (HEADER_ERROR_DETAIL, detail.encode("utf-8", "replace")[:4000]),
            (HEADER_SOURCE, str(raw.source).encode()),
        ]
        self._send(self.config.dlq_topic, raw.key, raw.value, headers, reason.value, (raw.source,))

    def _dead_letter_event(self, event: Event, detail: str) -> None:
        for part in event.parts.values():
            # The decoded tensor is what failed; the original bytes are on the input topic
            # at mm-source, so the dead-letter value is empty and points there.
            raw = RawRecord(part.source, event.event_id.encode(), b"", ())
            self._dead_letter(raw, Reason.INFERENCE_ERROR, detail)
        self.tracker_done(event.duplicates)

    def _send(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: list[tuple[str, bytes]],
        kind: str,
        sources: tuple[SourceRef, ...],
    ) -> None:
        try:
            future = self.producer.send(topic, key=key, value=value, headers=headers)
        except KafkaError as exc:
            raise BrokerError(f"cannot send to {topic}: {exc}") from exc
        future.add_callback(lambda _md: self._acks.put((kind, sources)))
        future.add_errback(self._failures.put)

    # ------------------------------------------------------------------ commit

    def tracker_done(self, sources: tuple[SourceRef, ...]) -> None:
        for s in sources:
            self.tracker.done((s.topic, s.partition), s.offset)

    def _settle(self) -> None:
        """Apply delivery results from the producer's thread."""
        if not self._failures.empty():
            exc = self._failures.get()
            raise BrokerError(f"a record was not acknowledged by the broker: {exc}")
        now = self.clock()
        while not self._acks.empty():
            kind, sources = self._acks.get()
            self.tracker_done(sources)
            self.stats.last_acked_ms = now
            if kind == "prediction":
                self.stats.predicted += 1
            else:
                self.stats.dead_lettered[kind] = self.stats.dead_lettered.get(kind, 0) + 1

    def _maybe_commit(self, force: bool) -> None:
        now = self.clock()
        if not force and now - self._last_commit_ms < self.config.commit_interval_ms:
            return
        self._last_commit_ms = now
        positions = {
            tp: pos
            for tp, pos in self.tracker.committable().items()
            if tp in self.listener.assigned
        }
        if not positions:
            return
        try:
            commit(self.consumer, positions)
        except (CommitFailedError, KafkaError) as exc:
            log.warning("commit of %s failed (will retry): %s", positions, exc)
            return
        self.tracker.mark_committed(positions)
        self.stats.commits += 1
        log.debug("committed %s", positions)

    def _handle_revocations(self) -> None:
        while not self.listener.events.empty():
            rev = self.listener.events.get()
            parts = {p for _, p in rev.partitions}
            dropped = self.assembler.drop_partitions(parts) + self.batcher.drop_partitions(parts)
            self.tracker.forget(set(rev.partitions))
            if dropped:
                log.info(
                    "revoked %s: dropped %d pending events (the new owner re-reads them)",
                    sorted(rev.partitions),
                    dropped,
                )


def run_worker(
    config: WorkerConfig,
    stop: threading.Event | None = None,
    on_ready: Callable[[Worker], Any] | None = None,
) -> WorkerStats:
    """Load the model, connect, and run until stopped."""
    runner = ModelRunner.load(config.model, config.device, config.intra_op_threads)
    worker = Worker(config, runner)
    if on_ready is not None:
        on_ready(worker)
    return worker.run(stop or threading.Event())
