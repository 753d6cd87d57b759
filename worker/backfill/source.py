"""A replay's source: fixed per-partition offset ranges (:mod:`worker.core.sources`)."""

from __future__ import annotations

import logging

from worker.backfill.ranges import PartitionRange
from worker.contract.records import RawRecord
from worker.core.sources import Checkpoints
from worker.edge.client import TP, Consumer

log = logging.getLogger(__name__)


class RangeSource:
    """Fixed offset ranges of ``topic``, resumed from (and checkpointed to) the consumer's
    group; ``restart`` first resets that checkpoint to the ranges' starts."""

    def __init__(
        self,
        consumer: Consumer,
        topic: str,
        ranges: list[PartitionRange],
        *,
        restart: bool = False,
    ) -> None:
        self.consumer = consumer
        self.topic = topic
        self.ranges = {(topic, r.partition): r for r in ranges}
        self.restart = restart
        self.reached: set[TP] = set()
        #: partition -> the checkpoint a resumed run started from (past its range's start)
        self.resumed_from: dict[int, int] = {}

    def join(self) -> None:
        self.consumer.assign(sorted(self.ranges))
        if self.restart:
            # The checkpoint says "nothing done": resuming after this run, or rewinding
            # after an aborted transaction, starts from the range, not from an old run.
            self.consumer.commit({tp: (r.start, "") for tp, r in self.ranges.items()})
        for tp, r in sorted(self.ranges.items()):
            pos, _found = self._start(tp)
            if pos > r.start:
                self.resumed_from[tp[1]] = pos
        if self.resumed_from:
            log.info("replay: resuming from checkpoint %s", self.resumed_from)

    @property
    def records_before_checkpoint(self) -> int:
        """Records of the ranges before the checkpoints a resumed run started from."""
        return sum(pos - self.ranges[(self.topic, p)].start for p, pos in self.resumed_from.items())

    def _start(self, tp: TP) -> tuple[int, tuple[int | None, str]]:
        """Seek a partition to its checkpoint (within the range); pause it if it is done.
        Returns the position and the checkpoint as read (offset, metadata)."""
        r = self.ranges[tp]
        found = self.consumer.committed(tp)
        checkpoint = found[0]
        pos = r.start if checkpoint is None else min(max(checkpoint, r.start), r.end)
        self.consumer.seek(tp, pos)
        if pos >= r.end:
            self._reach(tp)
        return pos, found

    def _reach(self, tp: TP) -> None:
        if tp in self.ranges:
            self.reached.add(tp)
            self.consumer.pause([tp])

    def admits(self, raw: RawRecord) -> bool:
        tp = (raw.source.topic, raw.source.partition)
        r = self.ranges.get(tp)
        if r is None or raw.source.offset >= r.end:
            self._reach(tp)
            return False
        return raw.source.offset >= r.start  # (a rewind to the log start reads before it)

    def owned(self) -> set[TP]:
        return set(self.ranges)

    def rewind(self) -> Checkpoints:
        self.reached.clear()
        self.consumer.resume(self.consumer.paused())
        return {tp: self._start(tp)[1] for tp in self.ranges}

    def resumable(self) -> set[TP]:
        return self.consumer.paused() - self.reached

    def after_poll(self) -> None:
        for tp, r in self.ranges.items():
            if tp not in self.reached and self.consumer.position(tp) >= r.end:
                self._reach(tp)

    def exhausted(self) -> bool:
        return len(self.reached) == len(self.ranges)
