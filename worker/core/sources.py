"""Sources: where the loop's records come from, and where it may rewind to.

* :class:`GroupSource` -- the live worker: it joins the consumer group on the
  input topic; the group assigns partitions and holds the checkpoints.
* :class:`~worker.backfill.source.RangeSource` -- a replay: fixed per-partition
  offset ranges, assigned directly (no live group is joined or touched),
  checkpointed in the backfill's own group, exhausted once every partition
  reached its range's end.

Both work through the :class:`~worker.edge.client.Consumer` interface only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Protocol

from worker.contract.errors import BrokerError
from worker.contract.records import RawRecord
from worker.edge.client import TP, Consumer

log = logging.getLogger(__name__)

#: Pause after a poll that failed with a retriable error, before the next turn.
POLL_RETRY_S = 0.2

#: Per partition, a checkpoint as the consumer read it: the committed offset (None if
#: none) and its metadata (the offsets finished beyond it, :mod:`worker.core.offsets`).
Checkpoints = dict[TP, tuple[int | None, str]]


class Source(Protocol):
    def join(self) -> None:
        """Start reading (subscribe, or assign and seek)."""

    def admits(self, raw: RawRecord) -> bool:
        """Whether a polled record is input at all (a range: inside it)."""

    def owned(self) -> set[TP]:
        """Partitions whose positions this run may commit."""

    def rewind(self) -> Checkpoints:
        """After an aborted transaction: every partition back to its checkpoint. Returns
        the checkpoints it read (offset, metadata), so that the loop's offset bookkeeping
        starts from the very checkpoint the reading restarts at."""

    def resumable(self) -> set[TP]:
        """Paused partitions that backpressure may resume."""

    def after_poll(self) -> None:
        """Once per loop turn, after the polled records were consumed."""

    def exhausted(self) -> bool:
        """True when no more records will come (a bounded source at its ends)."""


class GroupSource:
    """The consumer group on ``topic``: the group assigns, the group checkpoints."""

    def __init__(
        self,
        consumer: Consumer,
        topic: str,
        auto_offset_reset: str = "earliest",
        metadata_timeout_s: float = 30.0,
    ) -> None:
        self.consumer = consumer
        self.topic = topic
        self.auto_offset_reset = auto_offset_reset
        self.metadata_timeout_s = metadata_timeout_s

    def join(self) -> None:
        self.consumer.subscribe(self.topic)
        # Know the topic's partitions before the first poll joins the group: a member whose
        # subscription has no metadata yet joins with nothing and must rejoin at once (with
        # kafka-python, a second rebalance during which every commit is refused).
        deadline = time.monotonic() + self.metadata_timeout_s
        while not self.consumer.partitions_for(self.topic):
            if time.monotonic() > deadline:
                log.warning("no metadata for %s after %.0f s", self.topic, self.metadata_timeout_s)
                break
            time.sleep(0.1)

    def admits(self, raw: RawRecord) -> bool:
        return True

    def owned(self) -> set[TP]:
        return self.consumer.owned()

    def rewind(self) -> Checkpoints:
        found: Checkpoints = {}
        for tp in self.consumer.assignment():
            pos, _meta = found[tp] = self.consumer.committed(tp)
            if pos is not None:
                self.consumer.seek(tp, pos)
            elif self.auto_offset_reset == "earliest":
                self.consumer.seek_to_beginning(tp)
            else:
                self.consumer.seek_to_end(tp)
        return found

    def resumable(self) -> set[TP]:
        return self.consumer.paused()

    def after_poll(self) -> None:
        pass

    def exhausted(self) -> bool:
        return False


def put_back(consumer: Consumer, records: Sequence[RawRecord]) -> None:
    """Records polled but not taken: seek back to them (fetched again once room frees)."""
    first: dict[TP, int] = {}
    for raw in records:
        tp = (raw.source.topic, raw.source.partition)
        first[tp] = min(first.get(tp, raw.source.offset), raw.source.offset)
    assigned = consumer.assignment()
    for tp, offset in first.items():
        if tp in assigned:
            consumer.seek(tp, offset)


def poll(consumer: Consumer, timeout_ms: int, max_records: int) -> list[RawRecord]:
    """The consumer's poll; a retriable failure (a broker refusing connections while the
    cluster fails over) is a turn without records, after a short pause."""
    try:
        return consumer.poll(timeout_ms=timeout_ms, max_records=max_records)
    except BrokerError as exc:
        if not exc.retriable:
            raise
        log.warning("poll failed, retrying: %s", exc)
        time.sleep(POLL_RETRY_S)
        return []
