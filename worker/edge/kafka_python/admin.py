"""Topic administration and reading a topic back, with kafka-python (tools and tests:
the worker's loop never calls these)."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from kafka import KafkaConsumer
from kafka.errors import KafkaError
from kafka.structs import TopicPartition

from worker.contract.errors import BrokerError
from worker.contract.records import RawRecord
from worker.edge.common import AUTHORIZATION
from worker.edge.kafka_python.build import build_client
from worker.edge.kafka_python.records import to_raw
from worker.edge.kafka_python.security import broker_error, failure

log = logging.getLogger(__name__)


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
        if failure(exc).name in AUTHORIZATION:
            raise broker_error(what, exc, security, "Create or Describe") from exc
        raise BrokerError(f"{what}: {exc}") from exc
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
