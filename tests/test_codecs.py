"""Every codec, and the partitioner rule of the message contract, against a real broker.

* Topics written by an independent librdkafka producer (confluent-kafka) with
  ``compression.type`` gzip, snappy, lz4 or zstd are read by the worker, replay and
  archive from the base install (kafka-python's lz4/snappy/zstd extras).
* ``--compression-type`` compresses what mmstream writes: the worker's predictions
  and dead letters, ``mmstream produce``, replay's outputs and an archive's restore.
  Which codec a stored batch really carries is read from the batches themselves
  (:func:`batch_codecs`), and an independent librdkafka consumer reads them back.
* librdkafka's default partitioner hashes keys with CRC32, kafka-python's (and the
  Java client's) with murmur2: parts of one event sent by both land apart, never
  meet, and are dead-lettered as ``incomplete_event``; ``partitioner=murmur2_random``
  puts them together again.
"""

from __future__ import annotations

import contextlib
import json
import time
import tomllib
import uuid
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer
from confluent_kafka import TopicPartition as CTopicPartition
from kafka import KafkaProducer, codec
from kafka.partitioner.default import murmur2
from kafka.record.memory_records import MemoryRecords

from worker.backfill.ranges import format_time
from worker.backfill.replay import ReplayConfig, run_replay
from worker.config import COMPRESSION_TYPES, WorkerConfig
from worker.contract.errors import ConfigError
from worker.contract.manifest import load_manifest
from worker.contract.reference_data import samples
from worker.edge.kafka_python.build import kafka_compression
from worker.tools.produce import ProduceConfig, encode_sample, produce

from kafka_broker import committed_offsets, end_offsets, read_topic
from test_worker_kafka import RunningWorker, make_config

ROOT = Path(__file__).resolve().parents[1]
CODECS = ("gzip", "snappy", "lz4", "zstd")
#: The codec ids of a record batch's attributes (the Kafka protocol's numbering).
CODEC_IDS = {0: "none", 1: "gzip", 2: "snappy", 3: "lz4", 4: "zstd"}
HOUR_AGO = int(time.time() * 1000) - 3_600_000

Rec = tuple[str, str, bytes, str]  # key, modality, value, content type
Placed = tuple[int, int]  # partition, offset


# ------------------------------------------------------------------ helpers


def headers_of(modality: str, ctype: str) -> list[tuple[str, bytes]]:
    return [("mm-modality", modality.encode()), ("content-type", ctype.encode())]


def librdkafka_send(
    bootstrap: str,
    topic: str,
    records: Sequence[Rec],
    *,
    compression: str = "none",
    partitioner: str | None = "murmur2_random",
    timestamps: Sequence[int] | None = None,
    partitions: Sequence[int] | None = None,
) -> list[Placed]:
    """Send ``records`` with confluent-kafka (librdkafka) in order; return where each landed.

    ``partitioner=None`` keeps librdkafka's default (consistent_random: CRC32 of the key).
    ``partitions`` sends each record to the partition given instead.
    """
    conf: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        "acks": "all",
        "enable.idempotence": True,
        "linger.ms": 20,  # several records per batch: batches are what is compressed
        "compression.type": compression,
    }
    if partitioner is not None:
        conf["partitioner"] = partitioner
    producer = Producer(conf)
    placed: list[Placed | None] = [None] * len(records)
    errors: list[str] = []

    def report(i: int) -> Callable[[Any, Any], None]:
        def on_delivery(err: Any, msg: Any) -> None:
            if err is not None:
                errors.append(str(err))
            else:
                placed[i] = (msg.partition(), msg.offset())

        return on_delivery

    for i, (key, modality, value, ctype) in enumerate(records):
        kw: dict[str, Any] = {}
        if timestamps is not None:
            kw["timestamp"] = timestamps[i]
        if partitions is not None:
            kw["partition"] = partitions[i]
        producer.produce(
            topic,
            key=key.encode(),
            value=value,
            headers=headers_of(modality, ctype),
            on_delivery=report(i),
            **kw,
        )
        producer.poll(0)
    left = producer.flush(30)
    assert left == 0 and not errors, f"librdkafka: {left} not delivered, errors {errors[:3]}"
    assert all(p is not None for p in placed)
    return [p for p in placed if p is not None]


