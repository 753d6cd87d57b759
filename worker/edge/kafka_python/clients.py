"""The :mod:`worker.edge.client` interfaces, implemented with kafka-python.

Every kafka-python error leaves this module through the edge's one error table
(:func:`worker.edge.kafka_python.security.broker_error`): a
:class:`~worker.contract.errors.BrokerError` that keeps kafka-python's own
``retriable`` flag; refused commits are :class:`~worker.edge.client.CommitFailed`.
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from kafka import KafkaConsumer, KafkaProducer
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.errors import KafkaError
from kafka.structs import TopicPartition

from worker.contract.errors import BrokerError
from worker.contract.records import LogRecord, OutRecord, RawRecord
from worker.edge.client import TP, Positions
from worker.edge.common import (
    FETCH_MAX_BYTES,
    PARTITION_FETCH_BYTES,
    Progress,
    checkpoint_metadata,
    wrapping,
)
from worker.edge.kafka_python.build import (
    NULL_KEY,
    NullKey,
    build_client,
    make_consumer,
    make_producer,
)
from worker.edge.kafka_python.internals import (
    heartbeating,
    member_stable,
    read_to_end,
    transaction_manager,
    wake_sender,
)
from worker.edge.kafka_python.records import to_log_record, to_offsets, to_raw
from worker.edge.kafka_python.records import topic_partition as _tp
from worker.edge.kafka_python.security import broker_error

if TYPE_CHECKING:
    from worker.config import KafkaSecurity, WorkerConfig

log = logging.getLogger(__name__)

#: A range reader's poll.
POLL_MS = 200
#: Blocking lookups of the consumer (committed offsets): a retriable timeout after this.
LOOKUP_TIMEOUT_MS = 10_000

_wrapped = wrapping(KafkaError, broker_error)


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    """Queues revocations for the loop (callbacks run on kafka-python's IO thread)."""

    def __init__(self) -> None:
        self.events: queue.SimpleQueue[frozenset[TP]] = queue.SimpleQueue()
        self.assigned: set[TP] = set()
        # Set at the first assignment the listener hears of. Under the cooperative protocol
        # kafka-python calls on_partitions_assigned only when partitions are added, so a
        # member given none never hears of its join here: KafkaPythonConsumer.joined()
        # also reads the member state.
        self.joined = False

    def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        tps = frozenset((tp.topic, tp.partition) for tp in revoked)
        if tps:
            log.info("partitions revoked: %s", sorted(tps))
            self.events.put(tps)
        self.assigned -= tps

    def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        tps = {(tp.topic, tp.partition) for tp in assigned}
        log.info("partitions assigned: %s", sorted(tps))
        self.assigned |= tps
        self.joined = True

    def on_partitions_lost(self, lost: Iterable[TopicPartition]) -> None:
        self.on_partitions_revoked(lost)


class KafkaPythonConsumer:
    """:class:`~worker.edge.client.Consumer` over a ``KafkaConsumer``."""

    def __init__(self, consumer: KafkaConsumer, security: dict[str, Any] | None = None) -> None:
        self._c = consumer
        self.security = security or {}
        self._listener = _Listener()
        self._assigned_directly = False

    @_wrapped("cannot subscribe")
    def subscribe(self, topic: str) -> None:
        self._c.subscribe([topic], listener=self._listener)

    @_wrapped("cannot assign partitions")
    def assign(self, tps: Iterable[TP]) -> None:
        self._c.assign([_tp(tp) for tp in tps])
        self._assigned_directly = True

    @_wrapped("Kafka poll failed")
    def poll(self, timeout_ms: int, max_records: int) -> list[RawRecord]:
        polled = self._c.poll(timeout_ms=timeout_ms, max_records=max_records)
        return [to_raw(rec) for records in polled.values() for rec in records]

    def revocations(self) -> list[frozenset[TP]]:
        out = []
        while not self._listener.events.empty():
            out.append(self._listener.events.get())
        return out

    def revocation_pending(self) -> bool:
        return not self._listener.events.empty()

    def joined(self) -> bool:
        return self._assigned_directly or self._listener.joined or self._stable()

    def in_group(self) -> bool:
        return self._assigned_directly or (member_stable(self._c) and heartbeating(self._c))

    def _stable(self) -> bool:
        return member_stable(self._c)

    def owned(self) -> set[TP]:
        if self._assigned_directly:
            return self.assignment()
        return set(self._listener.assigned)

    def assignment(self) -> set[TP]:
        return {(tp.topic, tp.partition) for tp in self._c.assignment()}

    @_wrapped("cannot pause")
    def pause(self, tps: Iterable[TP]) -> None:
        wanted = [_tp(tp) for tp in tps]
        if wanted:
            self._c.pause(*wanted)

    @_wrapped("cannot resume")
    def resume(self, tps: Iterable[TP]) -> None:
        wanted = [_tp(tp) for tp in tps]
        if wanted:
            self._c.resume(*wanted)

    def paused(self) -> set[TP]:
        return {(tp.topic, tp.partition) for tp in self._c.paused()}

    def caught_up(self, tp: TP) -> bool:
        return read_to_end(self._c, _tp(tp))

    @_wrapped("cannot seek")
    def seek(self, tp: TP, offset: int) -> None:
        self._c.seek(_tp(tp), offset)

    @_wrapped("cannot seek")
    def seek_to_beginning(self, tp: TP) -> None:
        self._c.seek_to_beginning(_tp(tp))

    @_wrapped("cannot seek")
    def seek_to_end(self, tp: TP) -> None:
        self._c.seek_to_end(_tp(tp))

    @_wrapped("cannot read the position")
    def position(self, tp: TP) -> int:
        return int(self._c.position(_tp(tp)))

    @_wrapped("cannot read the committed offset")
    def committed(self, tp: TP) -> tuple[int | None, str]:
        # Bounded: without a timeout kafka-python waits for a coordinator without end.
        found = self._c.committed(_tp(tp), metadata=True, timeout_ms=LOOKUP_TIMEOUT_MS)
        if found is None:
            return None, ""
        return found.offset, checkpoint_metadata(found.metadata)

    @_wrapped("commit failed")
    def commit(self, positions: Positions) -> None:
        self._c.commit(offsets=to_offsets(positions))

    def group_metadata(self) -> object:
        return self._c.group_metadata()

    @_wrapped("cannot read topic metadata")
    def partitions_for(self, topic: str) -> set[int]:
        return set(self._c.partitions_for_topic(topic) or ())

    def close(self) -> None:
        try:
            self._c.close(autocommit=False)
        except KafkaError as exc:
            log.warning("closing the consumer failed: %r", exc)


class KafkaPythonProducer:
    """:class:`~worker.edge.client.Producer` over a ``KafkaProducer``."""

    def __init__(
        self,
        producer: KafkaProducer,
        transaction_wait_s: float = 20.0,
        security: dict[str, Any] | None = None,
    ) -> None:
        self._p = producer
        self.security = security or {}
        self._wait_ms = int(transaction_wait_s * 1000)

    def send(
        self,
        record: OutRecord,
        on_ack: Callable[[], None],
        on_error: Callable[[BaseException], None],
    ) -> None:
        key: bytes | NullKey | None = record.key
        if key is None and record.value is None:
            key = NULL_KEY  # kafka-python refuses a record with neither
        try:
            future = self._p.send(
                record.topic, key=key, value=record.value, headers=list(record.headers),
                partition=record.partition, timestamp_ms=record.timestamp_ms,
            )  # fmt: skip
        except KafkaError as exc:
            raise broker_error(f"cannot send to {record.topic}", exc, self.security) from exc
        what = f"cannot write to {record.topic}"
        future.add_callback(lambda _md: on_ack())
        future.add_errback(lambda exc: on_error(broker_error(what, exc, self.security)))

    def learn_topics(self, topics: Iterable[str]) -> None:
        """Know the partitions of ``topics`` now, before the first send.

        kafka-python's ``send`` waits for the metadata of a topic it has not written yet
        (up to ``max_block_ms``) on the caller's thread: the first dead letter, sent while
        the broker that answers metadata is frozen, held the loop 40 s (it neither read nor
        paused). Learnt at start, a send only queues.
        """
        for topic in topics:
            try:
                self._p.partitions_for(topic)
            except KafkaError as exc:
                raise broker_error(
                    f"cannot learn the partitions of {topic}", exc, self.security
                ) from exc

    @_wrapped("flush failed")
    def flush(self, timeout_s: float) -> None:
        self._p.flush(timeout=timeout_s)

    @_wrapped("cannot initialise transactions")
    def init_transactions(self) -> None:
        self._p.init_transactions()

    @_wrapped("cannot begin a transaction")
    def begin_transaction(self) -> None:
        self._p.begin_transaction()

    # kafka-python's send_offsets_to_transaction, commit_transaction and abort_transaction
    # wait for the coordinator without a timeout; after a failover of the transaction
    # coordinator it can stop looking for the new one ("Got an exception when trying to
    # find a node to send a transactional request to") and wait for ever. These do what
    # they do, but wait at most --transaction-wait-s and then fail (the loop aborts, or
    # replaces the producer when the abort cannot complete either).

    @_wrapped("cannot add offsets to the transaction")
    def send_offsets_to_transaction(self, positions: Positions, group_metadata: object) -> None:
        tm = self._transactions()
        self._await("adding offsets to the transaction", tm.send_offsets_to_transaction(
            to_offsets(positions), group_metadata
        ))  # fmt: skip

    @_wrapped("cannot commit the transaction")
    def commit_transaction(self) -> None:
        self._await("committing the transaction", self._transactions().begin_commit())

    @_wrapped("cannot abort the transaction")
    def abort_transaction(self) -> None:
        self._await("aborting the transaction", self._transactions().begin_abort())

    def _transactions(self) -> Any:
        tm = transaction_manager(self._p)
        if tm is None:
            raise BrokerError("transactions are not enabled on this producer", retriable=False)
        return tm

    def _await(self, what: str, result: Any) -> None:
        wake_sender(self._p)
        if not result.wait(timeout_ms=self._wait_ms):
            raise BrokerError(
                f"{what}: no answer from the transaction coordinator in {self._wait_ms} ms "
                "(--transaction-wait-s)",
                retriable=True,
            )

    def close(self, timeout_s: float) -> None:
        try:
            self._p.close(timeout=timeout_s)
        except KafkaError as exc:
            log.warning("closing the producer failed: %r", exc)


class KafkaPythonInspector:
    """:class:`~worker.edge.client.Inspector` over group-less ``KafkaConsumer``s."""

    def __init__(
        self, bootstrap_servers: str, security: KafkaSecurity, read_committed: bool
    ) -> None:
        self.security = security.kafka_security()
        self._where = bootstrap_servers
        self._kwargs: dict[str, Any] = {
            "bootstrap_servers": bootstrap_servers.split(","),
            **self.security,
        }
        self._c = build_client(
            "cannot connect",
            bootstrap_servers,
            KafkaConsumer,
            group_id=None,
            isolation_level="read_committed" if read_committed else "read_uncommitted",
            **self._kwargs,
        )

    @_wrapped("cannot read topic metadata")
    def partitions(self, topic: str) -> list[int]:
        return sorted(self._c.partitions_for_topic(topic) or ())

    @_wrapped("cannot read offsets")
    def offset_bounds(self, topic: str, partitions: Iterable[int]) -> dict[int, tuple[int, int]]:
        tps = [TopicPartition(topic, p) for p in partitions]
        first, nxt = self._c.beginning_offsets(tps), self._c.end_offsets(tps)
        return {tp.partition: (first[tp], nxt[tp]) for tp in tps}

    @_wrapped("cannot look up offsets by time")
    def offsets_for_time(
        self, topic: str, partitions: Iterable[int], ms: int
    ) -> dict[int, int | None]:
        tps = [TopicPartition(topic, p) for p in partitions]
        found = self._c.offsets_for_times({tp: max(0, ms) for tp in tps})
        return {tp.partition: (None if found.get(tp) is None else found[tp].offset) for tp in tps}

    @_wrapped("cannot read the group's checkpoint")
    def committed(self, group: str, topic: str, partitions: Iterable[int]) -> dict[int, int | None]:
        reader = build_client(
            "cannot connect",
            self._where,
            KafkaConsumer,
            group_id=group,
            enable_auto_commit=False,
            **self._kwargs,
        )
        try:  # reads the checkpoint; joins nothing, commits nothing
            found = {p: reader.committed(TopicPartition(topic, p)) for p in partitions}
        finally:
            reader.close(autocommit=False)
        return found

    def close(self) -> None:
        self._c.close()


class KafkaPythonRangeReader:
    """:class:`~worker.edge.client.RangeReader` over a group-less ``KafkaConsumer``."""

    def __init__(self, bootstrap_servers: str, security: KafkaSecurity, client_id: str) -> None:
        self.security = security.kafka_security()
        self._c = build_client(
            "cannot connect consumer",
            bootstrap_servers,
            KafkaConsumer,
            bootstrap_servers=bootstrap_servers.split(","),
            client_id=client_id,
            group_id=None,
            enable_auto_commit=False,
            allow_auto_create_topics=False,
            # A range start deleted by retention while reading is an error, never a skip.
            auto_offset_reset="none",
            fetch_max_bytes=FETCH_MAX_BYTES,
            max_partition_fetch_bytes=PARTITION_FETCH_BYTES,
            **self.security,
        )

    def read(
        self, topic: str, partition: int, start: int, end: int, timeout_s: float
    ) -> Iterator[LogRecord]:
        if end <= start:
            return
        tp = TopicPartition(topic, partition)
        where = f"{topic}/{partition} [{start}, {end})"
        progress = Progress(where, start, timeout_s)
        try:
            self._c.assign([tp])
            self._c.seek(tp, start)
            while progress.position < end:
                for record in self._c.poll(timeout_ms=POLL_MS).get(tp, ()):
                    if record.offset >= end:
                        break
                    if record.offset >= start:
                        yield to_log_record(record)
                progress.at(self._c.position(tp))
        except KafkaError as exc:
            raise broker_error(f"reading {where}", exc, self.security) from exc

    def close(self) -> None:
        self._c.close()


class KafkaPythonClients:
    """The default :class:`~worker.edge.client.Clients`: kafka-python."""

    def consumer(self, config: WorkerConfig) -> KafkaPythonConsumer:
        return KafkaPythonConsumer(make_consumer(config), config.kafka_security())

    def inspector(
        self, bootstrap_servers: str, security: KafkaSecurity, *, read_committed: bool = False
    ) -> KafkaPythonInspector:
        return KafkaPythonInspector(bootstrap_servers, security, read_committed)

    def producer(self, config: WorkerConfig) -> KafkaPythonProducer:
        extra: dict[str, Any] = dict(config.kafka_security())
        if config.guarantee == "exactly-once":
            extra["transactional_id"] = config.transactional_id
        producer = KafkaPythonProducer(
            make_producer(
                config.bootstrap_servers,
                config.client_id,
                compression_type=config.compression_type,
                **extra,
            ),
            transaction_wait_s=config.transaction_wait_s,
            security=config.kafka_security(),
        )
        try:
            producer.learn_topics((config.output_topic, config.dlq_topic))
        except BaseException:
            producer.close(timeout_s=0)
            raise
        return producer

    def plain_producer(
        self,
        bootstrap_servers: str,
        security: KafkaSecurity,
        *,
        client_id: str,
        compression_type: str | None = None,
    ) -> KafkaPythonProducer:
        return KafkaPythonProducer(
            make_producer(
                bootstrap_servers,
                client_id,
                compression_type=compression_type,
                # one batch in flight per partition: order survives retries
                enable_idempotence=True,
                **security.kafka_security(),
            ),
            security=security.kafka_security(),
        )

    def range_reader(
        self, bootstrap_servers: str, security: KafkaSecurity, *, client_id: str
    ) -> KafkaPythonRangeReader:
        return KafkaPythonRangeReader(bootstrap_servers, security, client_id)
