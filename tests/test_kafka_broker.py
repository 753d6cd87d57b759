"""The broker fixture works end to end: create a topic, produce, consume it all back."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

import pytest
from kafka import KafkaConsumer, KafkaProducer

pytestmark = pytest.mark.integration

N_RECORDS = 50


def test_produce_and_consume_roundtrip(
    kafka_bootstrap: str, topic_factory: Callable[..., str]
) -> None:
    topic = topic_factory(3)
    keys = [f"key-{i:03d}".encode() for i in range(N_RECORDS)]

    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all", linger_ms=5)
    try:
        futures = [producer.send(topic, key=k, value=b"v-" + k) for k in keys]
        producer.flush(timeout=30)
        partitions = {f.get(timeout=30).partition for f in futures}
    finally:
        producer.close(timeout=10)
    assert partitions == {0, 1, 2}  # the 50 fixed keys hash onto all three

    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=kafka_bootstrap,
        group_id=f"mm-test-{uuid.uuid4().hex}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    got: list[tuple[bytes | None, bytes | None]] = []
    try:
        deadline = time.monotonic() + 30
        while len(got) < N_RECORDS and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                got.extend((r.key, r.value) for r in records)
    finally:
        consumer.close()

    assert len(got) == N_RECORDS
    assert sorted(k for k, _ in got if k is not None) == keys
    assert all(v == b"v-" + k for k, v in got if k is not None)
