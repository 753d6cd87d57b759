"""Checkpointing: what may be committed, and committing it.

One :class:`Checkpoint` owns the offset bookkeeping
(:class:`~worker.core.offsets.OffsetTracker`: safe positions plus the offsets
finished beyond them, which travel in the commit metadata), the commit
interval and, exactly-once, the open transaction:

* **at-least-once**: a record is done when every output depending on it is
  acknowledged; :meth:`Checkpoint.commit` commits the safe positions of the
  partitions this run owns.
* **exactly-once**: outputs are sent inside a transaction (:meth:`sending`
  opens it); :meth:`commit` adds the positions to it
  (``send_offsets_to_transaction``) and commits it. A failure returns
  :attr:`Commit.MUST_ABORT`: the loop then calls :meth:`abort`, which aborts the
  transaction and forgets every offset.

It decides nothing about the loop: the loop waits for in-flight work before a
transactional commit, applies revocations, and rewinds its source after an abort.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from enum import Enum

from worker.contract.errors import BrokerError
from worker.contract.records import SourceRef
from worker.core.offsets import OffsetTracker
from worker.core.retry import Retry
from worker.core.sources import Checkpoints
from worker.edge.client import TP, CommitFailed, Consumer, Fenced, Producer

log = logging.getLogger(__name__)


class Commit(Enum):
    """What :meth:`Checkpoint.commit` did."""

    IDLE = "idle"  # nothing to commit
    COMMITTED = "committed"
    FAILED = "failed"  # refused (rebalance): retried at the next interval
    MUST_ABORT = "must_abort"  # exactly-once: the transaction cannot commit


class Checkpoint:
    """Offsets, commits and transactions of one run."""

    def __init__(
        self,
        consumer: Consumer,
        producer: Producer,
        *,
        exactly_once: bool,
        interval_ms: int,
        owned: Callable[[], set[TP]],
        retry: Retry | None = None,
    ) -> None:
        self.consumer = consumer
        self.producer = producer
        self.exactly_once = exactly_once
        self.interval_ms = interval_ms
        self._owned = owned
        #: a partition's checkpoint read at its first record waits out a failover too
        self._retry = retry or Retry(0.0, lambda: 0)
        self.tracker = OffsetTracker()
        self.in_transaction = False
        self._last_ms = 0

    # ------------------------------------------------------------ records

    def restart_from(self, checkpoints: Checkpoints) -> None:
        """After a rewind: each partition's bookkeeping starts from the checkpoint its
        reading restarts at (read once by the source), not from a later reading of it."""
        for tp, (offset, metadata) in checkpoints.items():
            self.tracker.seed(tp, offset, metadata)

    def track(self, src: SourceRef) -> bool:
        """A record was read; True if the last checkpoint says its work is done (skip it)."""
        tp = (src.topic, src.partition)
        if not self.tracker.known(tp):
            # Where the source's group last committed (the live group, or a backfill's):
            # it needs the group coordinator, which may be moving (a newly assigned
            # partition's first record, read during a failover).
            found = self._retry.call(
                "reading the checkpoint of a newly read partition",
                lambda: self.consumer.committed(tp),
            )
            self.tracker.seed(tp, *found)
        self.tracker.track(tp, src.offset)
        if self.tracker.finished_before(tp, src.offset):
            self.tracker.done(tp, src.offset)
            return True
        return False

    def done(self, sources: Iterable[SourceRef]) -> None:
        for s in sources:
            self.tracker.done((s.topic, s.partition), s.offset)

    def forget(self, tps: set[TP]) -> None:
        """Revoked partitions: their late acknowledgements are ignored."""
        self.tracker.forget(tps)

    def sending(self) -> None:
        """Exactly-once: open the transaction before anything is sent in it."""
        if self.exactly_once and not self.in_transaction:
            self.producer.begin_transaction()
            self.in_transaction = True

    # ------------------------------------------------------------ commits

    def due(self, now_ms: int) -> bool:
        return now_ms - self._last_ms >= self.interval_ms

    def commit(self, now_ms: int) -> Commit:
        self._last_ms = now_ms
        owned = self._owned()
        positions = {tp: pm for tp, pm in self.tracker.committable().items() if tp in owned}
        if self.exactly_once:
            return self._commit_transaction(positions)
        if not positions:
            return Commit.IDLE
        try:
            self.consumer.commit(positions)
        except BrokerError as exc:
            # Refused during a rebalance (expected), or the broker is away (an outage the
            # worker rides through): the next interval commits again. Nothing is lost.
            rebalancing = isinstance(exc, CommitFailed) and exc.rebalancing
            level = logging.DEBUG if rebalancing else logging.WARNING
            log.log(level, "commit of %s failed (will retry): %s", positions, exc)
            return Commit.FAILED
        self.tracker.mark_committed(positions)
        return Commit.COMMITTED

    def _commit_transaction(self, positions: dict[TP, tuple[int, str]]) -> Commit:
        if not positions and not self.in_transaction:
            return Commit.IDLE
        try:
            self.sending()
            if positions:
                self.producer.send_offsets_to_transaction(positions, self.consumer.group_metadata())
            self.producer.commit_transaction()
        except BrokerError as exc:
            log.warning("transaction commit failed (%s): aborting and rewinding", exc)
            return Commit.MUST_ABORT
        self.in_transaction = False
        self.tracker.mark_committed(positions)
        return Commit.COMMITTED

    def abort(self) -> None:
        """Exactly-once: abort the open transaction and forget every offset."""
        if self.in_transaction:
            try:
                self.producer.abort_transaction()
            except Fenced:
                raise
            except BrokerError as exc:
                raise BrokerError(
                    f"cannot abort the transaction ({exc}): the producer is unusable"
                ) from exc
            self.in_transaction = False
        self.tracker.clear()

    def waiting(self) -> bool:
        """Work waits for a commit: finished offsets of owned partitions not yet committed,
        or an open transaction."""
        if self.in_transaction:
            return True
        owned = self._owned()
        return any(tp in owned for tp in self.tracker.committable())

    def replace_producer(self, producer: Producer) -> None:
        """Exactly-once: the producer could not abort and was rebuilt; its transaction is
        the broker's to abort (the new one's ``init_transactions`` fenced it)."""
        self.producer = producer
        self.in_transaction = False
        self.tracker.clear()

    # ------------------------------------------------------------ gauges

    def uncommitted(self) -> int:
        return self.tracker.uncommitted()

    def open_records(self) -> int:
        return self.tracker.open_count()

    def unsaved(self) -> dict[TP, int]:
        """Positions not yet committed (a bounded run must end with none)."""
        return {tp: pos for tp, (pos, _meta) in self.tracker.committable().items()}
