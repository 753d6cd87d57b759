"""The bench's baselines, on the client libraries themselves: the raw consume and the
naive loop.

The only code outside the edge that uses a client library (imported inside each
function): a baseline measures the library, so it cannot go through the edge.

The naive baseline is what a user would write instead of mmstream.

A plain client loop with none of the worker's guarantees: consume, group the parts by
key, score a batch once it is full (or once a poll comes back empty), produce one JSON
record per event, commit the consumer's position every second. No dead letters (a part
it cannot use is dropped), no bounds on what it holds, no commit discipline (a
commit can run ahead of predictions still unacknowledged: a crash would lose them), no
rebalance handling, no metrics; nothing of the worker uses it.

:func:`naive_loop` is given what is not Kafka (how to decode a part, how to score a
batch) so the same loop runs on either client (``kafka_client``), the raw library
calls written as its documentation shows them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, cast

from worker.contract.errors import BrokerError
from worker.edge.choice import clients_for
from worker.edge.common import FETCH_MAX_BYTES, PARTITION_FETCH_BYTES

#: (key, headers, value) of one consumed record.
Message = tuple[bytes | None, dict[str, bytes], bytes | None]
#: Decodes one part: (modality, content type, value) -> the model input's tensor.
Decode = Callable[[str, str, bytes], Any]
#: Scores a batch: (event ids, input name -> list of tensors) -> one record value each.
Score = Callable[[list[str], dict[str, list[Any]]], list[bytes]]

COMMIT_EVERY_S = 1.0
#: How long the kafka-python loop waits to learn its topic's partitions before it joins.
METADATA_WAIT_S = 30.0


@dataclass(frozen=True)
class NaiveResult:
    events: int
    dropped_parts: int
    seconds: float


def naive_loop(
    kafka_client: str,
    bootstrap_servers: str,
    topic_in: str,
    topic_out: str,
    group: str,
    inputs: Sequence[str],
    decode: Decode,
    score: Score,
    events: int,
    *,
    batch_size: int = 32,
    timeout_s: float = 600.0,
) -> NaiveResult:
    """Run the naive loop on ``topic_in`` (from the beginning, group ``group``) until it
    has produced ``events`` predictions to ``topic_out``; time first record -> last ack.

    Raises:
        BrokerError: it did not get that far within ``timeout_s``.
    """
    io = _ConfluentIO if kafka_client == "confluent" else _KafkaPythonIO
    client = io(bootstrap_servers, topic_in, group)
    wanted = set(inputs)
    pending: dict[str, dict[str, Any]] = {}
    batch: list[tuple[str, dict[str, Any]]] = []
    produced = dropped = 0
    start: float | None = None
    last_commit = time.monotonic()
    deadline = last_commit + timeout_s
    try:
        while produced < events:
            if time.monotonic() > deadline:
                raise BrokerError(f"naive baseline: {produced}/{events} events in {timeout_s} s")
            got = 0
            for key, headers, value in client.poll():
                got += 1
                start = start or time.perf_counter()
                modality = headers.get("mm-modality", b"").decode()
                if key is None or value is None or modality not in wanted:
                    dropped += 1
                    continue
                try:
                    tensor = decode(modality, headers.get("content-type", b"").decode(), value)
                except Exception:  # a user's loop drops what it cannot decode
                    dropped += 1
                    continue
                event_id = key.decode()
                parts = pending.setdefault(event_id, {})
                parts[modality] = tensor
                if len(parts) == len(wanted):
                    batch.append((event_id, pending.pop(event_id)))
            if batch and (len(batch) >= batch_size or got == 0):
                for chunk in range(0, len(batch), batch_size):
                    done = batch[chunk : chunk + batch_size]
                    ids = [eid for eid, _ in done]
                    feeds = {name: [parts[name] for _, parts in done] for name in inputs}
                    for eid, value in zip(ids, score(ids, feeds), strict=True):
                        client.produce(topic_out, eid.encode(), value)
                produced += len(batch)
                batch.clear()
            if time.monotonic() - last_commit >= COMMIT_EVERY_S:
                client.commit()
                last_commit = time.monotonic()
        client.flush()
        seconds = time.perf_counter() - (start or time.perf_counter())
    finally:
        client.close()
    return NaiveResult(produced, dropped, max(seconds, 1e-6))


class _ConfluentIO:
    def __init__(self, bootstrap_servers: str, topic: str, group: str) -> None:
        from confluent_kafka import Consumer, Producer

        self.consumer = Consumer(
            {
                "bootstrap.servers": bootstrap_servers,
                "group.id": group,
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
            }
        )
        self.consumer.subscribe([topic])
        self.producer = Producer({"bootstrap.servers": bootstrap_servers, "linger.ms": 5})

    def poll(self) -> Iterator[Message]:
        # consume(500, 0.1) would wait the whole 0.1 s for 500 records: wait for the first
        # only, then take what is there (the fastest simple way, as the worker does).
        first = self.consumer.poll(0.1)
        messages = [first, *self.consumer.consume(499, 0)] if first is not None else []
        for m in messages:
            if m.error() is None:
                headers = cast(list[tuple[str, bytes]], m.headers() or [])
                yield m.key(), dict(headers), m.value()
        self.producer.poll(0)

    def produce(self, topic: str, key: bytes, value: bytes) -> None:
        while True:
            try:
                self.producer.produce(topic, value, key)
                return
            except BufferError:
                self.producer.poll(0.05)

    def commit(self) -> None:
        self.consumer.commit(asynchronous=True)

    def flush(self) -> None:
        if self.producer.flush(60):
            raise BrokerError("naive baseline: predictions not acknowledged in 60 s")

    def close(self) -> None:
        self.consumer.close()


class _KafkaPythonIO:
    def __init__(self, bootstrap_servers: str, topic: str, group: str) -> None:
        from kafka import KafkaConsumer, KafkaProducer

        self.consumer = KafkaConsumer(
            bootstrap_servers=bootstrap_servers.split(","),
            group_id=group,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        # A member that joins before it knows the topic's partitions is assigned none, and
        # kafka-python asks again only at its next metadata refresh (5 minutes).
        deadline = time.monotonic() + METADATA_WAIT_S
        while not self.consumer.partitions_for_topic(topic) and time.monotonic() < deadline:
            time.sleep(0.1)
        self.consumer.subscribe([topic])
        self.producer = KafkaProducer(bootstrap_servers=bootstrap_servers.split(","), linger_ms=5)

    def poll(self) -> Iterator[Message]:
        for records in self.consumer.poll(timeout_ms=100, max_records=500).values():
            for r in records:
                yield r.key, dict(r.headers or ()), r.value

    def produce(self, topic: str, key: bytes, value: bytes) -> None:
        self.producer.send(topic, key=key, value=value)

    def commit(self) -> None:
        self.consumer.commit_async()

    def flush(self) -> None:
        self.producer.flush(timeout=60)

    def close(self) -> None:
        self.producer.close(timeout=5)
        self.consumer.close()


# ------------------------------------------------------------------ the raw consume


class ReadTiming(NamedTuple):
    """What a timed read read, and how long it took."""

    records: int
    nbytes: int
    seconds: float


def timed_read_for(kafka_client: str) -> Callable[[str, str, int, float], ReadTiming]:
    """The raw, group-less timed read of ``--kafka-client`` (the bench's raw consume):
    ``read(bootstrap_servers, topic, records, timeout_s)``. The clock starts once the
    consumer knows the topic's partitions (connecting is not timed) and stops at the
    last record."""
    clients_for(kafka_client)  # refuses an unknown client, or one not installed
    return _confluent_read if kafka_client == "confluent" else _kafka_python_read


def _kafka_python_read(
    bootstrap_servers: str, topic: str, records: int, timeout_s: float
) -> ReadTiming:
    from kafka import KafkaConsumer
    from kafka.errors import KafkaError
    from kafka.structs import TopicPartition

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


def _confluent_read(
    bootstrap_servers: str, topic: str, records: int, timeout_s: float
) -> ReadTiming:
    from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition

    from worker.edge.confluent.settings import FETCH_SETTINGS

    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap_servers,
            "group.id": "mmstream-bench-raw",
            "enable.auto.commit": False,
            **FETCH_SETTINGS,
        }
    )
    count = nbytes = 0
    deadline = time.monotonic() + timeout_s
    try:
        found = consumer.list_topics(topic, timeout=10.0).topics.get(topic)
        if found is None or found.error is not None or not found.partitions:
            raise BrokerError(f"raw consume: topic {topic} has no partitions")
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in found.partitions])
        start = last = time.perf_counter()
        while count < records:
            if time.monotonic() > deadline:
                raise BrokerError(f"raw consume read {count}/{records} records in {timeout_s} s")
            batch = consumer.consume(500, 0.2)
            for m in batch:
                if m.error() is None:
                    nbytes += len(m.value() or b"") + len(m.key() or b"")
                    count += 1
            if batch:
                last = time.perf_counter()
    except KafkaException as exc:
        raise BrokerError(f"raw consume of {topic} failed: {exc}") from exc
    finally:
        consumer.close()
    return ReadTiming(count, nbytes, max(1e-6, last - start))


def client_versions() -> dict[str, str]:
    """``kafka_python`` and ``confluent_kafka`` (with librdkafka's): the versions installed,
    "" for one that is not (the bench's machine information)."""
    try:
        import kafka
    except ImportError:
        kafka_python = ""
    else:
        kafka_python = str(kafka.__version__)
    try:
        import confluent_kafka
    except ImportError:
        confluent = ""
    else:
        confluent = f"{confluent_kafka.version()[0]} (librdkafka {confluent_kafka.libversion()[0]})"
    return {"kafka_python": kafka_python, "confluent_kafka": confluent}