def kafka_python_send(bootstrap: str, topic: str, records: Sequence[Rec]) -> list[Placed]:
    """Send with kafka-python's default partitioner (murmur2); return where each landed."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    try:
        futures = [
            producer.send(topic, key=k.encode(), value=v, headers=headers_of(m, c))
            for k, m, v, c in records
        ]
        producer.flush()
        return [(md.partition, md.offset) for md in (f.get(timeout=10) for f in futures)]
    finally:
        producer.close()


def librdkafka_read(bootstrap: str, topic: str, n: int, timeout_s: float = 30.0) -> list[Any]:
    """``n`` records of ``topic`` read by confluent-kafka from the start (assigned, no group
    join); each as (partition, offset, key, value)."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"mm-test-read-{uuid.uuid4().hex}",  # required; never joined
            "enable.auto.commit": False,
        }
    )
    out: list[Any] = []
    try:
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([CTopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        deadline = time.monotonic() + timeout_s
        while len(out) < n and time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is None:
                continue
            assert msg.error() is None, f"librdkafka read {topic}: {msg.error()}"
            out.append((msg.partition(), msg.offset(), msg.key(), msg.value()))
    finally:
        consumer.close()
    return out


@contextlib.contextmanager
def batch_codecs() -> Iterator[list[str]]:
    """The codec of every record batch kafka-python's consumers parse meanwhile.

    Read from each fetched batch's attributes, i.e. what the producer wrote and the
    broker stored; use it only while no other kafka-python consumer runs in the process.
    """
    seen: list[str] = []
    real = MemoryRecords.next_batch

    def spy(self: MemoryRecords, *args: Any, **kw: Any) -> Any:
        batch = real(self, *args, **kw)
        if batch is not None:
            seen.append(CODEC_IDS[batch.compression_type])
        return batch

    MemoryRecords.next_batch = spy  # type: ignore[method-assign]
    try:
        yield seen
    finally:
        MemoryRecords.next_batch = real  # type: ignore[method-assign]


def assert_compressed(codecs: list[str], codec: str) -> None:
    """Batches were written with ``codec``: some are, none with another one.

    A batch may go uncompressed ("none"): both kafka-python and librdkafka send a batch
    as it is when the codec would not make it smaller (a PNG part, say).
    """
    assert codec in codecs, f"no {codec} batch among {codecs}"
    assert set(codecs) <= {codec, "none"}, codecs


def read_with_codecs(bootstrap: str, topic: str, n: int) -> tuple[list[Any], list[str]]:
    """The first ``n`` records of ``topic`` (kafka-python) and the codecs of their batches."""
    with batch_codecs() as codecs:
        records = read_topic(bootstrap, topic, lambda got: len(got) >= n, 30)
    return records, codecs


def npy_events(model: Path, prefix: str, n: int, seed: int) -> list[Rec]:
    manifest = load_manifest(model)
    out: list[Rec] = []
    for i, s in enumerate(samples(n, np.random.default_rng(seed), split="test")):
        out += encode_sample(f"{prefix}-{i:03d}", s, "npy", manifest)
    return out


def worker_config(
    bootstrap: str, topics: tuple[str, str, str], model: Path, **kw: Any
) -> WorkerConfig:
    return make_config(bootstrap, topics, model, **kw)


def wait_committed(bootstrap: str, group: str, topic: str, partitions: int) -> dict[int, Any]:
    """Poll the group's committed offsets until they reach the log ends (or 60 s)."""
    ends = end_offsets(bootstrap, topic, partitions)
    deadline = time.monotonic() + 60
    got = committed_offsets(bootstrap, group, topic, partitions)
    while got != ends and time.monotonic() < deadline:
        time.sleep(0.3)
        got = committed_offsets(bootstrap, group, topic, partitions)
    return got


# ------------------------------------------------------------------ the base install


def test_kafka_python_finds_every_codec_of_the_base_install() -> None:
    assert codec.has_gzip() and codec.has_snappy() and codec.has_lz4() and codec.has_zstd()
    payload = b"mmstream " * 5000 + bytes(range(256)) * 40
    for name in CODECS:
        encode, decode = getattr(codec, f"{name}_encode"), getattr(codec, f"{name}_decode")
        assert decode(encode(payload)) == payload, name


def test_the_codecs_are_base_dependencies_with_wheel_only_floors_and_pins() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = " ".join(project["dependencies"])
    (kafka,) = [d for d in project["dependencies"] if d.startswith("kafka-python[")]
    extras = set(kafka.split("[", 1)[1].split("]", 1)[0].split(","))
    assert {"crc32c", "lz4", "snappy", "zstd"} <= extras
    # python-snappy < 0.7 compiles a C extension; 0.7 is pure Python over cramjam's wheels.
    assert "python-snappy>=0.7" in deps and "lz4>=" in deps and "zstandard>=" in deps
    assert not any("confluent" in d for d in project["dependencies"])  # tests only
    assert any(d.startswith("confluent-kafka") for d in project["optional-dependencies"]["test"])
    pins = {
        line.split("==")[0].lower().replace("_", "-")
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    }
    assert {"lz4", "python-snappy", "cramjam", "zstandard", "confluent-kafka"} <= pins


# ------------------------------------------------------------------ --compression-type


def test_compression_type_none_is_kafka_pythons_none_and_bad_values_are_refused() -> None:
    assert COMPRESSION_TYPES == ("none", "gzip", "snappy", "lz4", "zstd")
    assert kafka_compression("none") is None and kafka_compression(None) is None
    assert [kafka_compression(c) for c in CODECS] == list(CODECS)
    expected = r"--compression-type must be one of \['none', 'gzip', 'snappy', 'lz4', 'zstd'\]"
    with pytest.raises(ConfigError, match=expected):
        kafka_compression("brotli")
    worker = {
        "bootstrap_servers": "b:9092",
        "input_topic": "in",
        "output_topic": "out",
        "group_id": "g",
        "model": "m",
    }
    assert WorkerConfig.from_mapping(worker).compression_type == "none"
    with pytest.raises(ConfigError, match=expected + ", not 'ZSTD'"):
        WorkerConfig.from_mapping({**worker, "compression_type": "ZSTD"})
    with pytest.raises(ConfigError, match=expected):
        ProduceConfig.from_mapping({"bootstrap_servers": "b", "topic": "t", "compression_type": ""})
    replay = {"bootstrap_servers": "b", "source_topic": "in", "model": "m", "ranges": "0:0-"}
    assert ReplayConfig.from_mapping({**replay, "compression_type": "lz4"}).compression_type
    with pytest.raises(ConfigError, match=expected):
        ReplayConfig.from_mapping({**replay, "compression_type": "snappy2"})


@pytest.mark.parametrize("command", ["worker", "produce", "replay"])
def test_a_bad_compression_env_var_is_one_line_and_exit_2(
    command: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from worker.cli import main

    argv = {
        "worker": ["--input-topic", "i", "--output-topic", "o", "--group-id", "g", "--model", "m"],
        "produce": ["--topic", "t"],
        "replay": ["--source-topic", "i", "--model", "m", "--range", "0:0-"],
    }[command]
    monkeypatch.setenv("MMSTREAM_COMPRESSION_TYPE", "brotli")
    assert main([command, "--bootstrap-servers", "127.0.0.1:1", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--compression-type must be one of" in err and "'brotli'" in err
    # A bad flag value is refused by argparse itself (usage error, exit 2).
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--bootstrap-servers", "b", *argv, "--compression-type", "brotli"])
    assert exit_info.value.code == 2
    assert "--compression-type" in capsys.readouterr().err


# ------------------------------------------------------------------ reading compressed topics


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("compression", CODECS)
def test_worker_predicts_every_event_of_a_librdkafka_compressed_topic(
    kafka_bootstrap: str,
    topic_factory: Callable[..., str],
    tiny_model_dir: Path,
    compression: str,
) -> None:
    topics = (topic_factory(3), topic_factory(1), topic_factory(1))
    records = npy_events(tiny_model_dir, compression, 12, seed=21)
    librdkafka_send(kafka_bootstrap, topics[0], records, compression=compression)
    _, stored = read_with_codecs(kafka_bootstrap, topics[0], len(records))
    assert_compressed(stored, compression)  # the input really is compressed

    config = worker_config(kafka_bootstrap, topics, tiny_model_dir)
    with RunningWorker(config) as running:
        out = read_topic(kafka_bootstrap, topics[1], lambda got: len(got) >= 12, 60)
        assert running.alive(), f"the worker stopped: {running.error!r}"
        committed = wait_committed(kafka_bootstrap, config.group_id, topics[0], 3)
    assert not running.thread.is_alive() and running.error is None  # stopped when asked
    assert sorted(r.key.decode() for r in out) == sorted({r[0] for r in records})
    assert all(json.loads(r.value)["label"] is not None for r in out)
    assert running.stats is not None
    assert running.stats.consumed == len(records) and running.stats.predicted == 12
    assert committed == end_offsets(kafka_bootstrap, topics[0], 3)


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("compression", ["zstd", "lz4"])
def test_worker_compression_type_compresses_predictions_and_dead_letters(
    kafka_bootstrap: str,
    topic_factory: Callable[..., str],
    tiny_model_dir: Path,
    compression: str,
) -> None:
    topics = (topic_factory(2), topic_factory(2), topic_factory(1))
    records = npy_events(tiny_model_dir, "out", 10, seed=22)
    # One dead letter, its value kept: compressible, as dead letters of text parts are.
    records.append(("junk", "no-such-input", b"not for this model " * 100, "text/plain"))
    kafka_python_send(kafka_bootstrap, topics[0], records)
    config = worker_config(kafka_bootstrap, topics, tiny_model_dir, compression_type=compression)
    with RunningWorker(config) as running:
        read_topic(kafka_bootstrap, topics[1], lambda got: len(got) >= 10, 60)
        read_topic(kafka_bootstrap, topics[2], lambda got: len(got) >= 1, 60)
        wait_committed(kafka_bootstrap, config.group_id, topics[0], 2)
        assert running.alive()
    # The worker is stopped: the only kafka-python consumer now is the read-back's.
    out, out_codecs = read_with_codecs(kafka_bootstrap, topics[1], 10)
    dlq, dlq_codecs = read_with_codecs(kafka_bootstrap, topics[2], 1)
    assert len(out) == 10 and [r.key for r in dlq] == [b"junk"]
    assert_compressed(out_codecs, compression)
    assert_compressed(dlq_codecs, compression)
    # An independent reader (librdkafka) decodes kafka-python's batches the same way.
    theirs = librdkafka_read(kafka_bootstrap, topics[1], 10)
    assert sorted((k, v) for _p, _o, k, v in theirs) == sorted((r.key, r.value) for r in out)
    assert {json.loads(v)["event_id"] for _p, _o, _k, v in theirs} == {
        f"out-{i:03d}" for i in range(10)
    }


@pytest.mark.integration
def test_produce_compression_type_writes_compressed_parts(
    kafka_bootstrap: str, topic_factory: Callable[..., str], kafka_client: str
) -> None:
    topic = topic_factory(2)
    summary = produce(
        ProduceConfig(
            bootstrap_servers=kafka_bootstrap,
            topic=topic,
            count=20,
            compression_type="zstd",
            kafka_client=kafka_client,
        )
    )
    records, codecs = read_with_codecs(kafka_bootstrap, topic, summary["parts"])
    assert len(records) == summary["parts"] == 60
    assert_compressed(codecs, "zstd")
    assert {dict(r.headers)["mm-modality"] for r in records} == {b"image", b"text", b"audio"}


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize(("source_codec", "output_codec"), [("snappy", "zstd"), ("zstd", "gzip")])
def test_replay_reads_a_compressed_topic_and_compresses_its_outputs(
    kafka_bootstrap: str,
    topic_factory: Callable[..., str],
    tiny_model_dir: Path,
    source_codec: str,
    output_codec: str,
) -> None:
    source, out = topic_factory(2), topic_factory(2)
    records = npy_events(tiny_model_dir, "rp", 15, seed=23)
    stamps = [HOUR_AGO + (i // 3) * 10 + i % 3 for i in range(len(records))]
    librdkafka_send(kafka_bootstrap, source, records, compression=source_codec, timestamps=stamps)
    config = ReplayConfig(
        bootstrap_servers=kafka_bootstrap,
        source_topic=source,
        model=tiny_model_dir,
        output_topic=out,
        from_time=format_time(HOUR_AGO - 1000),
        to_time=format_time(HOUR_AGO + 60_000),
        device="cpu",
        max_batch_size=8,
        progress="none",
        compression_type=output_codec,
    )
    summary = run_replay(config)
    assert summary["events_predicted"] == 15 and summary["records_read"] == len(records)
    got, codecs = read_with_codecs(kafka_bootstrap, out, 15)
    assert {json.loads(r.value)["event_id"] for r in got} == {r[0] for r in records}
    assert_compressed(codecs, output_codec)


@pytest.mark.integration
def test_archive_reads_a_compressed_topic_exactly_and_restore_compresses(
    kafka_bootstrap: str,
    topic_factory: Callable[..., str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from worker.cli import main

    source, target = topic_factory(2), topic_factory(2)
    records: list[Rec] = [
        (f"k-{i % 7}", "text", f"value {i} ".encode() * (i % 5 + 1), "text/plain")
        for i in range(120)
    ]
    partitions = [i % 2 for i in range(120)]
    stamps = [HOUR_AGO + i for i in range(120)]
    placed = librdkafka_send(
        kafka_bootstrap,
        source,
        records,
        compression="zstd",
        timestamps=stamps,
        partitions=partitions,
    )
    _, stored = read_with_codecs(kafka_bootstrap, source, 120)
    # Batches of several records (librdkafka lingers 20 ms), so ranges cut into them.
    assert_compressed(stored, "zstd")
    assert len(stored) < len(records)

    # A range that starts and ends inside compressed batches: exactly those offsets.
    archive = tmp_path / "parts.jsonl"
    common = ["--bootstrap-servers", kafka_bootstrap]
    argv = ["archive", *common, "--source-topic", source, "--range", "0:7-43,1:3-"]
    assert main([*argv, "--out", str(archive)]) == 0
    lines = [json.loads(line) for line in archive.read_text().splitlines()[1:]]
    want = [(p, o) for p, o in placed if (p == 0 and 7 <= o < 43) or (p == 1 and o >= 3)]
    assert sorted((r["partition"], r["offset"]) for r in lines) == sorted(want)
    by_place = dict(zip(placed, range(120), strict=True))
    for line in lines:
        i = by_place[(line["partition"], line["offset"])]
        assert line["timestamp"] == stamps[i]

    # Restored through replay, compressed as MMSTREAM_COMPRESSION_TYPE says.
    monkeypatch.setenv("MMSTREAM_COMPRESSION_TYPE", "snappy")
    restore = ["replay", *common, "--source-file", str(archive), "--to-topic", target]
    assert main([*restore, "--log-level", "WARNING"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["records"] == len(want)
    restored, codecs = read_with_codecs(kafka_bootstrap, target, len(want))
    assert_compressed(codecs, "snappy")
    assert sorted((r.partition, r.value, r.timestamp) for r in restored) == sorted(
        (partitions[by_place[pl]], records[by_place[pl]][2], stamps[by_place[pl]]) for pl in want
    )


# ------------------------------------------------------------------ partitioners


def murmur2_partition(key: str, partitions: int) -> int:
    """kafka-python's (and the Java client's) default partition of a key."""
    return int((murmur2(key.encode()) & 0x7FFFFFFF) % partitions)


def crc32_partition(key: str, partitions: int) -> int:
    """librdkafka's default (consistent_random) partition of a non-empty key."""
    return zlib.crc32(key.encode()) % partitions


@pytest.mark.integration
@pytest.mark.slow
def test_parts_split_by_two_partitioners_never_meet_and_are_dead_lettered(
    kafka_bootstrap: str, topic_factory: Callable[..., str], tiny_model_dir: Path
) -> None:
    """Images by kafka-python (murmur2), text and audio by librdkafka: with its default
    partitioner (CRC32) an event whose two hashes differ is split over two partitions;
    with ``partitioner=murmur2_random`` it is not. Nothing is lost either way."""
    n_parts = 4
    topics = (topic_factory(n_parts), topic_factory(1), topic_factory(1))
    keys = [f"ev-{i:03d}" for i in range(200)]
    same = [k for k in keys if murmur2_partition(k, n_parts) == crc32_partition(k, n_parts)]
    differ = [k for k in keys if murmur2_partition(k, n_parts) != crc32_partition(k, n_parts)]
    co, split, fixed = same[:4], differ[:6], differ[6:10]  # fixed: sent with murmur2_random
    assert len(co) == 4 and len(fixed) == 4

    manifest = load_manifest(tiny_model_dir)
    rng = np.random.default_rng(24)
    placed: dict[str, list[Placed]] = {}
    for key, sample in zip(co + split + fixed, samples(14, rng, split="test"), strict=True):
        parts = encode_sample(key, sample, "npy", manifest)
        image = [p for p in parts if p[1] == "image"]
        others = [p for p in parts if p[1] != "image"]
        # One event at a time, so its parts sit side by side in their partition(s).
        at = kafka_python_send(kafka_bootstrap, topics[0], image)
        at += librdkafka_send(
            kafka_bootstrap,
            topics[0],
            others,
            partitioner="murmur2_random" if key in fixed else None,
        )
        placed[key] = at
    for key, at in placed.items():
        image_p, text_p, audio_p = (p for p, _o in at)
        assert image_p == murmur2_partition(key, n_parts), key  # kafka-python: murmur2
        want = murmur2_partition(key, n_parts) if key in fixed else crc32_partition(key, n_parts)
        assert text_p == audio_p == want, key  # librdkafka: CRC32 unless murmur2_random
    assert all(len({p for p, _o in placed[k]}) == 2 for k in split)

    config = worker_config(kafka_bootstrap, topics, tiny_model_dir, assembly_timeout_ms=2000)
    with RunningWorker(config) as running:
        committed = wait_committed(kafka_bootstrap, config.group_id, topics[0], n_parts)
        assert running.alive()
    assert committed == end_offsets(kafka_bootstrap, topics[0], n_parts)  # nothing held back

    out = read_topic(kafka_bootstrap, topics[1], lambda got: False, 2.0)
    predicted = [r.key.decode() for r in out]
    assert sorted(predicted) == sorted(co + fixed)  # co-partitioned: predicted, once each
    dlq = read_topic(kafka_bootstrap, topics[2], lambda got: False, 2.0)
    sources: set[Placed] = set()
    for r in dlq:
        headers = {k: v.decode() for k, v in r.headers}
        assert headers["mm-error"] == "incomplete_event", headers
        _topic, part, off = headers["mm-source"].rsplit("/", 2)
        sources.add((int(part), int(off)))
    assert len(dlq) == len(sources) == 3 * len(split)
    assert sources == {pl for k in split for pl in placed[k]}  # every split part, only those
    # Every part sent is in a predicted event or in the dead-letter topic.
    everything = {pl for at in placed.values() for pl in at}
    assert everything == {pl for k in co + fixed for pl in placed[k]} | sources
    assert running.stats is not None and running.stats.consumed == len(everything)
