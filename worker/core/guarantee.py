"""The guarantees: what differs between at-least-once and exactly-once, and recovery.

Both answer the loop's same five calls:

* :meth:`start` before the first poll;
* :meth:`settle` each turn: delivery results applied (:class:`~worker.core.outputs.Outputs`),
  and a failed send acted on;
* :meth:`commit` when the interval is due (and at shutdown);
* :meth:`revoked` after each poll: partitions taken away by a rebalance;
* :meth:`flush` at shutdown, before the last settle and commit.

:class:`AtLeastOnce` commits the offsets whose outputs are acknowledged; a failed
send stops the worker (nothing beyond it is committed, a restart re-reads it); a
revocation drops the revoked partitions' pending events.

:class:`ExactlyOnce` is the recovery part too. Outputs and offsets go in one
transaction per interval; a failed send, a failed commit or a revocation aborts
it and rewinds the source to its checkpoints (nothing of it becomes visible). A
producer that can neither commit nor abort is replaced: the new one's
``init_transactions`` fences the old and has the broker abort its transaction.
Its commit is taken in numbered steps, in :meth:`ExactlyOnce.commit`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from worker.contract.errors import BrokerError
from worker.contract.records import Event
from worker.core.batcher import Batcher
from worker.core.checkpoint import Checkpoint, Commit
from worker.core.intake import Intake
from worker.core.liveness import Liveness
from worker.core.outputs import Outputs
from worker.core.retry import Retry
from worker.core.sensors import Outcomes, Sensor
from worker.core.sources import Source
from worker.core.stage import BatchStage
from worker.edge.client import Consumer, Fenced, Producer

log = logging.getLogger(__name__)


class Guarantee(Protocol):
    def start(self) -> None: ...

    def settle(self) -> None: ...

    def commit(self, now_ms: int) -> None: ...

    def revoked(self) -> bool:
        """Apply revocations; True if the source was rewound (drop what was polled)."""

    def flush(self, timeout_s: float) -> None:
        """At shutdown, before the last settle and commit."""


@dataclass(frozen=True)
class Parts:
    """The loop's parts a guarantee acts on."""

    consumer: Consumer
    checkpoint: Checkpoint
    outputs: Outputs
    outcomes: Outcomes
    sensor: Sensor
    intake: Intake
    batcher: Batcher
    liveness: Liveness

    def counted(self, result: Commit) -> bool:
        """Report a commit's result; True if it committed (progress)."""
        if result is not Commit.IDLE and result is not Commit.MUST_ABORT:
            self.sensor.commit(result is Commit.COMMITTED)
        if result is Commit.COMMITTED:
            self.liveness.progressed()
            return True
        return False


class AtLeastOnce:
    def __init__(self, parts: Parts) -> None:
        self.p = parts

    def start(self) -> None:
        pass

    def settle(self) -> None:
        exc = self.p.outputs.settle()
        if exc is not None:
            raise BrokerError(f"a record was not acknowledged by the broker: {exc}")

    def commit(self, now_ms: int) -> None:
        self.p.counted(self.p.checkpoint.commit(now_ms))

    def revoked(self) -> bool:
        for revoked in self.p.consumer.revocations():
            self.p.sensor.rebalance()
            parts = {p for _, p in revoked}
            dropped = self.p.intake.drop_partitions(parts) + self.p.batcher.drop_partitions(parts)
            self.p.checkpoint.forget(set(revoked))
            if dropped:
                log.info(
                    "revoked %s: dropped %d pending events (the new owner re-reads them)",
                    sorted(revoked),
                    dropped,
                )
        return False

    def flush(self, timeout_s: float) -> None:
        try:
            self.p.checkpoint.producer.flush(timeout_s=timeout_s)
        except BrokerError as exc:
            log.error("flush at shutdown failed: %s", exc)


class ExactlyOnce:
    def __init__(
        self,
        parts: Parts,
        *,
        source: Source,
        stage: BatchStage[Event],
        retry: Retry,
        new_producer: Callable[[], Producer],
    ) -> None:
        self.p = parts
        self.source = source
        self.stage = stage
        self.retry = retry
        self.new_producer = new_producer

    def start(self) -> None:
        self.p.checkpoint.producer.init_transactions()

    def settle(self) -> None:
        exc = self.p.outputs.settle()
        if exc is not None:
            log.warning("send failed inside a transaction (%s): aborting", exc)
            self.abort_and_rewind()

    def commit(self, now_ms: int) -> None:
        # 1. Everything sent in this transaction is known before its offsets are.
        self.stage.wait_idle()
        self.stage.check()
        self.settle()
        # 2. A revocation since the poll: the transaction may hold a lost partition's outputs.
        if self.p.consumer.revocation_pending():
            self.revoked()
            return
        # 3. Offsets into the transaction, and commit it (or abort and rewind).
        result = self.p.checkpoint.commit(now_ms)
        if result is Commit.MUST_ABORT:
            self.abort_and_rewind()
        elif self.p.counted(result):
            # 4. Committing flushed the last sends: their acks count with this transaction.
            self.settle()
            self.p.sensor.transaction("committed")
            self.p.outcomes.commit()

    def revoked(self) -> bool:
        rewound = False
        for _revoked in self.p.consumer.revocations():
            self.p.sensor.rebalance()
            self.abort_and_rewind()
            rewound = True
        return rewound

    def flush(self, timeout_s: float) -> None:
        pass  # committing the transaction flushes its sends

    def abort_and_rewind(self) -> None:
        """Abort the open transaction and read again from the checkpoints."""
        self.stage.wait_idle()  # its sends belong to the transaction being aborted
        try:
            self.p.checkpoint.abort()
        except Fenced:
            raise  # a newer instance took over: this one stops
        except BrokerError as exc:
            self._rebuild_producer(exc)
        self.p.outputs.restart()
        self.p.outcomes.discard()
        self.p.sensor.transaction("aborted")
        self.p.intake.clear()
        self.p.batcher.clear()
        # Reading the checkpoints needs the group coordinator, which may be failing over.
        checkpoints = self.retry.call("rewinding to the checkpoints", self.source.rewind)
        self.p.checkpoint.restart_from(checkpoints)
        log.info("transaction aborted; rewound %d partitions", len(self.p.consumer.assignment()))

    def _rebuild_producer(self, cause: BrokerError) -> None:
        log.warning("the transactional producer is stuck (%s): replacing it", cause)
        producers: list[Producer] = [self.p.checkpoint.producer]

        def replace() -> None:
            # Each try closes the one before (the stuck one, then one that could not start).
            producers[-1].close(timeout_s=1)
            producers.append(self.new_producer())
            producers[-1].init_transactions()

        try:
            self.retry.call("initialising a new transactional producer", replace)
        except BaseException:
            self.p.checkpoint.producer = producers[-1]  # the worker closes it as it stops
            raise
        self.p.checkpoint.replace_producer(producers[-1])
        self.p.sensor.transaction("rebuilt")
