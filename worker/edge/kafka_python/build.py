"""Building kafka-python's clients with mmstream's settings.

Every client is built under a :class:`~worker.edge.kafka_python.security.BootstrapWatch`:
a wrong password, an untrusted broker certificate or a refused client certificate fails
at once with one line naming it (``retriable=False``), not after kafka-python's 30 s
bootstrap timeout with ``Unable to bootstrap``. With a secured protocol,
:func:`make_consumer` also checks the worker's ACLs before it joins.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

from kafka import KafkaConsumer, KafkaProducer, codec
from kafka.coordinator.assignors.cooperative_sticky import CooperativeStickyAssignor
from kafka.errors import KafkaError
from kafka.serializer import Serializer

from worker.config import WorkerConfig, check_compression
from worker.contract.errors import ConfigError
from worker.edge.common import FETCH_MAX_BYTES, PARTITION_FETCH_BYTES, worker_access
from worker.edge.kafka_python.security import BootstrapWatch, check_access

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
