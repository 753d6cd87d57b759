"""Memory stays bounded when the broker of the output topics freezes (three-broker cluster).

The input topic lives on two nodes, the output and dead-letter topics on the third alone,
which is frozen (SIGSTOP) while good events and a flood of large poison records keep
arriving. The worker must hold no more unacknowledged outputs than its bounds, pause
fetching, keep its RSS within the bounds plus the stated overhead, and lose nothing once
that node thaws (SIGCONT).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kafka import KafkaAdminClient, KafkaProducer
from kafka.admin import NewTopic

from kafka_cluster import NODE_IDS, Cluster
from resilience_tools import (
    ASSIGNED_RE,
    EventFactory,
    MetricsSampler,
    PredictionReader,
    ProcessPool,
    TopicReader,
    free_port,
    wait_http,
    worker_argv,
)

pytestmark = [
    pytest.mark.integration,
    # kafka-python 3.0.12 leaks the socket of a refused connection (to a frozen broker).
    pytest.mark.filterwarnings("ignore:unclosed <socket:ResourceWarning"),
]

BOUND_EVENTS = 200
BOUND_BYTES = 8 * 1024 * 1024
POISON_BYTES = 400 * 1024
#: Stated overhead beyond the bounds (docs/operations.md): kafka-python's fetch buffers
#: (fetch_max_bytes, 64 MiB) and the copies of what is held (record, dead letter, batch).
OVERHEAD = 64 * 1024 * 1024 + 3 * BOUND_BYTES


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[ProcessPool]:
    pool = ProcessPool(tmp_path)
    try:
        yield pool
    finally:
        pool.close()


def _placed_topic(cluster: Cluster, prefix: str, assignment: dict[int, list[int]]) -> str:
    name = f"{prefix}{uuid.uuid4().hex}"
    isr = str(min(len(r) for r in assignment.values()))
    topic = NewTopic(
        name, replica_assignments=assignment, topic_configs={"min.insync.replicas": isr}
    )

    def create(admin: KafkaAdminClient) -> None:
        admin.create_topics([topic])

    cluster.query(create)
    cluster.wait_isr(name, int(isr), timeout_s=60, partitions=len(assignment))
    return name


def _send(bootstrap: str, topic: str, records: list[tuple[bytes | None, bytes, str, str]]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    try:
        futures = [
            producer.send(
                topic,
                key=key,
                value=value,
                headers=[("mm-modality", m.encode()), ("content-type", c.encode())],
            )
            for key, value, m, c in records
        ]
        producer.flush(60)
        for f in futures:
            f.get(timeout=60)
    finally:
        producer.close()


def test_a_frozen_output_broker_cannot_make_the_worker_grow(
    kafka_cluster: Cluster, tiny_model_dir: Path, procs: ProcessPool
) -> None:
    cluster = kafka_cluster
    if cluster.up != set(NODE_IDS):
        cluster.start()
    # The frozen node must not coordinate the group: this test freezes outputs, not the
    # group (after a fault elsewhere every leader, coordinators too, may sit on one node).
    group = f"g-mem-{uuid.uuid4().hex}"
    coordinator = cluster.coordinator_of_group(group)
    node = max(n for n in NODE_IDS if n != coordinator)
    inputs = sorted(n for n in NODE_IDS if n != node)
    t_in = _placed_topic(cluster, "mm-mem-in-", {p: inputs for p in range(3)})
    t_out = _placed_topic(cluster, "mm-mem-out-", {0: [node]})
    t_dlq = _placed_topic(cluster, "mm-mem-dlq-", {0: [node]})
    input_side = ",".join(f"127.0.0.1:{cluster.ports[n]}" for n in inputs)
    port = free_port()
    w = procs.start(
        "worker",
        worker_argv(
            cluster.bootstrap, (t_in, t_out, t_dlq), group, tiny_model_dir,
            "--max-pending-events", str(BOUND_EVENTS),
            "--max-pending-bytes", str(BOUND_BYTES),
            "--http-port", str(port),
        ),
    )  # fmt: skip
    assert w.wait_for_log(ASSIGNED_RE, 90), f"worker got no partitions\n{w.tail()}"
    wait_http(port, "/metrics", 200, 30, w)
    factory = EventFactory(tiny_model_dir)

    def records(ids: list[str]) -> list[tuple[bytes | None, bytes, str, str]]:
        return [(e.encode(), v, m, c) for ev in factory.events(ids) for e, m, v, c in ev]

    # Warm up: positions fetched, outputs flowing, before anything freezes.
    warm = [f"warm-{i:02d}" for i in range(10)]
    _send(input_side, t_in, records(warm))
    with PredictionReader(cluster.bootstrap, t_out) as out:
        assert out.read_until(lambda: set(warm) <= out.seen(), 60), w.tail()
    ids = [f"mem-{i:04d}" for i in range(400)]
    good = records(ids)
    poison = [(None, bytes(POISON_BYTES), "text", "text/plain") for _ in range(300)]  # no key

    with MetricsSampler(port, w, interval_s=0.2) as sampler:
        time.sleep(1.0)
        rss_before = w.rss_bytes()
        assert rss_before is not None
        cluster.kill(node, "STOP")  # the output side freezes
        try:
            _send(input_side, t_in, poison + good)  # the flood first: the byte bound holds
            # Frozen until the worker has held its bound for 10 s (at most 40 s in all).
            deadline, held_since = time.monotonic() + 40, None
            while time.monotonic() < deadline:
                assert w.alive(), f"worker exited while the output broker was frozen\n{w.tail()}"
                last = sampler.samples[-1][1] if sampler.samples else None
                if held_since is None and last and last.get("mmstream_paused_partitions") > 0:
                    held_since = time.monotonic()
                if held_since is not None and time.monotonic() - held_since > 10:
                    break
                time.sleep(0.5)
            frozen = list(sampler.samples)
            peak_frozen = sampler.peak_rss
        finally:
            cluster.kill(node, "CONT")
    unacked = [m.get("mmstream_unacked_outputs") for _, m in frozen]
    unacked_bytes = [m.get("mmstream_unacked_output_bytes") for _, m in frozen]
    paused = [m.get("mmstream_paused_partitions") for _, m in frozen]
    growth = peak_frozen - rss_before
    print(
        f"frozen: peak unacked {max(unacked)} outputs / {max(unacked_bytes) / 2**20:.1f} MiB, "
        f"RSS {rss_before / 2**20:.0f} -> {peak_frozen / 2**20:.0f} MiB"
    )
    assert max(unacked) <= BOUND_EVENTS
    assert max(unacked_bytes) <= BOUND_BYTES + 512 * 1024
    assert max(paused) > 0, "fetching never paused while nothing was acknowledged"
    assert growth <= BOUND_BYTES + OVERHEAD, f"RSS grew by {growth / 2**20:.0f} MiB"

    with (
        PredictionReader(cluster.bootstrap, t_out) as out,
        TopicReader(cluster.bootstrap, t_dlq) as dlq,
    ):
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline:
            out.poll(200)
            dlq.poll(200)
            if set(ids) <= out.seen() and len(dlq.records) >= len(poison):
                break
            assert w.alive(), f"worker exited after the thaw\n{w.tail()}"
        assert set(ids) <= out.seen(), f"{len(set(ids) - out.seen())} events lost"
        assert len(dlq.records) >= len(poison)
        reasons = {dict(r.headers).get("mm-error") for r in dlq.records}
        assert reasons == {b"missing_key"}
