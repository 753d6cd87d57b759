"""Resilience of the worker as a real process against a real broker.

Crashes (SIGKILL loops, at-least-once and exactly-once), consumer-group membership
changes, a broker outage, a graceful SIGTERM, a flood of incomplete events under the
pending bounds, and the HTTP probes / metrics. Every worker is a subprocess
(``python -m worker.cli worker``) with its stderr in a log file; the tail of every log
is printed when a test fails, and leftover processes are killed.
"""

from __future__ import annotations

import random
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kafka_broker import committed_offsets, create_topic, end_offsets
from resilience_tools import (
    ASSIGNED_RE,
    PRODUCING_RE,
    EventFactory,
    LocalBroker,
    MetricsSampler,
    PredictionReader,
    ProcessPool,
    StreamSender,
    TopicReader,
    client_argv,
    free_port,
    free_ports,
    http_get,
    interleave,
    produce_argv,
    scrape,
    send_records,
    summarize,
    wait_http,
    worker_argv,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RecordProperty = Callable[[str, object], None]
Topics = tuple[str, str, str]


@pytest.fixture
def record_property(request: pytest.FixtureRequest) -> RecordProperty:
    """pytest's ``record_property`` (a name/value pair in ``item.user_properties``), minus
    the PytestWarning it raises under ``--junitxml`` with the default xunit2 family, which
    filterwarnings=error would turn into a setup error."""

    def record(name: str, value: object) -> None:
        request.node.user_properties.append((name, value))

    return record


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[ProcessPool]:
    pool = ProcessPool(tmp_path)
    try:
        yield pool
    finally:
        pool.close()


@pytest.fixture(scope="module")
def factory(tiny_model_dir: Path) -> EventFactory:
    return EventFactory(tiny_model_dir)


def fresh_topics(topic_factory: Callable[..., str]) -> Topics:
    return topic_factory(3), topic_factory(1), topic_factory(1)


def new_group() -> str:
    return f"g-{uuid.uuid4().hex}"


def event_ids(prefix: str, n: int) -> list[str]:
    return [f"{prefix}-{i:05d}" for i in range(n)]


# ------------------------------------------------------------------ 1, 2: SIGKILL loops

KILLS = 10
KILL_EVENTS = 2000


def _sigkill_loop(
    guarantee: str,
    kafka_client: str,
    kafka_bootstrap: str,
    topics: Topics,
    tiny_model_dir: Path,
    factory: EventFactory,
    procs: ProcessPool,
    seed: int,
) -> tuple[list[str], PredictionReader]:
    """Stream KILL_EVENTS events while a worker is SIGKILLed KILLS times and restarted;
    then a final worker runs until every event is predicted and is stopped with SIGTERM.

    Returns the event ids and a reader that has read the whole output topic.
    Every incarnation shares one --group-instance-id (a restarted pod keeps its name):
    static membership lets it take over at once, and under exactly-once it also keeps
    the transactional id, so the restart fences its killed predecessor.
    """
    rng = random.Random(seed)
    group = new_group()
    argv = client_argv(
        kafka_client,
        kafka_bootstrap,
        topics,
        group,
        tiny_model_dir,
        "--guarantee",
        guarantee,
        "--group-instance-id",
        "pod-0",
        "--commit-interval-ms",
        "200",
        # Exactly-once runs inference and publishing on the inference thread (the CUDA
        # default): its sends must never straddle a transaction, also across SIGKILLs.
        "--inference-queue",
        "2" if guarantee == "exactly-once" else "0",
    )
    ids = event_ids(f"kill-{guarantee}", KILL_EVENTS)
    isolation = "read_committed" if guarantee == "exactly-once" else "read_uncommitted"

    def note(line: str) -> None:
        print(line, flush=True)  # shown with the failure report

    sender = StreamSender(kafka_bootstrap, topics[0], factory.events(ids), rate=KILL_EVENTS / 20)
    reader = PredictionReader(kafka_bootstrap, topics[1], isolation_level=isolation)
    try:
        sender.start()
        for k in range(KILLS):
            w = procs.start(f"worker-{k}", argv)
            assigned = w.wait_for_log(ASSIGNED_RE, timeout_s=60)
            assert assigned, (
                f"incarnation {k} logged no 'partitions assigned: [(...' within 60 s of a "
                f"SIGKILL restart (is --group-instance-id / static membership wired?)\n{w.tail()}"
            )
            delay = rng.uniform(0.5, 2.5)
            time.sleep(delay)
            assert w.alive(), f"incarnation {k} died on its own\n{w.tail()}"
            w.kill()
            reader.poll(100)
            note(
                f"kill {k}: {delay:.2f} s after assignment, {sender.events_sent} events sent, "
                f"{len(reader.seen())} predicted so far"
            )
        sender.join(120)
        reader.read_until(lambda: False, 0.5)
        predicted_before_final = len(reader.seen())
        note(f"predicted before the final worker: {predicted_before_final}")
        final = procs.start("worker-final", argv)
        # Wait for it to hold its partitions (and so to have its signal handlers) even
        # when the killed incarnations already predicted everything.
        assert final.wait_for_log(ASSIGNED_RE, 60), f"final worker: no partitions\n{final.tail()}"
        complete = reader.wait_all(ids, timeout_s=120)
        missing, _, _ = summarize(reader.counts(), ids)
        assert complete, (
            f"{len(missing)} of {len(ids)} events never got a prediction "
            f"(first: {missing[:5]})\n{final.tail()}"
        )
        final.signal(signal.SIGTERM)
        rc = final.wait(60)
        assert rc == 0, f"final worker: exit {rc} after SIGTERM\n{final.tail()}"
        assert reader.read_to_end(30), "could not read the output topic to its end"
        committed = committed_offsets(kafka_bootstrap, group, topics[0], 3)
        ends = end_offsets(kafka_bootstrap, topics[0], 3)
        assert committed == ends, f"after the final drain: committed {committed} != ends {ends}"
        # The killed incarnations must have done real work, or this tests nothing.
        assert predicted_before_final > 0, "no prediction before the final worker started"
        return ids, reader
    except BaseException:
        reader.close()
        raise


def test_sigkill_loop_at_least_once(
    kafka_bootstrap: str,
    topic_factory: Callable[..., str],
    tiny_model_dir: Path,
    factory: EventFactory,
    procs: ProcessPool,
    record_property: RecordProperty,
    kafka_client: str,
) -> None:
    topics = fresh_topics(topic_factory)
    ids, reader = _sigkill_loop(
        "at-least-once",
        kafka_client,
        kafka_bootstrap,
        topics,
        tiny_model_dir,
        factory,
        procs,
        seed=101,
    )
    with reader:
        missing, duplicates, unexpected = summarize(reader.counts(), ids)
    print(f"at-least-once under {KILLS} SIGKILLs: {duplicates} duplicate predictions")
    record_property("duplicates", duplicates)
    record_property("kills", KILLS)
    assert not missing, f"{len(missing)} events lost: {missing[:10]}"
    assert not unexpected, f"predictions for unknown events: {unexpected[:10]}"


def test_sigkill_loop_exactly_once(
    kafka_bootstrap: str,
    topic_factory: Callable[..., str],
    tiny_model_dir: Path,
    factory: EventFactory,
    procs: ProcessPool,
    record_property: RecordProperty,
    kafka_client: str,
) -> None:
    topics = fresh_topics(topic_factory)
    ids, reader = _sigkill_loop(
        "exactly-once",
        kafka_client,
        kafka_bootstrap,
        topics,
        tiny_model_dir,
        factory,
        procs,
        seed=202,
    )
    with reader:
        counts = reader.counts()
    missing, duplicates, unexpected = summarize(counts, ids)
    print(f"exactly-once under {KILLS} SIGKILLs: {duplicates} duplicates (read_committed)")
    record_property("duplicates", duplicates)
    dup_ids = sorted(k for k, n in counts.items() if n > 1)
    assert not missing, f"{len(missing)} events lost: {missing[:10]}"
    assert duplicates == 0, (
        f"a read_committed reader saw {duplicates} duplicate predictions "
        f"({len(dup_ids)} events, first: {dup_ids[:5]})"
    )
    assert not unexpected, f"predictions for unknown events: {unexpected[:10]}"
    with TopicReader(kafka_bootstrap, topics[2], isolation_level="read_committed") as dlq:
        dlq.read_to_end(10)
        assert not dlq.records, f"{len(dlq.records)} unexpected dead letters"


# ------------------------------------------------------------------ 3: membership changes


def test_group_membership_changes_lose_nothing(
    kafka_bootstrap: str,
    topic_factory: Callable[..., str],
    tiny_model_dir: Path,
    factory: EventFactory,
    procs: ProcessPool,
    record_property: RecordProperty,
    kafka_client: str,
) -> None:
    topics = fresh_topics(topic_factory)
    group = new_group()
    n = 960
    ids = event_ids("member", n)

    def argv(name: str) -> list[str]:
        return client_argv(kafka_client,
            kafka_bootstrap, topics, group, tiny_model_dir, "--client-id", name,
            "--shutdown-timeout-s", "20",
        )  # fmt: skip

    w1 = procs.start("worker-1", argv("worker-1"))
    w2 = procs.start("worker-2", argv("worker-2"))
    for w in (w1, w2):
        assert w.wait_for_log(ASSIGNED_RE, 60), f"{w.name} got no partitions\n{w.tail()}"
    sender = StreamSender(kafka_bootstrap, topics[0], factory.events(ids), rate=n / 16).start()
    with PredictionReader(kafka_bootstrap, topics[1]) as reader:
        sender.wait_sent(n // 5, 60)
        w3 = procs.start("worker-3", argv("worker-3"))
        # A cooperative rebalance takes two rounds, each noticed on a heartbeat (seconds).
        assert w3.wait_for_log(ASSIGNED_RE, 60), f"worker-3 got no partitions\n{w3.tail()}"
        joined_at = sender.events_sent
        sender.wait_sent(max(n * 2 // 3, joined_at + n // 12), 60)
        left_at = sender.events_sent
        w1.signal(signal.SIGTERM)
        rc1 = w1.wait(40)
        sender.join(120)
        complete = reader.wait_all(ids, 90)
        assert w2.alive() and w3.alive(), f"a remaining worker died\n{procs.tails()}"
        for w in (w2, w3):
            w.signal(signal.SIGTERM)
        rcs = [w.wait(40) for w in (w2, w3)]
        reader.read_to_end(20)
        missing, duplicates, unexpected = summarize(reader.counts(), ids)

    print(
        f"worker-3 joined after {joined_at}/{n} events were sent, worker-1 left after "
        f"{left_at}/{n}; {duplicates} duplicate predictions"
    )
    record_property("duplicates", duplicates)
    assert rc1 == 0, f"worker-1 exit {rc1} after SIGTERM\n{w1.tail()}"
    assert complete and not missing, f"{len(missing)} of {n} events lost: {missing[:10]}"
    assert not unexpected, f"predictions for unknown events: {unexpected[:10]}"
    assert rcs == [0, 0], f"worker-2/3 exits after SIGTERM: {rcs}\n{procs.tails()}"


# ------------------------------------------------------------------ 4: broker outage


def worker_topics(bootstrap: str, input_partitions: int) -> tuple[str, str, str]:
    """Fresh input, output and dead-letter topics on a test's own broker."""
    return (
        create_topic(bootstrap, input_partitions),
        create_topic(bootstrap, 1),
        create_topic(bootstrap, 1),
    )


def test_broker_outage_is_survived(
    tmp_path: Path,
    tiny_model_dir: Path,
    procs: ProcessPool,
    kafka_client: str,
) -> None:
    """The broker goes away for ~5 s mid-stream and comes back on the same ports and data.

    The traffic comes from ``mmstream produce`` in its own process, streaming through the
    outage: kafka-python 3.0.12 leaks a socket per refused reconnect (ResourceWarning on
    GC), so no Kafka client of this test process may be connected while the broker is down.
    """
    broker = LocalBroker(tmp_path / "broker")
    broker.start()
    try:
        topics = worker_topics(broker.bootstrap, 3)
        n, seconds = 600, 12
        w = procs.start(
            "worker",
            # Parts delayed by the outage must still meet their event: the assembly
            # timeout has to outlast the outage (a slow restart on a loaded machine
            # took over 30 s once), so it is set well above it here.
            client_argv(
                kafka_client,
                broker.bootstrap,
                topics,
                new_group(),
                tiny_model_dir,
                "--assembly-timeout-ms",
                "180000",
            ),
        )
        assert w.wait_for_log(ASSIGNED_RE, 60), f"worker got no partitions\n{w.tail()}"
        producer = procs.start(
            "producer",
            produce_argv(broker.bootstrap, topics[0], tiny_model_dir, n, n / seconds, "outage-"),
        )
        # Connected and sending before the outage (a slow start on a loaded machine would
        # otherwise meet the outage while still bootstrapping, and give up).
        assert producer.wait_for_log(PRODUCING_RE, 60), f"producer never started\n{producer.tail()}"
        time.sleep(seconds / 3)
        streaming = producer.alive()
        broker.stop()
        time.sleep(5)
        assert w.alive(), f"the worker died while the broker was down\n{w.tail()}"
        broker.start()
        rc_producer = producer.wait(180)
        assert rc_producer == 0, f"the test producer failed: exit {rc_producer}\n{producer.tail()}"
        ids = [f"outage-{i:06d}" for i in range(n)]
        with PredictionReader(broker.bootstrap, topics[1]) as reader:
            complete = reader.wait_all(ids, 120)
            missing, duplicates, unexpected = summarize(reader.counts(), ids)
        print(
            f"broker down ~{seconds / 3:.0f} s into a {seconds} s stream (producer still "
            f"streaming: {streaming}); {duplicates} duplicate predictions"
        )
        assert w.alive(), f"the worker exited after the outage\n{w.tail()}"
        assert complete and not missing, (
            f"{len(missing)} of {n} events without a prediction after the outage: "
            f"{missing[:10]}\n{w.tail()}"
        )
        assert not unexpected, f"predictions for unknown events: {unexpected[:10]}"
        w.signal(signal.SIGTERM)
        rc = w.wait(40)
        assert rc == 0, f"worker exit {rc} after SIGTERM\n{w.tail()}"
    finally:
        for p in procs.procs:
            p.kill()  # before the broker goes, so nothing spins against a dead port
        broker.stop()


def test_an_idle_worker_whose_broker_is_gone_for_good_exits_instead_of_sitting_silent(
    tmp_path: Path,
    tiny_model_dir: Path,
    procs: ProcessPool,
    kafka_client: str,
) -> None:
    """No work waits, so no commit is missed: only the membership watch sees that the
    member is out of its group (its coordinator unreachable) and stays out. Past
    --progress-timeout-s it exits 1, naming the group, so that it is restarted."""
    broker = LocalBroker(tmp_path / "broker")
    broker.start()
    try:
        topics = worker_topics(broker.bootstrap, 2)
        group = new_group()
        w = procs.start(
            "worker",
            client_argv(
                kafka_client, broker.bootstrap, topics, group, tiny_model_dir,
                "--progress-timeout-s", "8",
            ),
        )  # fmt: skip
        assert w.wait_for_log(ASSIGNED_RE, 60), f"worker got no partitions\n{w.tail()}"
        time.sleep(10)  # idle in its group past the timeout: membership alone is no stall
        assert w.alive(), f"an idle worker in its group exited\n{w.tail()}"
        stopped = time.monotonic()
        broker.stop()
        rc = w.wait(90)
        took = time.monotonic() - stopped
        print(f"exit {rc} {took:.1f} s after the broker stopped (--progress-timeout-s 8)")
        assert rc == 1, f"worker exit {rc} 90 s after its broker stopped\n{w.tail()}"
        assert f"out of consumer group {group!r} for" in w.log(), w.tail()
        assert took >= 8, f"exited {took:.1f} s after the broker stopped\n{w.tail()}"
    finally:
        for p in procs.procs:
            p.kill()
        broker.stop()


def test_a_member_given_no_partitions_is_ready_and_stays_in_its_group(
    kafka_bootstrap: str,
    topic_factory: Callable[..., str],
    tiny_model_dir: Path,
    factory: EventFactory,
    procs: ProcessPool,
    kafka_client: str,
) -> None:
    """More members than partitions: of two workers on a one-partition topic one gets
    nothing. It is still a member of the group: ready, counted in, and not stopped by
    the membership watch past --progress-timeout-s (kafka-python's cooperative protocol
    never calls the rebalance listener for it). The other predicts every event."""
    topics = topic_factory(1), topic_factory(1), topic_factory(1)
    group = new_group()
    ports = free_ports(2)
    argv = [kafka_client, kafka_bootstrap, topics, group, tiny_model_dir]
    workers = [
        procs.start(
            f"worker-{i}",
            client_argv(*argv, "--http-port", str(port), "--progress-timeout-s", "6"),
        )
        for i, port in enumerate(ports)
    ]
    for w, port in zip(workers, ports, strict=True):
        wait_http(port, "/readyz", 200, 60, w)
    time.sleep(9)  # past --progress-timeout-s: a member counted out would have exited
    owned = []
    for w, port in zip(workers, ports, strict=True):
        assert w.alive(), f"{w.name} exited\n{w.tail()}"
        wait_http(port, "/healthz", 200, 5, w)
        m = scrape(port)
        assert m is not None, "GET /metrics failed"
        assert m.get("mmstream_out_of_group_seconds") == 0, f"{w.name} is counted out"
        owned.append(m.get("mmstream_assigned_partitions"))
    assert sorted(owned) == [0, 1], f"assigned partitions per worker: {owned}"
    ids = event_ids("idle-member", 5)
    send_records(kafka_bootstrap, topics[0], [r for ev in factory.events(ids) for r in ev])
    with PredictionReader(kafka_bootstrap, topics[1]) as out:
        out.wait_all(ids, 60)
        missing, dups, _ = summarize(out.counts(), ids)
    assert not missing, f"events not predicted: {missing}"
    assert not dups, f"events predicted twice: {dups}"


# ------------------------------------------------------------------ 5: SIGTERM drains


def test_sigterm_drains_and_commits(
    kafka_bootstrap: str,
    topic_factory: Callable[..., str],
    tiny_model_dir: Path,
    factory: EventFactory,
    procs: ProcessPool,
    kafka_client: str,
) -> None:
    topics = fresh_topics(topic_factory)
    group = new_group()
    port = free_port()
    shutdown_s = 20.0
    n = 200
    ids = event_ids("term", n)
    # The whole backlog is on the topic before the worker starts, and one poll takes it all,
    # so by the first prediction every record has been consumed: the drain must finish it.
    backlog = [r for chunk in interleave(factory.events(ids), 16, 5) for r in chunk]
    send_records(kafka_bootstrap, topics[0], backlog)
    w = procs.start(
        "worker",
        client_argv(kafka_client,
            kafka_bootstrap, topics, group, tiny_model_dir,
            "--http-port", str(port),
            "--shutdown-timeout-s", str(shutdown_s),
            "--max-poll-records", str(3 * n + 10),
            "--commit-interval-ms", "60000",  # no periodic commit: the one at shutdown counts
        ),
    )  # fmt: skip
    with PredictionReader(kafka_bootstrap, topics[1]) as reader:
        assert reader.read_until(lambda: len(reader.records) > 0, 60), (
            f"no prediction within 60 s\n{w.tail()}"
        )
        # Precondition of "committed == end offsets": the worker has consumed every record
        # (a drain finishes what was consumed; it does not fetch more).
        consumed = None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            m = scrape(port)
            consumed = m.get("mmstream_records_consumed_total") if m else None
            if consumed is None or consumed >= 3 * n:
                break
            time.sleep(0.05)
        at_signal = len(reader.records)
        w.signal(signal.SIGTERM)
        t0 = time.monotonic()
        rc = w.wait(shutdown_s + 15)
        took = time.monotonic() - t0
        assert rc == 0, f"exit {rc} after SIGTERM (None = still running)\n{w.tail()}"
        reader.read_to_end(20)
        missing, duplicates, _ = summarize(reader.counts(), ids)
    print(
        f"SIGTERM after {at_signal} predictions were read (consumed {consumed} records); "
        f"exit 0 in {took:.1f} s"
    )
    assert not missing, f"{len(missing)} of {n} events not predicted by the drain: {missing[:10]}"
    assert duplicates == 0, f"{duplicates} duplicates without any crash"
    committed = committed_offsets(kafka_bootstrap, group, topics[0], 3)
    ends = end_offsets(kafka_bootstrap, topics[0], 3)
    assert committed == ends, f"committed {committed} != end offsets {ends} after the drain"


# ------------------------------------------------------------------ 6: incomplete flood


def test_incomplete_flood_is_bounded(
    kafka_bootstrap: str,
    topic_factory: Callable[..., str],
    tiny_model_dir: Path,
    factory: EventFactory,
    procs: ProcessPool,
    record_property: RecordProperty,
    kafka_client: str,
) -> None:
    topics = fresh_topics(topic_factory)
    port = free_port()
    bound = 100
    n_bad, n_good = 1500, 50
    mods = factory.modalities
    bad_ids = event_ids("partial", n_bad)
    good_ids = event_ids("whole", n_good)
    # Each incomplete event misses a different one of the three parts, in turn.
    bad = [
        factory.event(eid, i, keep=[m for m in mods if m != mods[i % len(mods)]])
        for i, eid in enumerate(bad_ids)
    ]
    flood = [r for chunk in interleave(bad, 16, 6) for r in chunk]
    good = [r for ev in factory.events(good_ids) for r in ev]  # parts of one event adjacent
    # The complete events come once the flood is dead-lettered, so that the count of
    # dead letters says when the flood is over.
    send_records(kafka_bootstrap, topics[0], flood)

    w = procs.start(
        "worker",
        client_argv(kafka_client,
            kafka_bootstrap, topics, new_group(), tiny_model_dir,
            "--max-pending-events", str(bound),
            "--assembly-timeout-ms", "1500",
            "--on-incomplete", "dlq",
            "--http-port", str(port),
        ),
    )  # fmt: skip
    wait_http(port, "/metrics", 200, 60, w)
    with (
        MetricsSampler(port, w, interval_s=0.1) as sampler,
        PredictionReader(kafka_bootstrap, topics[1]) as out,
        TopicReader(kafka_bootstrap, topics[2]) as dlq,
    ):
        deadline = time.monotonic() + 150
        sent_good = False
        while time.monotonic() < deadline:
            out.poll(100)
            dlq.poll(100)
            if not sent_good and len(dlq.records) >= 2 * n_bad:
                send_records(kafka_bootstrap, topics[0], good)
                sent_good = True
            if set(good_ids) <= out.seen() and len(dlq.records) >= 2 * n_bad:
                break
            assert w.alive(), f"worker exited during the flood\n{w.tail()}"
        # After the flood: the pause must be lifted (a later sample shows 0 paused partitions).
        settle = time.monotonic() + 10
        while time.monotonic() < settle:
            paused = sampler.series("mmstream_paused_partitions")
            if paused and paused[-1] == 0:
                break
            time.sleep(0.2)
        time.sleep(0.5)
        out.poll(200)
        dlq.poll(200)
    pending = sampler.series("mmstream_pending_events")
    paused = sampler.series("mmstream_paused_partitions")
    peak_rss = sampler.peak_rss
    record_property("peak_rss_bytes", peak_rss)
    record_property("peak_pending_events", max(pending, default=-1))
    print(
        f"{len(sampler.samples)} scrapes: peak pending {max(pending, default=None)}, "
        f"peak paused {max(paused, default=None)}, peak RSS {peak_rss / 2**20:.0f} MiB"
    )

    assert sampler.samples, "no /metrics scrape succeeded during the flood"
    assert pending, "no mmstream_pending_events in /metrics"
    assert max(pending) <= bound, f"mmstream_pending_events reached {max(pending)} > {bound}"
    assert paused and max(paused) > 0, "mmstream_paused_partitions never rose above 0"
    first_pause = next(i for i, v in enumerate(paused) if v > 0)
    assert 0 in paused[first_pause:], "fetching stayed paused after the flood (never back to 0)"
    assert 0 < peak_rss < 2**30, f"peak RSS {peak_rss / 2**20:.0f} MiB (limit 1 GiB)"

    missing, _, unexpected = summarize(out.counts(), good_ids)
    assert not missing, f"{len(missing)} complete events not predicted: {missing[:10]}"
    assert not unexpected, f"incomplete events were predicted: {unexpected[:10]}"
    per_key: dict[str, int] = {}
    reasons: dict[str, int] = {}
    for r in dlq.records:
        headers = {k: v.decode() for k, v in r.headers}
        reasons[headers.get("mm-error", "?")] = reasons.get(headers.get("mm-error", "?"), 0) + 1
        assert headers.get("mm-source", "").startswith(f"{topics[0]}/"), headers
        per_key[r.key.decode()] = per_key.get(r.key.decode(), 0) + 1
    # The flood is written within a second or two of stream time, so most of it fills the
    # bound before its partition's stream time passes the timeout: those are pushed out
    # as evicted_at_bound; the rest time out as incomplete_event. Nothing else.
    assert set(reasons) <= {"incomplete_event", "evicted_at_bound"}, reasons
    assert sum(reasons.values()) == 2 * n_bad, f"dead-letter reasons: {reasons}"
    bad_set = set(bad_ids)
    wrong = {k: c for k, c in per_key.items() if c != 2 or k not in bad_set}
    assert not wrong and len(per_key) == n_bad, (
        f"expected 2 dead letters for each of {n_bad} incomplete events; "
        f"{len(per_key)} keys, off: {dict(list(wrong.items())[:5])}"
    )


# ------------------------------------------------------------------ 7: probes and metrics


def test_probes_and_metrics(
    kafka_bootstrap: str,
    topic_factory: Callable[..., str],
    tiny_model_dir: Path,
    factory: EventFactory,
    procs: ProcessPool,
) -> None:
    topics = fresh_topics(topic_factory)
    port = free_port()
    w = procs.start(
        "worker",
        worker_argv(kafka_bootstrap, topics, new_group(), tiny_model_dir, "--http-port", str(port)),
    )
    wait_http(port, "/healthz", 200, 60, w)
    wait_http(port, "/readyz", 200, 60, w)
    assert http_get(port, "/no-such-path")[0] == 404
    before = scrape(port)
    assert before is not None, "GET /metrics failed"
    ids = event_ids("probe", 5)
    records = [r for ev in factory.events(ids) for r in ev]
    records.append(("odd-one", "video", b"\x00\x01", "video/mp4"))
    send_records(kafka_bootstrap, topics[0], records)

    def settled() -> bool:
        m = scrape(port)
        return m is not None and (
            m.get("mmstream_predictions_total") >= before.get("mmstream_predictions_total") + 5
            and m.get("mmstream_dead_letters_total", reason="unknown_modality") >= 1
        )

    deadline = time.monotonic() + 60
    while not settled() and time.monotonic() < deadline:
        assert w.alive(), f"worker exited\n{w.tail()}"
        time.sleep(0.2)
    after = scrape(port)
    assert after is not None, "GET /metrics failed"
    with PredictionReader(kafka_bootstrap, topics[1]) as out:
        out.wait_all(ids, 10)
        missing, _, _ = summarize(out.counts(), ids)

    pred_delta = after.get("mmstream_predictions_total") - before.get("mmstream_predictions_total")
    consumed_delta = after.get("mmstream_records_consumed_total") - before.get(
        "mmstream_records_consumed_total"
    )
    assert not missing, f"events not predicted: {missing}"
    assert pred_delta == 5, f"mmstream_predictions_total rose by {pred_delta}, want 5\n{after.text}"
    assert consumed_delta >= 15, f"mmstream_records_consumed_total rose by {consumed_delta}"
    for modality in factory.modalities:
        got = after.get("mmstream_records_consumed_total", modality=modality)
        assert got >= 5, f"records_consumed_total{{modality={modality!r}}} = {got}"
    # A producer-controlled header value never becomes a metric label of its own.
    assert after.value("mmstream_records_consumed_total", modality="video") is None
    assert after.get("mmstream_records_consumed_total", modality="unknown") >= 1
    unknown = after.value("mmstream_dead_letters_total", reason="unknown_modality")
    assert unknown == 1, f'mmstream_dead_letters_total{{reason="unknown_modality"}} = {unknown}'
    provider = after.value("mmstream_execution_provider", provider="CPUExecutionProvider")
    assert provider == 1, f"mmstream_execution_provider{{CPUExecutionProvider}} = {provider}"
    assert after.get("mmstream_assigned_partitions") == 3, "want 3 assigned partitions"
    for name in (
        "mmstream_events_completed_total",
        "mmstream_pending_events",
        "mmstream_pending_bytes",
        "mmstream_paused_partitions",
        "mmstream_uncommitted_records",
        "mmstream_out_of_group_seconds",
    ):
        assert after.has(name), f"/metrics lacks {name}"
    # Counted from start-up until the first join is seen (checked once a second), then 0.
    deadline = time.monotonic() + 10
    while (m := scrape(port)) is not None and m.get("mmstream_out_of_group_seconds") > 0:
        assert time.monotonic() < deadline, "a member in its group is still counted out"
        time.sleep(0.2)
    assert m is not None, "GET /metrics failed"
    assert after.get("mmstream_events_completed_total") >= 5


# ------------------------------------------------------------------ 8: --processes N


def test_processes_share_the_group_and_stop_together(
    kafka_bootstrap: str,
    topic_factory: Callable[..., str],
    tiny_model_dir: Path,
    factory: EventFactory,
    procs: ProcessPool,
) -> None:
    topics = fresh_topics(topic_factory)
    group = new_group()
    port = free_port()
    n = 300
    ids = event_ids("proc", n)
    w = procs.start(
        "worker",
        worker_argv(
            kafka_bootstrap, topics, group, tiny_model_dir,
            "--processes", "2",
            "--http-port", str(port),
            "--session-timeout-ms", "6000",
        ),
    )  # fmt: skip
    # The launcher serves the pod's one port: ready once both children joined the group.
    wait_http(port, "/readyz", 200, 90, w)
    send_records(
        kafka_bootstrap,
        topics[0],
        [r for chunk in interleave(factory.events(ids), 16, 9) for r in chunk],
    )
    with PredictionReader(kafka_bootstrap, topics[1]) as reader:
        assert reader.wait_all(ids, 90), f"not every event predicted\n{w.tail()}"
        missing, _duplicates, unexpected = summarize(reader.counts(), ids)
    assert not missing and not unexpected
    m = scrape(port)
    assert m is not None
    assert m.get("mmstream_assigned_partitions") == 3  # summed over the two children
    w.signal(signal.SIGTERM)
    rc = w.wait(60)
    assert rc == 0, f"parent exit {rc} after SIGTERM\n{w.tail()}"
