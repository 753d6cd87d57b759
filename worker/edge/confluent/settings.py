"""librdkafka's settings of mmstream's clients: where, how securely, and how they fetch,
commit and produce (as kafka-python's, :mod:`worker.edge.kafka_python.build`)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from worker.config import check_compression
from worker.edge.common import (
    FETCH_MAX_BYTES,
    PARTITION_FETCH_BYTES,
)

if TYPE_CHECKING:
    from worker.config import KafkaSecurity, WorkerConfig

log = logging.getLogger(__name__)


#: librdkafka bootstraps again after this long without metadata from any broker: its
#: default (5 min) strands a client that a shutting-down cluster told of no brokers.
REBOOTSTRAP_AFTER_MS = 10_000


#: How long librdkafka waits before fetching a partition again once its prefetch queue is
#: full: its default, 1 000 ms, idles a consumer that drains the queue sooner
#: (docs/benchmarks.md).
FETCH_QUEUE_BACKOFF_MS = 10

#: ``coordinator.query.interval.ms`` of the worker's consumer (librdkafka: 600 000).
COORDINATOR_QUERY_MS = 10_000

#: The fetch settings of every mmstream consumer on librdkafka (as kafka-python's).
FETCH_SETTINGS: dict[str, Any] = {
    "fetch.max.bytes": FETCH_MAX_BYTES,
    "max.partition.fetch.bytes": PARTITION_FETCH_BYTES,
    "fetch.queue.backoff.ms": FETCH_QUEUE_BACKOFF_MS,
}


def common_settings(bootstrap_servers: str, security: KafkaSecurity) -> dict[str, Any]:
    """What every librdkafka client of mmstream sets: where, how securely, re-bootstrap."""
    return {
        "bootstrap.servers": bootstrap_servers,
        "metadata.recovery.strategy": "rebootstrap",
        "metadata.recovery.rebootstrap.trigger.ms": REBOOTSTRAP_AFTER_MS,
        **librdkafka_security(security),
    }


def librdkafka_security(security: KafkaSecurity) -> dict[str, Any]:
    """The ``--security-*``, ``--sasl-*`` and ``--ssl-*`` settings as librdkafka's."""
    out: dict[str, Any] = {"security.protocol": security.security_protocol.lower()}
    if security.security_protocol.startswith("SASL"):
        out.update(
            {
                "sasl.mechanism": security.sasl_mechanism,
                "sasl.username": security.sasl_username,
                "sasl.password": security.sasl_password,
            }
        )
    for ours, theirs in (
        ("ssl_cafile", "ssl.ca.location"),
        ("ssl_certfile", "ssl.certificate.location"),
        ("ssl_keyfile", "ssl.key.location"),
    ):
        value = getattr(security, ours)
        if value is not None:
            out[theirs] = str(value)
    return out


def _compression(compression_type: str | None) -> str:
    if compression_type is None:
        return "none"
    check_compression(compression_type)
    return compression_type


#: How often librdkafka reports its statistics to a consumer (its group state is read
#: from them): about 7 KB of JSON a second for a few partitions.
STATS_INTERVAL_MS = 1000


def consumer_settings(config: WorkerConfig) -> dict[str, Any]:
    """The worker's consumer settings, as kafka-python's (:mod:`worker.edge.kafka_python.build`)."""
    conf: dict[str, Any] = {
        **common_settings(config.bootstrap_servers, config),
        "group.id": config.group_id,
        "client.id": config.client_id,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": config.auto_offset_reset,
        "partition.assignment.strategy": "cooperative-sticky",
        "session.timeout.ms": config.session_timeout_ms,
        "heartbeat.interval.ms": max(300, min(1000, config.session_timeout_ms // 3)),
        "isolation.level": (
            "read_committed" if config.guarantee == "exactly-once" else "read_uncommitted"
        ),
        "topic.metadata.refresh.interval.ms": 30_000,
        # librdkafka's 10 min left a consumer out of its group for over a minute after a
        # broker restart answered "Not coordinator" (confluentinc/librdkafka#2944).
        "coordinator.query.interval.ms": COORDINATOR_QUERY_MS,
        # The group's state comes with librdkafka's statistics (ConfluentConsumer.in_group).
        "statistics.interval.ms": STATS_INTERVAL_MS,
        # Prefetched records wait in librdkafka's queue beside what the worker holds:
        # never more than the worker's own byte bound (a larger record still comes alone).
        **FETCH_SETTINGS,
        "fetch.max.bytes": min(FETCH_MAX_BYTES, config.max_pending_bytes),
        "max.partition.fetch.bytes": min(PARTITION_FETCH_BYTES, config.max_pending_bytes),
        "queued.max.messages.kbytes": max(1024, min(65_536, config.max_pending_bytes // 1024)),
    }
    if config.group_instance_id:
        conf["group.instance.id"] = config.group_instance_id
    return conf


def producer_settings(
    bootstrap_servers: str,
    client_id: str,
    security: KafkaSecurity,
    *,
    compression_type: str | None = None,
    transactional_id: str = "",
) -> dict[str, Any]:
    """An idempotent producer with acks=all, keys partitioned like the Java client's."""
    conf: dict[str, Any] = {
        **common_settings(bootstrap_servers, security),
        "client.id": client_id,
        "acks": "all",
        "enable.idempotence": True,
        "linger.ms": 5,
        "partitioner": "murmur2_random",
        "message.max.bytes": 32 * 1024 * 1024,
        "compression.type": _compression(compression_type),
    }
    if transactional_id:
        conf["transactional.id"] = transactional_id
    else:
        conf["delivery.timeout.ms"] = 120_000  # kafka-python's default
    return conf
