"""The intake: records in, events out to the batcher.

A record is counted, skipped if the last checkpoint lists it as finished, decoded
(or dead-lettered with its reason), and assembled with the other parts of its
event. A complete event inside the run's window goes to the batcher; one outside
it is finished without output.

Events that stay incomplete leave in three ways, each put to the
:class:`~worker.core.incomplete.IncompletePolicy`: their partition's stream time
(:mod:`worker.core.streamtime`) passes their first part's timestamp plus
``--assembly-timeout-ms``; the pending bound is full of them while fetching is
paused (:meth:`Intake.evict_at_bound`); or a bounded source reached its ends.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from worker.config import WorkerConfig
from worker.contract.errors import RecordError
from worker.contract.manifest import Manifest
from worker.contract.records import HEADER_MODALITY, Event, RawRecord
from worker.core.assemble import Assembler, Incomplete
from worker.core.backpressure import Backpressure
from worker.core.batcher import Batcher
from worker.core.checkpoint import Checkpoint
from worker.core.decode import Limits, decode_record
from worker.core.incomplete import OUTSIDE_WINDOW, IncompletePolicy
from worker.core.outputs import Outputs
from worker.core.sensors import Outcomes, Sensor
from worker.core.streamtime import StreamTime
from worker.edge.client import Consumer

log = logging.getLogger(__name__)


class Intake:
    """Decodes and assembles records; hands complete (or given-up) events on."""

    def __init__(
        self,
        config: WorkerConfig,
        manifest: Manifest,
        required_parts: frozenset[str],
        *,
        policy: IncompletePolicy,
        consumer: Consumer,
        checkpoint: Checkpoint,
        outputs: Outputs,
        outcomes: Outcomes,
        sensor: Sensor,
        batcher: Batcher,
        clock: Callable[[], int],
    ) -> None:
        self.manifest = manifest
        self.part_names = required_parts
        self.limits = Limits(config.max_part_bytes, config.max_image_pixels)
        self.topic = config.input_topic
        self.timeout_ms = config.assembly_timeout_ms
        self.policy = policy
        self.consumer = consumer
        self.checkpoint = checkpoint
        self.outputs = outputs
        self.outcomes = outcomes
        self.sensor = sensor
        self.batcher = batcher
        self.clock = clock
        self.assembler = Assembler(required_parts)
        self.stream = StreamTime()
        self.flushed = False  # a bounded source's leftovers were expired at its end

    def __len__(self) -> int:
        """Events waiting for parts."""
        return len(self.assembler)

    @property
    def pending_bytes(self) -> int:
        return self.assembler.pending_bytes

    def take(self, raw: RawRecord) -> None:
        # Labelled only with the model's part names: header values are producer-controlled.
        modality = (raw.header(HEADER_MODALITY) or b"").decode("utf-8", "replace")
        self.sensor.consumed(modality if modality in self.part_names else "unknown")
        src = raw.source
        if self.timeout_ms > 0:
            stream_ms = self.stream.observe(src.partition, src.timestamp_ms, self.clock())
            self._expire_partition(src.partition, stream_ms)
        if self.checkpoint.track(src):
            self.sensor.skipped_finished()  # predicted before the last restart
            return
        try:
            part = decode_record(raw, self.manifest, self.limits)
        except RecordError as err:
            self.outputs.dead_letter(raw, err.reason, str(err))
            return
        duplicates = self.assembler.duplicate_parts
        event = self.assembler.add(part, self.clock())
        if self.assembler.duplicate_parts > duplicates:
            self.sensor.duplicate_part()
        if event is not None:
            self.sensor.completed()
            self._batch(event)

    def expire(self, source_exhausted: bool) -> None:
        """Expire in stream time; a partition read to its end also advances with the wall
        clock (parts that never come still time out when nothing more is written)."""
        if not self.flushed and source_exhausted:
            self.flushed = True  # no more parts will come for what is pending
            for inc in self.assembler.expire_all():
                self._incomplete(inc)
            return
        if self.timeout_ms <= 0:
            return
        now, paused = self.clock(), self.consumer.paused()
        for p in self.assembler.partitions():
            tp = (self.topic, p)
            if tp not in paused and self.consumer.caught_up(tp):
                self._expire_partition(p, self.stream.idle(p, now))
            else:
                self.stream.busy(p)

    def evict_at_bound(self, backpressure: Backpressure) -> None:
        """Fetching is paused at the bound and only incomplete events hold it: stream time
        cannot move, so push out the oldest until fetching may resume."""
        asm = self.assembler
        while len(asm) and not backpressure.below_resume(len(asm), asm.pending_bytes):
            inc = asm.evict_oldest()
            if inc is None:
                break
            self._incomplete(inc, evicted=True)

    def drop_partitions(self, partitions: set[int]) -> int:
        """Revoked partitions: their pending events are the new owner's to read again."""
        self.stream.forget(partitions)
        return self.assembler.drop_partitions(partitions)

    def clear(self) -> None:
        """A rewind: everything is read again from the checkpoints."""
        self.assembler.clear()
        self.stream.clear()
        self.flushed = False

    def _expire_partition(self, partition: int, stream_ms: int) -> None:
        for inc in self.assembler.expire(partition, stream_ms, self.timeout_ms):
            self._incomplete(inc)

    def _batch(self, event: Event) -> None:
        if self.policy.events.accepts(event.last_part_ms):
            self.batcher.add(event, self.clock())
        else:
            self.outcomes.outside_window()
            self.checkpoint.done(event.sources)

    def _incomplete(self, inc: Incomplete, *, evicted: bool = False) -> None:
        decision = self.policy.decide(inc, evicted=evicted)
        if decision.action == OUTSIDE_WINDOW:
            self.outcomes.outside_window()
            self.checkpoint.done(p.source for p in inc.all_parts)
            return
        if evicted:
            self.outcomes.evicted(decision.action)
        else:
            self.outcomes.incomplete(decision.action)
        if decision.reason is not None:
            for part in inc.all_parts:
                raw = part.raw or RawRecord(part.source, inc.event_id.encode(), b"", ())
                self.outputs.dead_letter(raw, decision.reason, decision.detail)
        elif decision.action == "infer":
            self._batch(inc.as_event(self.clock()))
        else:  # drop: the operator's explicit choice; counted and logged
            log.info("dropping incomplete event %r (lacks %s)", inc.event_id, list(inc.missing))
            self.checkpoint.done(p.source for p in inc.all_parts)
