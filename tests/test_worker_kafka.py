"""The worker end to end against a real Kafka broker and a real exported ONNX model.

An independent kafka-python producer writes parts (npy and raw media),
shuffled across keys and interleaved; the worker runs on a thread; the test
reads the output and dead-letter topics with its own consumer.
"""

from __future__ import annotations

import io
import json
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import onnxruntime as ort
import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from worker.config import WorkerConfig
from worker.contract.errors import Reason
from worker.contract.manifest import MODEL_FILE, load_manifest
from worker.contract.reference_data import samples
from worker.core.pipeline import Worker, WorkerStats
from worker.edge.choice import clients_for
from worker.inference.model import ModelRunner
from worker.tools.produce import encode_sample

from kafka_broker import committed_offsets, end_offsets, read_topic

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
PREDICTION_SCHEMA = json.loads((ROOT / "schemas" / "prediction.schema.json").read_text())
DLQ_SCHEMA = json.loads((ROOT / "schemas" / "dead-letter-headers.schema.json").read_text())

Rec = tuple[str, str, bytes, str]  # key, modality, value, content type


def npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def send_all(bootstrap: str, topic: str, records: list[Rec]) -> list[tuple[int, int]]:
    """Send in order; return each record's (partition, offset)."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    futures = []
    for key, modality, value, ctype in records:
        headers = []
        if modality:
            headers.append(("mm-modality", modality.encode()))
        if ctype:
            headers.append(("content-type", ctype.encode()))
        futures.append(
            producer.send(topic, key=key.encode() if key else None, value=value, headers=headers)
        )
    producer.flush()
    placed = [(md.partition, md.offset) for md in (f.get(timeout=10) for f in futures)]
    producer.close()
    return placed


class RunningWorker:
    """A Worker on a thread, stopped (drained) on exit; ``error``: what ended it early."""

    def __init__(self, config: WorkerConfig) -> None:
        self.worker = Worker(
            config, ModelRunner.load(config.model, "cpu"), clients=clients_for(config.kafka_client)
        )
        self.stop = threading.Event()
        self.stats: WorkerStats | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.stats = self.worker.run(self.stop)
        except BaseException as exc:  # surfaced by the test
            self.error = exc

    def alive(self) -> bool:
        """Still running: it did not exit or crash."""
        return self.thread.is_alive() and self.error is None

    def __enter__(self) -> RunningWorker:
        self.thread.start()
        if not self.worker.ready.wait(30):
            raise TimeoutError(f"worker did not get its partitions (error: {self.error!r})")
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(60)
        if self.error is not None:
            raise self.error


def make_config(
    bootstrap: str, topics: tuple[str, str, str], model: Path, **kw: Any
) -> WorkerConfig:
    t_in, t_out, t_dlq = topics
    return WorkerConfig(
        bootstrap_servers=bootstrap,
        input_topic=t_in,
        output_topic=t_out,
        dlq_topic=t_dlq,
        group_id=f"g-{t_in}",
        model=model,
        device="cpu",
        max_batch_size=8,
        max_batch_delay_ms=20,
        commit_interval_ms=100,
        **kw,
    )


# 0: inference on the poll thread (the CPU default); 2: on the inference thread (CUDA's).
INFERENCE_QUEUES = pytest.mark.parametrize("inference_queue", [0, 2])


@INFERENCE_QUEUES
def test_npy_and_raw_parts_give_one_prediction_per_event(
    kafka_bootstrap: str,
    topic_factory: Callable[..., str],
    tiny_model_dir: Path,
    inference_queue: int,
    kafka_client: str,
) -> None:
    topics = (topic_factory(3), topic_factory(1), topic_factory(1))
    manifest = load_manifest(tiny_model_dir)
    rng = np.random.default_rng(3)
    batch = samples(40, rng, split="test")
    records: list[Rec] = []
    npy_ids = []
    for i, s in enumerate(batch):
        content = "npy" if i % 2 == 0 else "raw"
        event_id = f"{content}-{i}"
        if content == "npy":
            npy_ids.append(event_id)
        records += encode_sample(event_id, s, content, manifest)
    random.Random(5).shuffle(records)  # parts of all events interleaved, any order

    config = make_config(
        kafka_bootstrap,
        topics,
        tiny_model_dir,
        kafka_client=kafka_client,
        inference_queue=inference_queue,
    )
    with RunningWorker(config) as running:
        send_all(kafka_bootstrap, topics[0], records)
        out = read_topic(kafka_bootstrap, topics[1], lambda got: len(got) >= 40, 60)
        # Wait a little more so a duplicate prediction would show up.
        time.sleep(0.5)
    out += read_topic(kafka_bootstrap, topics[1], lambda got: False, 1.0)[len(out) :]

    predictions = {r.key.decode(): json.loads(r.value) for r in out}
    assert len(out) == 40 and len(predictions) == 40, "exactly one prediction per event"
    assert running.stats is not None and running.stats.provider == "CPUExecutionProvider"
    for pred in predictions.values():
        jsonschema.validate(pred, PREDICTION_SCHEMA)
        assert pred["model"]["sha256"] == manifest.sha256

    # npy parts: the worker's scores equal an offline ONNX Runtime run on the same tensors.
    session = ort.InferenceSession(
        str(tiny_model_dir / MODEL_FILE), providers=["CPUExecutionProvider"]
    )
    by_key: dict[str, dict[str, np.ndarray]] = {}
    for key, modality, value, _ctype in records:
        if key in npy_ids:
            by_key.setdefault(key, {})[modality] = np.load(io.BytesIO(value))
    names = [o.name for o in session.get_outputs()]
    feed = {i.name: np.stack([by_key[k][i.name] for k in npy_ids]) for i in manifest.inputs}
    offline = session.run(names, feed)[names.index("probabilities")]
    worker_scores = np.array([predictions[k]["outputs"]["probabilities"] for k in npy_ids])
    assert np.max(np.abs(worker_scores - offline)) <= 1e-5

    # Offsets: everything was finished and acknowledged, so the commit reached the end.
    assert committed_offsets(kafka_bootstrap, f"g-{topics[0]}", topics[0], 3) == end_offsets(
        kafka_bootstrap, topics[0], 3
    )


@INFERENCE_QUEUES
def test_bad_records_are_dead_lettered_and_a_poison_event_is_isolated(
    kafka_bootstrap: str,
    topic_factory: Callable[..., str],
    tiny_model_dir: Path,
    inference_queue: int,
    kafka_client: str,
) -> None:
    topics = (topic_factory(1), topic_factory(1), topic_factory(1))
    manifest = load_manifest(tiny_model_dir)
    good = samples(3, np.random.default_rng(4), split="test")
    records: list[Rec] = []
    for i, s in enumerate(good):
        records += encode_sample(f"good-{i}", s, "npy", manifest)
    # Token ids beyond the vocabulary pass decoding (right dtype and shape) but make
    # ONNX Runtime's Gather fail: the batch is split until this event stands alone.
    poison = npy(np.full(16, 10_000, dtype=np.int32))
    records = [
        *(
            r if r[0] != "good-1" or r[1] != "text" else ("good-1", "text", poison, r[3])
            for r in records
        ),
        ("", "text", b"no key", "text/plain"),
        ("k1", "video", b"x", "video/mp4"),
        ("k2", "image", b"not a png", "image/png"),
        ("k3", "image", b"%PDF-1.4", "application/pdf"),
        ("k4", "audio", npy(np.zeros((10, 40), dtype=np.float32)), "application/x-npy"),
        ("k5", "text", b"seven " * 2000, "text/plain"),  # over --max-part-bytes
        ("lonely", "text", b"the number 3", "text/plain"),  # never completed
    ]
    expected_dlq = {
        "missing_key": 1,
        "unknown_modality": 1,
        "decode_error": 1,
        "unsupported_content_type": 1,
        "shape_mismatch": 1,
        "payload_too_large": 1,
        "incomplete_event": 1,
        "inference_error": 3,
    }
    # Every reason code is exercised (evicted_at_bound, which needs a full pending bound,
    # in test_loop.py).
    assert set(expected_dlq) | {Reason.EVICTED_AT_BOUND.value} == {r.value for r in Reason}

    config = make_config(
        kafka_bootstrap,
        topics,
        tiny_model_dir,
        max_part_bytes=8000,
        assembly_timeout_ms=1000,
        inference_queue=inference_queue,
        kafka_client=kafka_client,
    )
    with RunningWorker(config):
        send_all(kafka_bootstrap, topics[0], records)
        out = read_topic(kafka_bootstrap, topics[1], lambda got: len(got) >= 2, 60)
        dlq = read_topic(kafka_bootstrap, topics[2], lambda got: len(got) >= 10, 60)

    assert sorted(r.key.decode() for r in out) == ["good-0", "good-2"]
    reasons: dict[str, int] = {}
    for r in dlq:
        headers = {k: v.decode() for k, v in r.headers}
        jsonschema.validate(headers, DLQ_SCHEMA)
        assert headers["mm-source"].startswith(f"{topics[0]}/0/")
        reasons[headers["mm-error"]] = reasons.get(headers["mm-error"], 0) + 1
    assert reasons == expected_dlq
    garbage = [r for r in dlq if r.key == b"k2"]
    assert garbage[0].value == b"not a png"  # original value kept
    lonely = [r for r in dlq if r.key == b"lonely"]
    assert lonely[0].value == b"the number 3"
    assert "['audio', 'image']" in dict(lonely[0].headers)["mm-error-detail"].decode()
    poisoned = [r for r in dlq if dict(r.headers)["mm-error"] == b"inference_error"]
    assert {r.key for r in poisoned} == {b"good-1"} and all(r.value for r in poisoned)
    assert committed_offsets(kafka_bootstrap, config.group_id, topics[0], 1) == end_offsets(
        kafka_bootstrap, topics[0], 1
    )


def test_incomplete_event_holds_back_the_commit(
    kafka_bootstrap: str,
    topic_factory: Callable[..., str],
    tiny_model_dir: Path,
    kafka_client: str,
) -> None:
    topics = (topic_factory(1), topic_factory(1), topic_factory(1))
    manifest = load_manifest(tiny_model_dir)
    s1, s2 = samples(2, np.random.default_rng(6), split="test")
    first = encode_sample("incomplete", s1, "npy", manifest)[:2]  # third part never sent
    rest = encode_sample("complete", s2, "npy", manifest)
    config = make_config(kafka_bootstrap, topics, tiny_model_dir, kafka_client=kafka_client)
    with RunningWorker(config):
        send_all(kafka_bootstrap, topics[0], first + rest)
        out = read_topic(kafka_bootstrap, topics[1], lambda got: len(got) >= 1, 60)
        time.sleep(0.5)  # several commit intervals
    assert [r.key for r in out] == [b"complete"]
    # The committed offset stops at the incomplete event's first part (offset 0),
    # so a restarted worker re-reads it: nothing is lost.
    assert committed_offsets(kafka_bootstrap, config.group_id, topics[0], 1) == {0: 0}


def test_demo_runs_end_to_end_and_summarises(
    kafka_bootstrap: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    from worker.tools.demo import DemoConfig, format_summary, run_demo

    config = DemoConfig(
        bootstrap_servers=kafka_bootstrap, model=tiny_model_dir, count=60, rate=0, device="cpu"
    )
    summary = run_demo(config, tmp_path)
    assert summary["predicted"] == 60 and summary["duplicates"] == 0
    assert summary["accuracy"] >= 0.9  # the tiny model is ~1.0 on clean events
    assert summary["provider"] == "CPUExecutionProvider"
    assert summary["latency_p99_ms"] >= summary["latency_p50_ms"] >= 0
    assert "accuracy      " in format_summary(summary)


def test_restart_skips_events_finished_beyond_the_commit_position(
    kafka_bootstrap: str,
    topic_factory: Callable[..., str],
    tiny_model_dir: Path,
    kafka_client: str,
) -> None:
    topics = (topic_factory(1), topic_factory(1), topic_factory(1))
    manifest = load_manifest(tiny_model_dir)
    held, *rest = samples(11, np.random.default_rng(8), split="test")
    held_parts = encode_sample("held", held, "npy", manifest)
    records = held_parts[:2]  # offsets 0-1: an event that stays incomplete for now
    for i, s in enumerate(rest):
        records += encode_sample(f"done-{i}", s, "npy", manifest)  # offsets 2-31
    config = make_config(
        kafka_bootstrap, topics, tiny_model_dir, kafka_client=kafka_client, assembly_timeout_ms=0
    )

    with RunningWorker(config):
        send_all(kafka_bootstrap, topics[0], records)
        first = read_topic(kafka_bootstrap, topics[1], lambda got: len(got) >= 10, 60)
        time.sleep(0.5)  # let a commit carry the finished offsets
    assert len(first) == 10
    consumer = KafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id=config.group_id)
    try:
        meta = consumer.committed(TopicPartition(topics[0], 0), metadata=True)
    finally:
        consumer.close()
    assert meta is not None and meta.offset == 0  # held back by the incomplete event
    # ...but offsets 2-31 are recorded as finished (confluent-kafka appends a NUL)
    assert meta.metadata.rstrip("\x00") == "mm1:2-31"

    with RunningWorker(config) as second:
        send_all(kafka_bootstrap, topics[0], held_parts[2:])  # completes "held"
        out = read_topic(kafka_bootstrap, topics[1], lambda got: len(got) >= 11, 60)
        time.sleep(0.5)
    out += read_topic(kafka_bootstrap, topics[1], lambda got: False, 1.0)[len(out) :]
    keys = [r.key.decode() for r in out]
    assert len(keys) == 11 and keys.count("held") == 1  # nothing re-emitted after the restart
    assert second.stats is not None and second.stats.skipped_finished == 30
    assert committed_offsets(kafka_bootstrap, config.group_id, topics[0], 1) == end_offsets(
        kafka_bootstrap, topics[0], 1
    )


def test_random_and_mutated_records_are_all_accounted_for(
    kafka_bootstrap: str,
    topic_factory: Callable[..., str],
    tiny_model_dir: Path,
    kafka_client: str,
) -> None:
    """Worker-level fuzz: ~1000 records, a fifth of the parts mutated, plus junk."""
    topics = (topic_factory(2), topic_factory(1), topic_factory(1))
    manifest = load_manifest(tiny_model_dir)
    rnd = random.Random(11)
    clean_events: set[str] = set()
    records: list[Rec] = []
    junk_idx: set[int] = set()
    for i, s in enumerate(samples(250, np.random.default_rng(12), split="test")):
        parts = encode_sample(f"ev-{i}", s, "npy", manifest)
        mutated = False
        for key, modality, value, ctype in parts:
            roll = rnd.random()
            mutated |= roll < 0.20
            if roll < 0.05:
                value = value[: rnd.randrange(len(value))]
            elif roll < 0.10:
                pos = rnd.randrange(len(value))
                value = value[:pos] + bytes([value[pos] ^ 0x5A]) + value[pos + 1 :]
            elif roll < 0.13:
                modality = rnd.choice(["video", "", "TEXT"])
            elif roll < 0.16:
                ctype = rnd.choice(["image/png", "text/plain", "", "x/y"])
            elif roll < 0.20:
                continue  # part never sent: an incomplete event
            records.append((key, modality, value, ctype))
        if not mutated:
            clean_events.add(f"ev-{i}")
    for _ in range(150):
        junk_idx.add(len(records))
        records.append(
            (
                rnd.choice(["", "ev-1", "zz"]),
                rnd.choice(["image", "text", "audio", "x"]),
                rnd.randbytes(rnd.randrange(0, 300)),
                rnd.choice(["application/x-npy", "image/jpeg", "audio/wav", "text/plain"]),
            )
        )
    order = list(range(len(records)))
    rnd.shuffle(order[-150:])  # junk anywhere...
    order = order[:-150]
    for junk in range(len(records) - 150, len(records)):
        order.insert(rnd.randrange(len(order) + 1), junk)
    for start in range(0, len(order), 48):  # ...and parts interleaved across nearby events
        window = order[start : start + 48]
        rnd.shuffle(window)
        order[start : start + 48] = window
    records = [records[i] for i in order]
    junk_positions = {pos for pos, i in enumerate(order) if i in junk_idx}

    config = make_config(
        kafka_bootstrap, topics, tiny_model_dir, kafka_client=kafka_client, assembly_timeout_ms=3000
    )
    with RunningWorker(config) as running:
        placed = send_all(kafka_bootstrap, topics[0], records)
        deadline = time.monotonic() + 60
        ends = end_offsets(kafka_bootstrap, topics[0], 2)
        while time.monotonic() < deadline and (
            committed_offsets(kafka_bootstrap, config.group_id, topics[0], 2) != ends
        ):
            time.sleep(0.3)
    assert running.error is None and running.stats is not None
    # Every record's work finished and was acknowledged: the commit reached the end...
    assert committed_offsets(kafka_bootstrap, config.group_id, topics[0], 2) == ends
    assert running.stats.consumed == len(records)
    # ...every clean event was predicted, and every junk record was dead-lettered.
    out = read_topic(kafka_bootstrap, topics[1], lambda got: False, 3.0)
    predicted = {r.key.decode() for r in out}
    assert clean_events <= predicted
    dlq = read_topic(kafka_bootstrap, topics[2], lambda got: False, 3.0)
    sources = set()
    for r in dlq:
        headers = {k: v.decode() for k, v in r.headers}
        jsonschema.validate(headers, DLQ_SCHEMA)
        _topic, part, off = headers["mm-source"].rsplit("/", 2)
        sources.add((int(part), int(off)))
    assert {placed[pos] for pos in junk_positions} <= sources
    assert len(predicted) + len(dlq) > len(clean_events)


@INFERENCE_QUEUES
def test_a_broken_model_stops_the_worker_instead_of_dead_lettering_everything(
    kafka_bootstrap: str,
    topic_factory: Callable[..., str],
    tiny_model_dir: Path,
    inference_queue: int,
) -> None:
    from worker.contract.errors import InferenceError
    from worker.core.poison import MAX_POISON_STREAK

    topics = (topic_factory(1), topic_factory(1), topic_factory(1))
    manifest = load_manifest(tiny_model_dir)
    poison = npy(np.full(16, 10_000, dtype=np.int32))
    records: list[Rec] = []
    for i, s in enumerate(samples(MAX_POISON_STREAK + 4, np.random.default_rng(13), split="test")):
        for key, modality, value, ctype in encode_sample(f"bad-{i}", s, "npy", manifest):
            records.append((key, modality, poison if modality == "text" else value, ctype))
    running = RunningWorker(
        make_config(kafka_bootstrap, topics, tiny_model_dir, inference_queue=inference_queue)
    )
    running.thread.start()
    assert running.worker.ready.wait(30)
    send_all(kafka_bootstrap, topics[0], records)
    running.thread.join(60)
    assert not running.thread.is_alive()
    assert isinstance(running.error, InferenceError) and "in a row" in str(running.error)
    dlq = read_topic(kafka_bootstrap, topics[2], lambda got: False, 2.0)
    assert len(dlq) == 3 * MAX_POISON_STREAK  # then it stopped instead of going on


def test_the_kafka_python_producer_knows_both_write_topics_before_the_first_send(
    kafka_bootstrap: str, topic_factory: Callable[..., str], tiny_model_dir: Path
) -> None:
    """kafka-python's send waits on the caller's thread for the metadata of a topic not
    written yet: the worker's producer learns the output and dead-letter topics when it is
    made, so the first dead letter (often long after start, perhaps while the broker that
    answers metadata is frozen) only queues."""
    from kafka import KafkaProducer as RawProducer

    topics = (topic_factory(1), topic_factory(2), topic_factory(3))
    config = make_config(kafka_bootstrap, topics, tiny_model_dir)
    producer = clients_for("kafka-python").producer(config)
    try:
        raw = producer._p
        assert isinstance(raw, RawProducer)
        known = raw._metadata.partitions_for_topic  # the cache send looks in before waiting
        assert known(topics[1]) == {0, 1}
        assert known(topics[2]) == {0, 1, 2}
    finally:
        producer.close(timeout_s=5)
