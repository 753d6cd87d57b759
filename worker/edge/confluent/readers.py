"""The tools' readers over librdkafka: the :class:`~worker.edge.client.Inspector` (a
topic's partitions and offsets, a group's checkpoint) and the
:class:`~worker.edge.client.RangeReader` (exact offset ranges, lossless)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, cast

from confluent_kafka import (
    TIMESTAMP_LOG_APPEND_TIME,
    TIMESTAMP_NOT_AVAILABLE,
    Consumer,
    KafkaError,
    KafkaException,
    TopicPartition,
)

from worker.contract.errors import BrokerError
from worker.contract.records import LogRecord
from worker.edge.common import Progress
from worker.edge.confluent.errors import (
    LOOKUP_TIMEOUT_S,
    Errors,
    broker_error,
    connect,
    denied,
    log_record_headers,
    wrapped,
)
from worker.edge.confluent.settings import FETCH_SETTINGS, common_settings

if TYPE_CHECKING:
    from worker.config import KafkaSecurity

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ the inspector


class ConfluentInspector:
    """:class:`~worker.edge.client.Inspector` over a group-less librdkafka ``Consumer``."""

    def __init__(
        self, bootstrap_servers: str, security: KafkaSecurity, read_committed: bool
    ) -> None:
        self.security = security.kafka_security()
        self._conf: dict[str, Any] = {
            **common_settings(bootstrap_servers, security),
            "enable.auto.commit": False,
            "isolation.level": "read_committed" if read_committed else "read_uncommitted",
        }
        self._c = self._consumer("mmstream-inspector")

    def _consumer(self, group: str) -> Consumer:
        errors = Errors(self._conf["bootstrap.servers"], self.security)
        try:
            c = Consumer({**self._conf, "group.id": group, "error_cb": errors})
        except KafkaException as exc:
            raise broker_error("cannot connect", exc, self.security) from exc
        try:
            connect(c, errors, "cannot connect")
        except BaseException:
            c.close()
            raise
        return c

    @wrapped("cannot read topic metadata")
    def partitions(self, topic: str) -> list[int]:
        found = self._c.list_topics(topic, timeout=LOOKUP_TIMEOUT_S).topics.get(topic)
        if found is None or found.error is not None:
            return []
        return sorted(found.partitions)

    @wrapped("cannot read offsets")
    def offset_bounds(self, topic: str, partitions: Iterable[int]) -> dict[int, tuple[int, int]]:
        out: dict[int, tuple[int, int]] = {}
        for p in partitions:
            low, high = self._c.get_watermark_offsets(
                TopicPartition(topic, p), timeout=LOOKUP_TIMEOUT_S
            )
            out[p] = (int(low), int(high))
        return out

    @wrapped("cannot look up offsets by time")
    def offsets_for_time(
        self, topic: str, partitions: Iterable[int], ms: int
    ) -> dict[int, int | None]:
        wanted = [TopicPartition(topic, p, max(0, ms)) for p in partitions]
        if not wanted:
            return {}
        found = self._c.offsets_for_times(wanted, timeout=LOOKUP_TIMEOUT_S)
        return {tp.partition: (int(tp.offset) if tp.offset >= 0 else None) for tp in found}

    @wrapped("cannot read the group's checkpoint")
    def committed(self, group: str, topic: str, partitions: Iterable[int]) -> dict[int, int | None]:
        wanted = [TopicPartition(topic, p) for p in partitions]
        reader = self._consumer(group)
        try:  # reads the checkpoint; joins nothing, commits nothing
            found = reader.committed(wanted, timeout=LOOKUP_TIMEOUT_S) if wanted else []
        finally:
            reader.close()
        return {tp.partition: (int(tp.offset) if tp.offset >= 0 else None) for tp in found}

    def close(self) -> None:
        self._c.close()


# ------------------------------------------------------------------ the range reader

#: librdkafka's timestamp types (``Message.timestamp()[0]``) as an archive names them.
_TIMESTAMP_TYPES = {TIMESTAMP_LOG_APPEND_TIME: "log_append"}


class ConfluentRangeReader:
    """:class:`~worker.edge.client.RangeReader` over a librdkafka ``Consumer`` that assigns
    partitions itself (never subscribes, never commits: it leaves no group behind)."""

    def __init__(self, bootstrap_servers: str, security: KafkaSecurity, client_id: str) -> None:
        self.security = security.kafka_security()
        conf = {
            **common_settings(bootstrap_servers, security),
            "client.id": client_id,
            "group.id": client_id,  # librdkafka wants one; nothing joins or commits
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "allow.auto.create.topics": False,
            # A range start deleted by retention while reading is an error, never a skip.
            "auto.offset.reset": "error",
            # The end of a partition's log is reported: a range ending in transaction
            # markers (offsets no record is returned for) ends there.
            "enable.partition.eof": True,
            **FETCH_SETTINGS,
        }
        self._errors = Errors(bootstrap_servers, self.security)
        try:
            self._c = Consumer({**conf, "error_cb": self._errors})
        except KafkaException as exc:
            raise broker_error("cannot connect consumer", exc, self.security) from exc
        try:
            connect(self._c, self._errors, "cannot connect consumer")
        except BaseException:
            self._c.close()
            raise

    def read(
        self, topic: str, partition: int, start: int, end: int, timeout_s: float
    ) -> Iterator[LogRecord]:
        if end <= start:
            return
        where = f"{topic}/{partition} [{start}, {end})"
        try:
            self._c.assign([TopicPartition(topic, partition, start)])
        except KafkaException as exc:
            raise broker_error(f"reading {where}", exc, self.security) from exc
        progress = Progress(where, start, timeout_s)
        position = start
        while position < end:
            try:
                messages = self._c.consume(500, 0.2)
            except KafkaException as exc:
                raise broker_error(f"reading {where}", exc, self.security) from exc
            for m in messages:
                err = m.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        position = max(position, cast(int, m.offset()))
                        continue
                    if err.code() == KafkaError._AUTO_OFFSET_RESET:
                        raise BrokerError(
                            f"reading {where}: offset {position} is no longer in the log "
                            f"(deleted by retention?): {err.str()}",
                            retriable=False,
                        )
                    if err.fatal() or denied(err):
                        raise broker_error(f"reading {where}", err, self.security)
                    log.warning("reading %s: %s", where, err.str())
                    continue
                if m.topic() != topic or m.partition() != partition:
                    continue
                offset = cast(int, m.offset())
                if offset >= end:
                    position = end
                    break
                position = max(position, offset + 1)
                if offset >= start:
                    ts_type, ts = m.timestamp()
                    yield LogRecord(
                        topic=topic,
                        partition=partition,
                        offset=offset,
                        timestamp=ts if ts_type != TIMESTAMP_NOT_AVAILABLE else -1,
                        timestamp_type=_TIMESTAMP_TYPES.get(ts_type, "create"),
                        key=m.key(),
                        value=m.value(),
                        headers=log_record_headers(m.headers()),
                    )
            progress.at(position)

    def close(self) -> None:
        try:
            self._c.close()
        except (KafkaException, RuntimeError) as exc:
            log.warning("closing the range reader failed: %r", exc)
