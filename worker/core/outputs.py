"""Outputs: predictions and dead letters sent to Kafka, until their results are known.

Predictions are sent by the scorer (on the inference thread, or inline), dead letters
also by the intake (on the loop thread); the client reports each delivery on its own
thread. :class:`Outputs` is the only thing that crosses
those threads: it counts what is in flight (held against the pending bounds,
so a broker that stops acknowledging cannot make it grow without end) and
queues each result for :meth:`Outputs.settle`, which the loop calls on its own
thread to finish the records' offsets and count the outcomes.

When a record's sources are done depends on the guarantee:

* at-least-once, once its output is acknowledged (``done_on_ack``);
* exactly-once, once it is sent: the transaction commits it with the offsets,
  or aborts both.

An abort starts a fresh :class:`Interval` (quix-streams makes a fresh checkpoint
per commit interval the same way): late results of the aborted sends land in
the old one, which nobody reads any more.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from worker.contract.errors import BrokerError, Reason
from worker.contract.records import HEADER_CONTENT_TYPE, OutRecord, RawRecord, SourceRef
from worker.core.checkpoint import Checkpoint
from worker.core.deadletter import dead_letter
from worker.core.sensors import Outcomes

log = logging.getLogger(__name__)

JSON_HEADERS = ((HEADER_CONTENT_TYPE, b"application/json"),)


@dataclass(frozen=True)
class Delivered:
    """An acknowledged output: a prediction (``reason`` None) or a dead letter."""

    reason: Reason | None
    sources: tuple[SourceRef, ...]
    last_part_ms: int | None


class Interval:
    """The sends of one transaction (at-least-once: of the whole run) and their results."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.records = 0
        self.nbytes = 0
        self.delivered: queue.SimpleQueue[Delivered] = queue.SimpleQueue()
        self.failed: queue.SimpleQueue[BaseException] = queue.SimpleQueue()
        self.finished: queue.SimpleQueue[Iterable[SourceRef]] = queue.SimpleQueue()

    def held(self, records: int, nbytes: int) -> None:
        with self._lock:
            self.records += records
            self.nbytes += nbytes


class Outputs:
    """Sends outputs through the checkpoint's producer and settles their results."""

    def __init__(
        self,
        checkpoint: Checkpoint,
        outcomes: Outcomes,
        clock: Callable[[], int],
        *,
        topic: str,
        dlq_topic: str,
        done_on_ack: bool,
    ) -> None:
        self.checkpoint = checkpoint
        self.outcomes = outcomes
        self.clock = clock
        self.topic = topic
        self.dlq_topic = dlq_topic
        self.done_on_ack = done_on_ack
        self.interval = Interval()

    @property
    def records(self) -> int:
        """Outputs sent and not yet acknowledged or failed."""
        return self.interval.records

    @property
    def nbytes(self) -> int:
        return self.interval.nbytes

    # ------------------------------------------------------------ any sending thread

    def prediction(
        self, key: bytes, value: bytes, sources: tuple[SourceRef, ...], last_part_ms: int
    ) -> None:
        record = OutRecord(self.topic, key, value, JSON_HEADERS)
        self._send(record, Delivered(None, sources, last_part_ms))

    def dead_letter(self, raw: RawRecord, reason: Reason, detail: str) -> None:
        log.warning("dead-letter %s: %s: %s", raw.source, reason.value, detail)
        record = dead_letter(self.dlq_topic, raw, reason, detail)
        self._send(record, Delivered(reason, (raw.source,), None))

    def finished(self, sources: Iterable[SourceRef]) -> None:
        """Sources done without an output of their own (an event's duplicate parts)."""
        self.interval.finished.put(tuple(sources))

    def _send(self, record: OutRecord, delivered: Delivered) -> None:
        # Exactly-once, the transaction is open before anything is sent in it.
        self.checkpoint.sending()
        interval, nbytes = self.interval, record.nbytes

        def acked() -> None:
            interval.held(-1, -nbytes)
            interval.delivered.put(delivered)

        def failed(exc: BaseException) -> None:
            interval.held(-1, -nbytes)
            interval.failed.put(exc)

        interval.held(1, nbytes)
        try:
            self.checkpoint.producer.send(record, on_ack=acked, on_error=failed)
        except BaseException:
            interval.held(-1, -nbytes)
            raise
        if not self.done_on_ack:
            interval.finished.put(delivered.sources)

    # ------------------------------------------------------------ loop thread

    def settle(self) -> BaseException | None:
        """Apply the results that arrived: finish sources, count outcomes. A refusal that
        no retry can help raises; another failed send is returned, for the guarantee to
        act on (at-least-once stops, exactly-once aborts and rewinds)."""
        interval = self.interval
        while not interval.finished.empty():
            self.checkpoint.done(interval.finished.get())
        if not interval.failed.empty():
            exc = interval.failed.get()
            if isinstance(exc, BrokerError) and not exc.retriable:
                raise BrokerError(f"a record was refused by the broker: {exc}", retriable=False)
            return exc
        now = self.clock()
        while not interval.delivered.empty():
            d = interval.delivered.get()
            if self.done_on_ack:
                self.checkpoint.done(d.sources)
            if d.reason is not None:
                self.outcomes.dead_lettered(d.reason.value)
            elif d.last_part_ms is None:
                self.outcomes.predicted(None)
            else:
                self.outcomes.predicted(max(0.0, (now - d.last_part_ms) / 1000.0))
        return None

    def restart(self) -> None:
        """An abort: what was sent before no longer counts, and its late results are ignored."""
        self.interval = Interval()
