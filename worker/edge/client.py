"""The seam between the worker and a Kafka client library.

The streaming core (:mod:`worker.core`) never imports a client library: it is
given a :class:`Clients` factory and talks to what it makes through the two
small interfaces below. :mod:`worker.edge.kafka_python` implements them with
kafka-python (the default client); a second client (librdkafka through
confluent-kafka) implements the same interfaces, and the unit tests of the
loop use a fake (``tests/fake_kafka.py``).

What every implementation promises:

* Records come back as :class:`~worker.contract.records.RawRecord`, topic
  partitions as ``(topic, partition)`` tuples, commit positions as
  ``{(topic, partition): (next offset, metadata)}``.
* Every client failure is raised as :class:`~worker.contract.errors.BrokerError`
  carrying the client's own ``retriable`` flag; a commit refused because the
  group is rebalancing or the member was fenced is :class:`CommitFailed`.
* Rebalance callbacks run on the client's thread; the consumer only queues
  what was revoked or lost, and the loop takes it with :meth:`Consumer.revocations`.
* Delivery callbacks (``on_ack``/``on_error`` of :meth:`Producer.send`) may run
  on any thread; they must only hand the result over (queues), never block.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from worker.contract.errors import BrokerError
from worker.contract.records import LogRecord, OutRecord, RawRecord

if TYPE_CHECKING:
    from worker.config import KafkaSecurity, WorkerConfig

TP = tuple[str, int]
Positions = Mapping[TP, tuple[int, str]]


class CommitFailed(BrokerError):
    """An offset commit the group refused (rebalance in progress, member fenced)."""

    def __init__(self, message: str, *, rebalancing: bool, retriable: bool = True) -> None:
        super().__init__(message, retriable=retriable)
        self.rebalancing = rebalancing


class Fenced(BrokerError):
    """A newer producer with this transactional id took over: this one is a zombie and
    must stop (rebuilding it would fence the live one)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retriable=False)


class Consumer(Protocol):
    """What the loop needs of a Kafka consumer (auto-commit off)."""

    def subscribe(self, topic: str) -> None:
        """Join the group on ``topic`` (cooperative-sticky, revocations queued)."""

    def assign(self, tps: Iterable[TP]) -> None:
        """Read these partitions without joining a group's assignment."""

    def poll(self, timeout_ms: int, max_records: int) -> list[RawRecord]: ...

    def revocations(self) -> list[frozenset[TP]]:
        """Partitions revoked or lost since the last call, oldest first (drains the queue)."""

    def revocation_pending(self) -> bool: ...

    def joined(self) -> bool:
        """True once the first assignment arrived (even an empty one)."""

    def in_group(self) -> bool:
        """True while this member holds its place in a stable group whose coordinator it
        can reach (always, for partitions assigned directly); False before the first
        join, during a rebalance, while the coordinator is unknown or unreachable, and
        once the member was lost, until it has joined again."""

    def owned(self) -> set[TP]:
        """Partitions the group assigned to this member and has not revoked."""

    def assignment(self) -> set[TP]: ...

    def pause(self, tps: Iterable[TP]) -> None: ...

    def resume(self, tps: Iterable[TP]) -> None: ...

    def paused(self) -> set[TP]: ...

    def caught_up(self, tp: TP) -> bool:
        """True when everything the broker last reported in ``tp`` has been returned by
        :meth:`poll` (the position is at the high watermark of the last fetch)."""

    def seek(self, tp: TP, offset: int) -> None: ...

    def seek_to_beginning(self, tp: TP) -> None: ...

    def seek_to_end(self, tp: TP) -> None: ...

    def position(self, tp: TP) -> int: ...

    def committed(self, tp: TP) -> tuple[int | None, str]:
        """The group's committed position and metadata of one partition."""

    def commit(self, positions: Positions) -> None: ...

    def group_metadata(self) -> object:
        """The handle :meth:`Producer.send_offsets_to_transaction` needs."""

    def partitions_for(self, topic: str) -> set[int]:
        """The topic's partitions (empty while its metadata is unknown)."""

    def close(self) -> None: ...


class Producer(Protocol):
    """What the loop needs of a Kafka producer (acks=all, idempotent)."""

    def send(
        self,
        record: OutRecord,
        on_ack: Callable[[], None],
        on_error: Callable[[BaseException], None],
    ) -> None: ...

    def flush(self, timeout_s: float) -> None: ...

    def init_transactions(self) -> None: ...

    def begin_transaction(self) -> None: ...

    def send_offsets_to_transaction(self, positions: Positions, group_metadata: object) -> None: ...

    def commit_transaction(self) -> None: ...

    def abort_transaction(self) -> None: ...

    def close(self, timeout_s: float) -> None: ...


class Inspector(Protocol):
    """Reads a topic's shape and a group's checkpoint without joining or moving anything
    (a replay's and an archive's planning)."""

    def partitions(self, topic: str) -> list[int]:
        """The topic's partitions, sorted (empty if it does not exist)."""

    def offset_bounds(self, topic: str, partitions: Iterable[int]) -> dict[int, tuple[int, int]]:
        """Per partition: (first offset in the log, next offset to be written)."""

    def offsets_for_time(
        self, topic: str, partitions: Iterable[int], ms: int
    ) -> dict[int, int | None]:
        """Per partition: the first offset stamped at or after ``ms`` (None: none yet)."""

    def committed(self, group: str, topic: str, partitions: Iterable[int]) -> dict[int, int | None]:
        """The group's committed positions (None where it has none)."""

    def close(self) -> None: ...


class RangeReader(Protocol):
    """Reads exact offset ranges of partitions with no group: it never joins, commits or
    creates a topic (an archive's reading; ``read_uncommitted``)."""

    def read(
        self, topic: str, partition: int, start: int, end: int, timeout_s: float
    ) -> Iterator[LogRecord]:
        """Every record of offsets ``[start, end)``, in offset order, losslessly.

        Raises:
            BrokerError: ``start`` is gone from the log (retention), or the read makes no
                progress for ``timeout_s``.
        """

    def close(self) -> None: ...


class Clients(Protocol):
    """The factory the worker is given: its consumer and its producer (and, for the
    planning of bounded runs, an inspector; for the tools, a plain producer and a range
    reader)."""

    def consumer(self, config: WorkerConfig) -> Consumer: ...

    def producer(self, config: WorkerConfig) -> Producer:
        """Transactional (``config.transactional_id``) when the guarantee is exactly-once."""

    def inspector(
        self, bootstrap_servers: str, security: KafkaSecurity, *, read_committed: bool = False
    ) -> Inspector:
        """``read_committed``: a partition's end is its last stable offset."""

    def plain_producer(
        self,
        bootstrap_servers: str,
        security: KafkaSecurity,
        *,
        client_id: str,
        compression_type: str | None = None,
    ) -> Producer:
        """An idempotent producer with acks=all and no transactions (restore, produce):
        it keeps a partition's order through retries, honours ``OutRecord.partition``
        and ``timestamp_ms``, and sends a record with neither key nor value."""

    def range_reader(
        self, bootstrap_servers: str, security: KafkaSecurity, *, client_id: str
    ) -> RangeReader: ...


@dataclass
class Deliveries:
    """Counts the delivery results of :meth:`Producer.send` (``on_ack=deliveries.ok``,
    ``on_error=deliveries.error``), whichever thread the client reports them on."""

    acked: int = 0
    failed: int = 0
    first_error: BaseException | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def ok(self) -> None:
        with self.lock:
            self.acked += 1

    def error(self, exc: BaseException) -> None:
        with self.lock:
            self.failed += 1
            if self.first_error is None:
                self.first_error = exc
