"""kafka-python's records and offsets, as the edge's interface has them."""

from __future__ import annotations

from typing import Any

from kafka.structs import OffsetAndMetadata, TopicPartition

from worker.contract.records import LogRecord, RawRecord, SourceRef
from worker.edge.client import TP, Positions


def topic_partition(tp: TP) -> TopicPartition:
    return TopicPartition(tp[0], tp[1])


def to_raw(record: Any) -> RawRecord:
    """A kafka-python ``ConsumerRecord`` -> :class:`RawRecord`."""
    return RawRecord(
        source=SourceRef(record.topic, record.partition, record.offset, record.timestamp),
        key=record.key,
        value=record.value,
        headers=tuple((k, v if v is not None else b"") for k, v in (record.headers or ())),
    )


def to_log_record(record: Any) -> LogRecord:
    """A kafka-python ``ConsumerRecord`` (no deserializers) -> :class:`LogRecord`, lossless."""
    return LogRecord(
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        timestamp=record.timestamp if record.timestamp is not None else -1,
        timestamp_type="log_append" if record.timestamp_type == 1 else "create",
        key=record.key,
        value=record.value,
        headers=tuple((name, value) for name, value in (record.headers or ())),
    )


def to_offsets(positions: Positions) -> dict[TopicPartition, OffsetAndMetadata]:
    """(topic, partition) -> (next offset, metadata) as kafka-python wants them."""
    return {
        TopicPartition(topic, part): OffsetAndMetadata(pos, meta, -1)
        for (topic, part), (pos, meta) in positions.items()
    }
