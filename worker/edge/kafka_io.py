"""kafka-python helpers of the edge: building the clients, topic administration, and
reading a topic back (tools and tests).

The worker's loop reaches Kafka only through :mod:`worker.edge.client` (implemented in
:mod:`worker.edge.kafka_python`, which builds its clients here).

Every client is built under a :class:`~worker.edge.security.BootstrapWatch`: a wrong
password, an untrusted broker certificate or a refused client certificate fails at once
with one line naming it (``retriable=False``), not after kafka-python's 30 s bootstrap
timeout with ``Unable to bootstrap``. With a secured protocol, :func:`make_consumer` also
checks the worker's ACLs (:func:`~worker.edge.security.check_access`) before it joins.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

from kafka import KafkaConsumer, KafkaProducer, codec
from kafka.coordinator.assignors.cooperative_sticky import CooperativeStickyAssignor
from kafka.errors import KafkaError
from kafka.serializer import Serializer
from kafka.structs import TopicPartition

from worker.config import WorkerConfig, check_compression
from worker.contract.errors import BrokerError, ConfigError
from worker.contract.records import RawRecord
from worker.edge.security import BootstrapWatch, TopicAccess, authorization_error, check_access

log = logging.getLogger(__name__)

C = TypeVar("C")


def build_client(
    what: str, where: str, factory: Callable[..., C], /, *args: Any, **kwargs: Any
) -> C:
    """``factory(*args, **kwargs)`` (a kafka-python client class) under a
    :class:`BootstrapWatch`; ``where``: the bootstrap servers, for messages.

    Raises:
        BrokerError: ``<what>: <cause>`` (retriable=False) for an authentication or TLS
            failure; else ``<what> to <where>: <kafka-python's error>``.
    """
    security = {k: v for k, v in kwargs.items() if k.startswith(("security_", "sasl_", "ssl_"))}
    with BootstrapWatch(where, security) as watch:
        try:
            return factory(*args, kafka_client=watch.client_factory, **kwargs)
        except KafkaError as exc:
            raise watch.error(what, exc) from exc


def worker_access(config: WorkerConfig) -> TopicAccess:
    """The ACLs a worker (or a replay) with ``config`` needs (docs/operations.md)."""
    return TopicAccess(
        read=(config.input_topic,),
        write=(config.output_topic, config.dlq_topic),
        group=config.group_id,
        transactional_id=config.transactional_id if config.guarantee == "exactly-once" else "",
    )


#: The most one fetch request may bring back (both clients; capped by the worker's
#: --max-pending-bytes).
FETCH_MAX_BYTES = 64 * 1024 * 1024
#: The most one partition may add to a fetch (both clients; a larger record still comes,
#: alone). The clients' own default, 1 MiB: with 16 MiB a fetch of several partitions
#: took long enough to arrive that the loop sat waiting for it, and kafka-python asks
#: again for a partition only once its last answer is used up (measured, 6 000 npy events
#: on 4 partitions, one kafka-python worker: 1 774 events/s with 16 MiB, 2 846 with 1 MiB,
#: RSS 330 -> 122 MiB).
PARTITION_FETCH_BYTES = 1024 * 1024


def make_consumer(config: WorkerConfig) -> KafkaConsumer:
    """The worker's consumer: manual commits, cooperative-sticky, optional static membership."""
    kwargs: dict[str, Any] = dict(
        bootstrap_servers=config.bootstrap_servers.split(","),
        group_id=config.group_id,
        client_id=config.client_id,
        enable_auto_commit=False,
        auto_offset_reset=config.auto_offset_reset,
        max_poll_records=config.max_poll_records,
        # Fetched records wait in the client's buffers beside what the worker holds: never
        # more per request than the worker's own byte bound (a broker still returns a
        # record larger than this, alone).
        fetch_max_bytes=min(FETCH_MAX_BYTES, config.max_pending_bytes),
        max_partition_fetch_bytes=min(PARTITION_FETCH_BYTES, config.max_pending_bytes),
        partition_assignment_strategy=[CooperativeStickyAssignor()],
        session_timeout_ms=config.session_timeout_ms,
        metadata_max_age_ms=30_000,
        # A short heartbeat makes members notice a rebalance sooner (two rounds when
        # cooperative).
        heartbeat_interval_ms=max(300, min(1000, config.session_timeout_ms // 3)),
        isolation_level=(
            "read_committed" if config.guarantee == "exactly-once" else "read_uncommitted"
        ),
        **config.kafka_security(),
    )
    if config.group_instance_id:
        kwargs["group_instance_id"] = config.group_instance_id
    consumer = build_client(
        "cannot connect consumer", config.bootstrap_servers, KafkaConsumer, **kwargs
    )
    if config.security_protocol != "PLAINTEXT":
        # Before joining: a missing ACL is one line naming it, and nothing is assigned.
        try:
            check_access(config.bootstrap_servers, config.kafka_security(), worker_access(config))
        except BaseException:
            consumer.close(autocommit=False)
            raise
    return consumer


#: ``--compression-type`` -> the kafka.codec check that its library is importable.
_CODEC_CHECKS: dict[str, Callable[[], bool]] = {
    "gzip": codec.has_gzip,
    "snappy": codec.has_snappy,
    "lz4": codec.has_lz4,
    "zstd": codec.has_zstd,
}


def kafka_compression(compression_type: str | None) -> str | None:
    """``--compression-type`` -> kafka-python's ``compression_type`` ("none" -> None).

    Raises:
        ConfigError: an unknown codec, or one whose library is not installed.
    """
    if compression_type is None or compression_type == "none":
        return None
    check_compression(compression_type)
    if not _CODEC_CHECKS[compression_type]():
        raise ConfigError(
            f"--compression-type {compression_type}: its library is not installed "
            f"(pip install 'kafka-python[{compression_type}]')"
        )
    return compression_type


class NullKey:
    """Stands for "no key" where kafka-python would refuse a record with neither key nor
    value (its ``send`` checks that before serializing, though Kafka stores such records)."""


NULL_KEY = NullKey()


class KeySerializer(Serializer):  # type: ignore[misc]
    """Passes key bytes through; :data:`NULL_KEY` becomes a null key."""

    def serialize(self, topic: str, headers: Any, data: Any) -> bytes | None:
        return None if data is NULL_KEY else data


def make_producer(
    bootstrap_servers: str,
    client_id: str,
    *,
    compression_type: str | None = None,
    **extra: Any,
) -> KafkaProducer:
    """An idempotent producer with acks=all (``extra``: transactional_id, security, ...);
    a key of :data:`NULL_KEY` is sent as no key.

    ``compression_type``: a ``--compression-type`` value (none, gzip, snappy, lz4, zstd;
    None = none). kafka-python compresses per batch; ``max_request_size`` is checked
    against the uncompressed size, so compression never makes a record too large here.
    """
    compression = kafka_compression(compression_type)
    return build_client(
        "cannot connect producer",
        bootstrap_servers,
        KafkaProducer,
        bootstrap_servers=bootstrap_servers.split(","),
        client_id=client_id,
        acks="all",
        linger_ms=5,
        max_request_size=32 * 1024 * 1024,
        compression_type=compression,
        key_serializer=KeySerializer(),  # a record with neither key nor value (NULL_KEY)
        **extra,
    )


def ensure_topics(
    bootstrap_servers: str,
    topics: dict[str, int],
    timeout_s: float = 30,
    configs: dict[str, str] | None = None,
    security: dict[str, Any] | None = None,
) -> None:
    """Create the topics that do not exist yet (name -> partitions, replication 1;
    ``configs``: topic configs of the new topics, e.g. ``message.timestamp.type``).

    Returns once every partition of every topic has a leader, so a consumer group
    joining right after sees all partitions.
    """
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.errors import TopicAlreadyExistsError

    admin = build_client(
        "cannot reach Kafka",
        bootstrap_servers,
        KafkaAdminClient,
        bootstrap_servers=bootstrap_servers.split(","),
        **(security or {}),
    )
    try:
        existing = set(admin.list_topics())
        # Replication -1: the cluster's default.replication.factor (KIP-464), not 1.
        new = [
            NewTopic(n, p, -1, topic_configs=dict(configs or {}))
            for n, p in topics.items()
            if n not in existing
        ]
        if new:
            with contextlib.suppress(TopicAlreadyExistsError):
                admin.create_topics(new)
        # A topic that existed keeps its partition count: wait for its leaders only.
        want = {
            n: (p if n not in existing else _partition_count(admin, n)) for n, p in topics.items()
        }
        deadline = time.monotonic() + timeout_s
        while (ready := _partitions_with_leader(admin, want)) != want:
            if time.monotonic() > deadline:
                raise BrokerError(f"topics not ready after {timeout_s} s: {ready} of {want}")
            time.sleep(0.1)
    except KafkaError as exc:
        what = f"cannot create topics {sorted(topics)}"
        denied = authorization_error(what, exc, security or {}, "Create or Describe")
        raise (denied or BrokerError(f"{what}: {exc}")) from exc
    finally:
        admin.close()


def _partition_count(admin: Any, topic: str) -> int:
    for info in admin.describe_topics([topic]):
        if info.get("name") == topic:
            return len(info.get("partitions") or [])
    return 0


def _partitions_with_leader(admin: Any, topics: dict[str, int]) -> dict[str, int]:
    """Per topic, how many partitions have a leader (0 while it is not known yet)."""
    ready = dict.fromkeys(topics, 0)
    try:
        described = admin.describe_topics(list(topics))
    except KafkaError as exc:
        log.debug("describe_topics failed: %r", exc)
        return ready
    for info in described:
        if info.get("name") in ready and info.get("error_code", 0) == 0:
            ready[info["name"]] = sum(
                1
                for p in info.get("partitions") or []
                if p.get("error_code", 0) == 0 and p.get("leader_id", -1) >= 0
            )
    return ready


def count_records(
    bootstrap_servers: str, topic: str, security: dict[str, Any] | None = None
) -> int:
    """Records in ``topic``: the sum of its partitions' end offsets (a topic that started
    empty and was never truncated), 0 for a topic that does not exist."""
    consumer = build_client(
        f"cannot count the records of {topic}",
        bootstrap_servers,
        KafkaConsumer,
        bootstrap_servers=bootstrap_servers.split(","),
        group_id=None,
        **(security or {}),
    )
    try:
        parts = sorted(consumer.partitions_for_topic(topic) or ())
        tps = [TopicPartition(topic, p) for p in parts]
        return sum(consumer.end_offsets(tps).values()) if tps else 0
    finally:
        consumer.close()


def delete_topics(
    bootstrap_servers: str, topics: list[str], security: dict[str, Any] | None = None
) -> None:
    """Delete those of ``topics`` that exist; a failure is logged, not raised (clean-up)."""
    from kafka.admin import KafkaAdminClient

    try:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap_servers.split(","), **(security or {}))
    except KafkaError as exc:
        log.warning("could not delete the topics %s: %r", topics, exc)
        return
    try:
        existing = set(admin.list_topics())
        doomed = [t for t in topics if t in existing]
        if doomed:
            admin.delete_topics(doomed)
    except KafkaError as exc:
        log.warning("could not delete the topics %s: %r", topics, exc)
    finally:
        admin.close()


def read_records(
    bootstrap_servers: str,
    topic: str,
    until: Callable[[list[RawRecord]], bool],
    timeout_s: float,
    security: dict[str, Any] | None = None,
    read_committed: bool = False,
) -> list[RawRecord]:
    """Read ``topic`` from the beginning (no group) until ``until(records)`` holds or
    ``timeout_s`` passes; returns what was read."""
    from worker.edge.kafka_python import to_raw

    consumer = build_client(
        f"cannot read {topic}",
        bootstrap_servers,
        KafkaConsumer,
        topic,
        bootstrap_servers=bootstrap_servers.split(","),
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        isolation_level="read_committed" if read_committed else "read_uncommitted",
        **(security or {}),
    )
    out: list[RawRecord] = []
    deadline = time.monotonic() + timeout_s
    try:
        while not until(out) and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                out.extend(to_raw(r) for r in records)
    except KafkaError as exc:
        raise BrokerError.wrap(f"cannot read {topic}", exc) from exc
    finally:
        consumer.close()
    return out


def timed_read(bootstrap_servers: str, topic: str, records: int, timeout_s: float) -> ReadTiming:
    """Read ``records`` records of ``topic`` from the beginning with a plain kafka-python
    consumer (no group, large fetches): the bench's raw consume.

    The clock starts once the consumer knows the topic's partitions (the first fetch is
    timed, connecting is not) and stops at the last record.
    """
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap_servers.split(","),
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        fetch_max_bytes=FETCH_MAX_BYTES,
        max_partition_fetch_bytes=PARTITION_FETCH_BYTES,
        max_poll_records=500,
    )
    count = nbytes = 0
    deadline = time.monotonic() + timeout_s
    try:
        found = consumer.partitions_for_topic(topic)
        if not found:
            raise BrokerError(f"raw consume: topic {topic} has no partitions")
        tps = [TopicPartition(topic, p) for p in sorted(found)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        start = last = time.perf_counter()
        while count < records:
            if time.monotonic() > deadline:
                raise BrokerError(f"raw consume read {count}/{records} records in {timeout_s} s")
            for batch in consumer.poll(timeout_ms=200).values():
                for r in batch:
                    nbytes += len(r.value or b"") + len(r.key or b"")
                count += len(batch)
                last = time.perf_counter()
    except KafkaError as exc:
        raise BrokerError(f"raw consume of {topic} failed: {exc!r}") from exc
    finally:
        consumer.close()
    return ReadTiming(count, nbytes, max(1e-6, last - start))


class ReadTiming(NamedTuple):
    """What a timed read read, and how long it took."""

    records: int
    nbytes: int
    seconds: float
