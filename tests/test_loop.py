"""The loop and its parts without a broker: a fake Kafka (tests/fake_kafka.py), a fake
ONNX session, an injected clock. The real-broker tests are tests/test_worker_kafka.py,
tests/test_resilience.py and tests/test_replay.py."""

from __future__ import annotations

import json
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from worker.backfill.ranges import PartitionRange
from worker.backfill.replay import replay_worker
from worker.backfill.source import RangeSource
from worker.config import WorkerConfig
from worker.contract.errors import BrokerError, InferenceError, Reason
from worker.contract.records import RawRecord, SourceRef
from worker.core.admission import Paced, StageRoom
from worker.core.backpressure import Backpressure
from worker.core.checkpoint import Checkpoint, Commit
from worker.core.deadletter import HEADER_VALUE_TRUNCATED, MAX_VALUE_BYTES, dead_letter
from worker.core.filters import Everything, TimeWindow
from worker.core.offsets import encode_done
from worker.core.pacing import Pacer
from worker.core.pipeline import Worker
from worker.core.poison import PoisonBudget
from worker.core.sensors import Outcomes, Sensor, StatsSensor, WorkerStats
from worker.core.sources import Checkpoints
from worker.edge.client import CommitFailed
from worker.inference.model import ModelRunner, SessionInfo
from worker.ops.metrics import MetricsSensor, WorkerMetrics

from factories import small_manifest
from fake_kafka import FakeBroker, FakeClients, FakeSession, npy_part

IN, OUT, DLQ = "in", "out", "in.dlq"


def config(**overrides: Any) -> WorkerConfig:
    values: dict[str, Any] = {
        "bootstrap_servers": "fake:9092",
        "input_topic": IN,
        "output_topic": OUT,
        "dlq_topic": DLQ,
        "group_id": "g",
        "model": Path("unused"),
        "max_batch_size": 4,
        "max_batch_delay_ms": 5,
        "commit_interval_ms": 50,
        "inference_queue": 0,
    }
    values.update(overrides)
    return WorkerConfig.from_mapping(values)


def runner(session: FakeSession | None = None) -> ModelRunner:
    return ModelRunner(
        small_manifest(), session or FakeSession(), SessionInfo("CPUExecutionProvider", ())
    )


def put_event(
    broker: FakeBroker,
    event_id: str,
    *,
    partition: int = 0,
    skip: tuple[str, ...] = (),
    fill: float = 0.0,
    ts: int | None = None,
) -> None:
    for info in small_manifest().inputs:
        if info.name not in skip:
            npy_part(
                broker, IN, event_id, info.name, info.shape, info.dtype,
                partition=partition, fill=fill, ts=ts,
            )  # fmt: skip


def new_broker(partitions: int = 2) -> FakeBroker:
    broker = FakeBroker()
    broker.create(IN, partitions)
    broker.create(OUT, 1)
    broker.create(DLQ, 1)
    return broker


def run(worker: Worker, turns: int = 2000) -> None:
    """Run the loop until it finishes by itself (max_events, a bounded source) or for
    ``turns`` turns, then drain and close it as ``run`` does."""
    stop = threading.Event()
    count = [0]
    real_step = worker.step

    def step() -> None:
        count[0] += 1
        if count[0] >= turns:
            stop.set()
        real_step()

    worker.step = step  # type: ignore[method-assign]
    worker.run(stop)


def predicted_ids(broker: FakeBroker) -> list[str]:
    return [json.loads(r.value or b"{}")["event_id"] for r in broker.records(OUT)]


# ------------------------------------------------------------------ the loop


@pytest.mark.parametrize("guarantee", ["at-least-once", "exactly-once"])
def test_loop_predicts_every_event_and_commits_to_the_end(guarantee: str) -> None:
    broker = new_broker()
    for i in range(10):
        put_event(broker, f"ev-{i}", partition=i % 2)
    worker = Worker(
        config(guarantee=guarantee, max_events=10), runner(), broker.clock,
        clients=FakeClients(broker),
    )  # fmt: skip
    run(worker)
    assert sorted(predicted_ids(broker)) == sorted(f"ev-{i}" for i in range(10))
    assert broker.committed["g"] == {(IN, 0): (15, ""), (IN, 1): (15, "")}
    assert worker.stats.predicted == 10 and worker.stats.consumed == 30
    if guarantee == "exactly-once":
        assert "committed" in broker.transactions and "aborted" not in broker.transactions


def test_a_retriable_poll_failure_is_a_turn_without_records(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A broker refusing connections during a failover makes kafka-python's poll raise
    # (KafkaConnectionError); the worker waits a moment and polls again, it does not exit.
    monkeypatch.setattr("worker.core.sources.POLL_RETRY_S", 0.0)
    broker = new_broker()
    for i in range(4):
        put_event(broker, f"ev-{i}", partition=i % 2)
    clients = FakeClients(broker)
    make_consumer = clients.consumer
    failures = [BrokerError("poll: connection refused", retriable=True)] * 3

    def consumer(cfg: WorkerConfig) -> Any:
        made = make_consumer(cfg)
        real_poll = made.poll

        def poll(timeout_ms: int, max_records: int) -> list[RawRecord]:
            if failures:
                raise failures.pop()
            return real_poll(timeout_ms, max_records)

        made.poll = poll  # type: ignore[method-assign]
        return made

    clients.consumer = consumer  # type: ignore[method-assign]
    worker = Worker(config(max_events=4), runner(), broker.clock, clients=clients)
    run(worker)
    assert not failures and sorted(predicted_ids(broker)) == [f"ev-{i}" for i in range(4)]

    failures = [BrokerError("poll: not authorized", retriable=False)]
    stopped = Worker(config(max_events=4), runner(), broker.clock, clients=clients)
    with pytest.raises(BrokerError, match="not authorized"):
        run(stopped)


def test_poison_records_are_dead_lettered_with_their_reason_and_settle() -> None:
    broker = new_broker(1)
    put_event(broker, "good")
    broker.append(IN, 0, None, b"x", (("mm-modality", b"text"),))  # no key
    broker.append(IN, 0, b"k", b"x", (("mm-modality", b"smell"),))
    put_event(broker, "last")
    worker = Worker(config(max_events=2), runner(), broker.clock, clients=FakeClients(broker))
    run(worker)
    reasons = [dict(r.headers)["mm-error"].decode() for r in broker.records(DLQ)]
    assert reasons == [Reason.MISSING_KEY.value, Reason.UNKNOWN_MODALITY.value]
    assert worker.stats.dead_lettered == {"missing_key": 1, "unknown_modality": 1}
    assert broker.committed["g"][(IN, 0)] == (8, "")


def test_incomplete_event_expires_after_the_timeout_and_is_dead_lettered() -> None:
    broker = new_broker(1)
    put_event(broker, "half", skip=("audio",))
    put_event(broker, "whole")
    broker.clock.tick = 1  # time passes on every read of the clock
    worker = Worker(
        config(assembly_timeout_ms=200), runner(), broker.clock, clients=FakeClients(broker)
    )
    run(worker, turns=400)
    assert predicted_ids(broker) == ["whole"]
    dlq = broker.records(DLQ)
    assert [dict(r.headers)["mm-error"] for r in dlq] == [b"incomplete_event"] * 2
    assert worker.stats.incomplete == 1
    assert broker.committed["g"][(IN, 0)] == (5, "")


def test_a_poison_event_is_isolated_and_a_broken_model_stops_the_worker() -> None:
    broker = new_broker(1)
    for i in range(4):
        put_event(broker, f"ev-{i}", fill=7.0 if i == 2 else 0.0)
    poison = FakeSession(fail_when=lambda feed: bool((feed["audio"] == 7.0).any()))
    worker = Worker(config(max_events=3), runner(poison), broker.clock, clients=FakeClients(broker))
    run(worker)
    assert sorted(predicted_ids(broker)) == ["ev-0", "ev-1", "ev-3"]
    assert {dict(r.headers)["mm-error"] for r in broker.records(DLQ)} == {b"inference_error"}
    assert len(broker.records(DLQ)) == 3  # the poison event's three parts

    broken = new_broker(1)
    for i in range(12):
        put_event(broken, f"ev-{i}")
    always = FakeSession(fail_when=lambda feed: True)
    worker = Worker(config(), runner(always), broken.clock, clients=FakeClients(broken))
    with pytest.raises(InferenceError, match="9 events in a row"):
        run(worker)
    assert "g" not in broken.committed or broken.committed["g"][(IN, 0)][0] < 36


def test_an_unacknowledged_delivery_stops_the_worker_before_it_is_committed() -> None:
    broker = new_broker(1)
    put_event(broker, "a")
    broker.fail_next_send = OSError("broker gone")
    worker = Worker(config(), runner(), broker.clock, clients=FakeClients(broker))
    with pytest.raises(BrokerError, match="not acknowledged"):
        run(worker)
    # Nothing beyond the lost delivery was committed: a restart re-reads the event.
    assert broker.committed.get("g", {}).get((IN, 0), (0, ""))[0] == 0


def aborting_worker() -> tuple[FakeBroker, Worker]:
    """Four events on one partition, exactly-once, and the first commit fails (an abort)."""
    broker = new_broker(1)
    for i in range(4):
        put_event(broker, f"ev-{i}")
    broker.fail_next_commit = BrokerError("coordinator moved")
    worker = Worker(
        config(guarantee="exactly-once", max_events=4), runner(), broker.clock,
        clients=FakeClients(broker),
    )  # fmt: skip
    return broker, worker


def test_exactly_once_abort_rewinds_and_the_counts_stay_those_of_committed_work() -> None:
    broker, worker = aborting_worker()
    run(worker)
    assert broker.transactions[0] == "aborted" and "committed" in broker.transactions
    assert sorted(predicted_ids(broker)) == [f"ev-{i}" for i in range(4)]  # each once
    assert worker.stats.predicted == 4 and worker.stats.aborts == 1
    assert worker.stats.consumed == 24  # read twice: before and after the rewind


def test_after_an_abort_what_is_skipped_as_done_comes_from_the_checkpoint_rewound_to() -> None:
    # The checkpoint moves on the broker after the rewind read it (a commit landing late):
    # the loop's bookkeeping must start from what it rewound to, or it would skip ev-2 as
    # "finished" (the new checkpoint's metadata says so) while re-reading from offset 0.
    broker, worker = aborting_worker()
    ev2 = [r.source.offset for r in broker.logs[IN][0] if r.key == b"ev-2"]
    real_rewind = worker.source.rewind

    def rewind_then_the_checkpoint_moves() -> Checkpoints:
        found = real_rewind()
        broker.committed["g"] = {(IN, 0): (0, encode_done(0, [o for o in ev2 if o > 0]))}
        return found

    worker.source.rewind = rewind_then_the_checkpoint_moves  # type: ignore[method-assign]
    run(worker)
    assert broker.transactions[0] == "aborted"
    assert sorted(predicted_ids(broker)) == [f"ev-{i}" for i in range(4)]


@pytest.mark.parametrize("retriable", [True, False])
def test_a_rewind_while_the_coordinator_is_away_is_retried_not_fatal(retriable: bool) -> None:
    # Two brokers of three down: the checkpoints cannot be read for a while after the
    # abort. The rewind is retried (within --progress-timeout-s); a refusal still stops.
    broker, worker = aborting_worker()
    real_rewind, failures = worker.source.rewind, [3]

    def rewind_with_the_coordinator_away() -> Checkpoints:
        if failures[0] > 0:
            failures[0] -= 1
            raise BrokerError("cannot read the committed offset: timed out", retriable=retriable)
        return real_rewind()

    worker.source.rewind = rewind_with_the_coordinator_away  # type: ignore[method-assign]
    if not retriable:
        with pytest.raises(BrokerError, match="cannot read the committed offset"):
            run(worker)
        return
    run(worker)
    assert failures == [0] and broker.transactions[0] == "aborted"
    assert sorted(predicted_ids(broker)) == [f"ev-{i}" for i in range(4)]


@pytest.mark.parametrize("retriable", [True, False])
def test_a_partitions_checkpoint_read_while_the_coordinator_moves_is_retried(
    monkeypatch: pytest.MonkeyPatch, retriable: bool
) -> None:
    # A newly assigned partition's checkpoint is read at its first record; the
    # coordinator may be failing over just then. Retried within --progress-timeout-s, as
    # a rewind is; a refusal (not authorized) still stops the worker.
    monkeypatch.setattr("worker.core.retry.RETRY_PAUSE_S", 0.0)
    broker = new_broker(1)
    for i in range(3):
        put_event(broker, f"ev-{i}")
    broker.committed["g"] = {(IN, 0): (0, encode_done(0, [0, 1, 2]))}  # ev-0 is finished
    worker = Worker(config(max_events=2), runner(), broker.clock, clients=FakeClients(broker))
    real_committed, calls, failures = worker.consumer.committed, [0], [3]
    beats: list[float] = []  # the loop's beats (/healthz) seen at each failed try
    beats_at_failure: list[int] = []
    real_beat = worker.sensor.beat

    def beat(now_s: float) -> None:
        beats.append(now_s)
        real_beat(now_s)

    def committed_with_the_coordinator_away(tp: tuple[str, int]) -> tuple[int | None, str]:
        calls[0] += 1  # the first is the join's (the fake seeks there); then the tracker's
        if calls[0] > 1 and failures[0] > 0:
            failures[0] -= 1
            beats_at_failure.append(len(beats))
            raise BrokerError("cannot read the committed offset: timed out", retriable=retriable)
        return real_committed(tp)

    worker.sensor.beat = beat  # type: ignore[method-assign]
    worker.consumer.committed = committed_with_the_coordinator_away  # type: ignore[method-assign]
    if not retriable:
        with pytest.raises(BrokerError, match="cannot read the committed offset"):
            run(worker)
        return
    run(worker)
    assert failures == [0]
    # The three tries follow one another inside one turn; each pause between them beats,
    # so --stall-timeout-s does not restart a loop retrying within its budget.
    first = beats_at_failure[0]
    assert beats_at_failure == [first, first + 1, first + 2], beats_at_failure
    assert predicted_ids(broker) == ["ev-1", "ev-2"]  # ev-0 skipped as the checkpoint says


def test_retry_calls_again_within_its_budget_and_never_after_a_refusal() -> None:
    from worker.core.retry import Retry

    now, slept = [0], []

    def sleep(s: float) -> None:
        slept.append(s)
        now[0] += 1_000

    retry, tries = Retry(3.0, lambda: now[0], sleep=sleep, pause_s=0.5), [0]

    def failing(times: int, retriable: bool = True) -> str:
        tries[0] += 1
        if tries[0] <= times:
            raise BrokerError(f"try {tries[0]} failed", retriable=retriable)
        return "done"

    assert retry.call("x", lambda: failing(2)) == "done" and slept == [0.5, 0.5]
    tries[0], slept[:] = 0, []
    with pytest.raises(BrokerError, match="try 4 failed"):  # 3 s spent: the last failure
        retry.call("x", lambda: failing(10))
    assert len(slept) == 3
    tries[0], slept[:] = 0, []
    with pytest.raises(BrokerError, match="try 1 failed"):
        retry.call("x", lambda: failing(1, retriable=False))
    assert slept == []


def test_revoked_partitions_drop_their_pending_work_at_least_once() -> None:
    broker = new_broker(2)
    put_event(broker, "p0", partition=0, skip=("audio",))
    put_event(broker, "p1", partition=1)
    clients = FakeClients(broker)
    worker = Worker(config(max_events=1), runner(), broker.clock, clients=clients)
    worker.source.join()
    worker.step()
    assert len(worker.intake.assembler) == 1  # p0 waits for its audio
    clients.consumers[0].revoke({(IN, 0)})
    worker.step()
    assert len(worker.intake.assembler) == 0
    run(worker)
    assert predicted_ids(broker) == ["p1"]
    assert broker.committed["g"][(IN, 0)] == (0, "")  # the new owner re-reads p0


def test_backpressure_pauses_at_the_bound_and_resumes_below_it() -> None:
    broker = new_broker(1)
    for i in range(30):
        put_event(broker, f"half-{i}", skip=("audio",))
    broker.clock.tick = 1
    worker = Worker(
        config(max_pending_events=10, assembly_timeout_ms=100, max_poll_records=4),
        runner(), broker.clock, clients=FakeClients(broker),
    )  # fmt: skip
    seen = []
    worker.source.join()
    for _ in range(600):
        worker.step()
        seen.append((worker.pending_events(), bool(worker.consumer.paused())))
    assert max(p for p, _ in seen) <= 10
    assert any(paused for _, paused in seen) and not seen[-1][1]
    # Every record dead-lettered once: those the full bound pushed out as such, the rest
    # (read once fetching resumed, then idle) when the wall clock moved the idle partition.
    reasons = worker.stats.dead_lettered
    assert sum(reasons.values()) == 60 and set(reasons) == {"evicted_at_bound", "incomplete_event"}
    assert worker.stats.evicted == reasons["evicted_at_bound"] // 2
    assert worker.stats.evicted + worker.stats.incomplete == 30


def test_a_fetch_stall_longer_than_the_timeout_expires_nothing_whose_parts_are_in_the_log() -> None:
    broker = new_broker(1)
    for i in range(6):
        put_event(broker, f"e{i}", ts=1_000 + i)  # all parts written within 6 ms
    broker.clock.tick = 10_000  # but 10 s of wall clock pass on every read of it
    worker = Worker(
        config(assembly_timeout_ms=200, max_poll_records=1), runner(), broker.clock,
        clients=FakeClients(broker),
    )  # fmt: skip
    worker.source.join()
    for _ in range(4):  # part of the log read, then the partition paused (a stall)
        worker.step()
    worker.consumer.pause(worker.consumer.assignment())
    for _ in range(50):
        worker.step()
    assert len(worker.intake.assembler) == 1 and broker.records(DLQ) == []
    worker.consumer.resume(worker.consumer.assignment())
    run(worker, turns=200)
    assert sorted(predicted_ids(broker)) == [f"e{i}" for i in range(6)]
    assert broker.records(DLQ) == [] and worker.stats.incomplete == 0


def test_an_event_expires_at_the_same_place_in_the_stream_however_fast_it_is_read() -> None:
    # "late"'s audio comes 10 s of stream time after its first part: past the 5 s timeout,
    # although the worker reads both within the same millisecond.
    broker = new_broker(1)
    put_event(broker, "late", skip=("audio",), ts=0)
    put_event(broker, "in-time", ts=9_000)
    put_event(broker, "late", skip=("image", "text"), ts=10_000)
    worker = Worker(
        config(assembly_timeout_ms=5_000), runner(), broker.clock, clients=FakeClients(broker)
    )
    run(worker, turns=50)
    assert predicted_ids(broker) == ["in-time"]
    dlq = broker.records(DLQ)
    assert [dict(r.headers)["mm-error"] for r in dlq] == [b"incomplete_event"] * 2
    assert [r.key for r in dlq] == [b"late", b"late"]
    assert len(worker.intake.assembler) == 1  # the late audio waits for its event's other parts


@pytest.mark.parametrize(("bound", "predicted"), [(10, 0), (1000, 40)])
def test_parts_farther_apart_than_the_bound_are_evicted_with_their_own_reason(
    bound: int, predicted: int
) -> None:
    # One partition: every event's first part, then every second part, then every third.
    broker = new_broker(1)
    names = [i.name for i in small_manifest().inputs]
    for name in names:
        for i in range(40):
            put_event(broker, f"e{i}", skip=tuple(n for n in names if n != name), ts=1_000)
    worker = Worker(
        config(max_pending_events=bound, assembly_timeout_ms=5_000, max_poll_records=8),
        runner(), broker.clock, clients=FakeClients(broker),
    )  # fmt: skip
    run(worker, turns=400)
    assert len(predicted_ids(broker)) == predicted
    reasons = Counter(dict(r.headers)["mm-error"] for r in broker.records(DLQ))
    assert broker.committed["g"][(IN, 0)] == (120, "")
    if predicted:
        assert reasons == {} and worker.stats.evicted == worker.stats.incomplete == 0
        return
    # Each event was seen as three fragments (one part each): the full bound pushed them
    # out as they came; only the last few, left when the log ended, timed out (idle).
    assert sum(reasons.values()) == 120 == worker.stats.evicted + worker.stats.incomplete
    assert reasons[b"evicted_at_bound"] == worker.stats.evicted > 100


def test_unacknowledged_outputs_count_in_the_bounds_and_hold_fetching_and_inference() -> None:
    broker = new_broker(1)
    for i in range(30):
        put_event(broker, f"ev-{i:02d}")
    broker.hold_acks = True  # the output broker freezes
    worker = Worker(
        config(max_pending_events=8, max_events=30), runner(), broker.clock,
        clients=FakeClients(broker),
    )  # fmt: skip
    worker.source.join()
    for _ in range(300):
        worker.step()
    # At the bound: up to 8 outputs in flight (the next batch of up to 4 would pass it),
    # fetching paused, no more batches inferred, and nothing of it committed.
    assert 8 - 4 < worker.outputs.records <= 8 and worker.outputs.nbytes > 0
    assert worker.consumer.paused() == {(IN, 0)}
    assert worker.stats.consumed < 90 and broker.records(OUT) == []
    assert broker.committed.get("g", {}).get((IN, 0), (0, ""))[0] == 0
    broker.release()  # it thaws: everything flows again, nothing lost
    for _ in range(2000):
        worker.step()
        if worker.stats.predicted >= 30:
            break
    worker.drain()
    assert sorted(predicted_ids(broker)) == [f"ev-{i:02d}" for i in range(30)]
    assert worker.outputs.records == 0 and worker.outputs.nbytes == 0
    assert broker.committed["g"][(IN, 0)] == (90, "")


def test_large_dead_letters_waiting_for_acks_stay_within_the_byte_bound() -> None:
    broker = new_broker(1)
    big = 256 * 1024
    for _ in range(40):  # 10 MiB of poison (no key), read in polls of up to 500 records
        broker.append(IN, 0, None, bytes(big), (("mm-modality", b"text"),))
    put_event(broker, "after")
    broker.hold_acks = True  # the output broker freezes
    worker = Worker(
        config(max_pending_bytes=2 * 1024 * 1024), runner(), broker.clock,
        clients=FakeClients(broker),
    )  # fmt: skip
    worker.source.join()
    peak = 0
    for _ in range(200):
        worker.step()
        peak = max(peak, worker.outputs.nbytes + worker.intake.assembler.pending_bytes)
    # At most the bound plus the one record that crossed it (a dead letter is cut to 512 KiB).
    assert 2 * 1024 * 1024 <= peak < 2 * 1024 * 1024 + 600 * 1024
    assert worker.consumer.paused() == {(IN, 0)} and worker.stats.consumed < 40
    broker.release()  # it thaws: the records put back are read again, nothing lost
    for _ in range(2000):
        worker.step()
        if worker.stats.predicted:
            break
    worker.drain()
    assert len(broker.records(DLQ)) == 40 and predicted_ids(broker) == ["after"]
    assert broker.committed["g"][(IN, 0)] == (43, "")


def test_a_worker_whose_outputs_are_never_acknowledged_stops_instead_of_waiting_silently() -> None:
    broker = new_broker(1)
    for i in range(6):
        put_event(broker, f"ev-{i}")
    broker.hold_acks = True  # the output broker is gone for good
    broker.clock.tick = 50
    metrics = WorkerMetrics()
    worker = Worker(
        config(progress_timeout_s=20), runner(), broker.clock, clients=FakeClients(broker),
        sensors=[MetricsSensor(metrics)],
    )  # fmt: skip
    worker.source.join()
    with pytest.raises(BrokerError, match=r"no commit or transaction completed in 2\d s"):
        for _ in range(10_000):
            worker.step()
    assert worker.liveness.progress.stalled_s(broker.clock.now_ms / 1000) > 20
    # Nothing unacknowledged was committed.
    assert broker.committed.get("g", {}).get((IN, 0), (0, "")) == (0, "")


def test_a_producer_that_can_neither_commit_nor_abort_is_replaced_and_nothing_is_lost() -> None:
    broker = new_broker(1)
    for i in range(4):
        put_event(broker, f"ev-{i}")
    clients = FakeClients(broker)
    worker = Worker(
        config(guarantee="exactly-once", transactional_id="t", commit_interval_ms=1_000),
        runner(), broker.clock, clients=clients,
    )  # fmt: skip
    worker.source.join()
    broker.clock.tick = 1
    worker.step()  # the first four, committed in the first transaction
    for i in range(4, 8):
        put_event(broker, f"ev-{i}")
    worker.step()  # the next four, sent in a transaction that stays open for a second
    assert worker.checkpoint.in_transaction and broker.transactions == ["committed"]
    clients.producers[0].wedged = True  # it lost its coordinator: commit and abort time out
    broker.failing_inits = 1  # and the first replacement cannot get a producer id yet
    for _ in range(2000):
        worker.step()
        if worker.stats.predicted == 8:
            break
    worker.drain()
    assert len(clients.producers) == 3 and clients.producers[0].closed
    assert sorted(predicted_ids(broker)) == [f"ev-{i}" for i in range(8)]  # each once
    assert broker.committed["g"][(IN, 0)][0] == 24
    assert worker.stats.predicted == 8 and worker.stats.aborts == 1


def test_a_fenced_producer_stops_the_worker_instead_of_fencing_the_new_one() -> None:
    from worker.edge.client import Fenced

    broker = new_broker(1)
    put_event(broker, "ev")
    clients = FakeClients(broker)
    worker = Worker(
        config(guarantee="exactly-once", transactional_id="t", commit_interval_ms=1_000),
        runner(), broker.clock, clients=clients,
    )  # fmt: skip
    worker.source.join()
    broker.clock.tick = 1
    for _ in range(50):
        worker.step()
        if worker.checkpoint.in_transaction:
            break
    broker.fail_next_commit = Fenced("a newer producer with this transactional id is active")

    def fenced_abort() -> None:
        raise Fenced("a newer producer with this transactional id is active")

    clients.producers[0].abort_transaction = fenced_abort  # type: ignore[method-assign]
    with pytest.raises(Fenced):
        for _ in range(100):
            worker.step()
    assert len(clients.producers) == 1 and broker.records(OUT) == []


@pytest.mark.parametrize("guarantee", ["at-least-once", "exactly-once"])
def test_a_record_refused_for_good_stops_the_worker_instead_of_retrying(guarantee: str) -> None:
    broker = new_broker(1)
    put_event(broker, "ev")
    broker.fail_next_send = BrokerError("not authorized: Write on topic 'out'", retriable=False)
    worker = Worker(
        config(guarantee=guarantee, transactional_id="t"), runner(), broker.clock,
        clients=FakeClients(broker),
    )  # fmt: skip
    with pytest.raises(BrokerError, match="refused by the broker: not authorized") as caught:
        run(worker, turns=200)
    assert not caught.value.retriable
    assert broker.records(OUT) == []  # and nothing of the event committed:
    assert broker.committed.get("g", {}).get((IN, 0), (0, "")) == (0, "")


def test_healthz_fails_once_work_waits_past_the_progress_timeout() -> None:
    from worker.ops.serve import _progress

    broker = new_broker(1)
    worker = Worker(
        config(progress_timeout_s=30), runner(), broker.clock, clients=FakeClients(broker)
    )
    now_s = broker.clock.now_ms / 1000
    assert _progress(None) == (True, "starting")
    worker.liveness.progress.check(now_s - 29, lambda: True)
    assert _progress(worker)[0] is True
    worker.liveness.progress.progressed()
    worker.liveness.progress.check(now_s - 31, lambda: True)
    ok, reason = _progress(worker)
    assert not ok and reason.startswith("no commit or transaction completed in 31 s")


def test_a_member_out_of_its_group_past_the_progress_timeout_stops_the_worker() -> None:
    # Lost from its group (the coordinator gone for good, a join refused without end)
    # with no work waiting, a worker used to sit alive and silent: it now says so on
    # /healthz and stops once it has been out for --progress-timeout-s.
    from worker.ops.serve import _progress

    broker = new_broker(1)
    put_event(broker, "ev")
    broker.clock.tick = 50
    metrics = WorkerMetrics()
    worker = Worker(
        config(progress_timeout_s=20), runner(), broker.clock, clients=FakeClients(broker),
        sensors=[MetricsSensor(metrics)],
    )  # fmt: skip
    worker.source.join()
    for _ in range(200):
        worker.step()
    assert predicted_ids(broker) == ["ev"] and not worker._work_waiting()
    consumer, clock = worker.consumer, broker.clock

    def steps_for(seconds: float) -> None:
        until = clock.now_ms + seconds * 1000
        while clock.now_ms < until:
            worker.step()

    consumer.out_of_group = True  # type: ignore[attr-defined]
    steps_for(12)  # out for 12 s, then back: the count starts again
    consumer.out_of_group = False  # type: ignore[attr-defined]
    steps_for(12)
    assert worker.liveness.membership.stalled_s(clock.now_ms / 1000) == 0.0
    assert metrics.value("mmstream_out_of_group_seconds") == 0.0
    consumer.out_of_group = True  # type: ignore[attr-defined]
    with pytest.raises(BrokerError, match=r"out of consumer group 'g' for 2\d s") as caught:
        for _ in range(10_000):
            worker.step()
            if 10 < worker.liveness.membership.stalled_s(clock.now_ms / 1000) < 15:
                assert _progress(worker) == (True, "ok")
                assert 9 < (metrics.value("mmstream_out_of_group_seconds") or 0) < 15
    assert caught.value.retriable
    ok, reason = _progress(worker)
    assert not ok and reason.startswith("out of consumer group 'g' for 2")


def test_watchdog_counts_only_while_work_waits_and_restarts_after_progress() -> None:
    from worker.core.watchdog import Watchdog

    dog, waiting = Watchdog(timeout_s=10, check_every_s=1), [False]
    assert dog.check(0.0, lambda: waiting[0]) == 0.0  # idle: nothing to wait for
    waiting[0] = True
    assert dog.check(0.5, lambda: waiting[0]) == 0.0  # asked at most once a second
    assert dog.check(1.0, lambda: waiting[0]) == 0.0  # waiting from now on
    assert dog.check(11.5, lambda: waiting[0]) == 10.5 and dog.expired(11.5)
    dog.progressed()  # a commit completed
    assert dog.stalled_s(11.6) == 0.0 and not dog.expired(11.6)
    assert dog.check(12.0, lambda: waiting[0]) == 0.0  # still waiting: a new count
    waiting[0] = False
    assert dog.check(30.0, lambda: waiting[0]) == 0.0


# ------------------------------------------------------------------ replay, composed


def test_replay_is_the_worker_with_a_range_a_window_and_a_pacer() -> None:
    broker = new_broker(1)
    start = broker.clock.now_ms
    for i in range(40):
        put_event(broker, f"ev-{i:02d}", ts=start + 10 * i)
    window = (start + 100, start + 300)  # events 10..29
    worker, source = replay_worker(
        config(group_id="mmstream-backfill-t", max_batch_size=4), runner(),
        [PartitionRange(0, 0, 120, 0, 120)], window, rate=100.0,
        clock=broker.clock, clients=FakeClients(broker),
    )  # fmt: skip
    assert isinstance(worker.dispatch.admission, Paced) and isinstance(
        worker.intake.policy.events, TimeWindow
    )
    began = broker.clock.now_ms
    worker.run(threading.Event())  # ends by itself: the range is exhausted
    assert predicted_ids(broker) == [f"ev-{i:02d}" for i in range(10, 30)]
    assert worker.stats.outside_window == 20
    assert source.exhausted()
    assert broker.committed["mmstream-backfill-t"][(IN, 0)] == (120, "")
    # Paced: 20 events at 100 events/s in bursts of one batch take >= 160 ms of clock.
    assert broker.clock.now_ms - began >= 160


def test_range_source_never_resumes_a_partition_that_reached_its_end() -> None:
    broker = new_broker(2)
    for i in range(3):
        put_event(broker, f"ev-{i}", partition=0)
    clients = FakeClients(broker)
    consumer = clients.consumer(config())
    ranges = [PartitionRange(p, 0, 9, 0, 9) for p in (0, 1)]
    source = RangeSource(consumer, IN, ranges)
    source.join()
    consumer.seek((IN, 0), 9)
    source.after_poll()  # partition 0 reached its end: paused for good
    consumer.pause([(IN, 1)])  # backpressure paused partition 1
    assert consumer.paused() == {(IN, 0), (IN, 1)}
    assert source.resumable() == {(IN, 1)}
    assert not source.exhausted()


def test_range_source_resumes_from_its_checkpoint_and_restart_starts_over() -> None:
    broker = new_broker(1)
    broker.committed["b"] = {(IN, 0): (5, "")}
    consumer = FakeClients(broker).consumer(config(group_id="b"))
    source = RangeSource(consumer, IN, [PartitionRange(0, 2, 9, 2, 9)])
    source.join()
    assert consumer.position((IN, 0)) == 5 and source.resumed_from == {0: 5}
    assert source.records_before_checkpoint == 3
    again = RangeSource(consumer, IN, [PartitionRange(0, 2, 9, 2, 9)], restart=True)
    again.join()
    assert consumer.position((IN, 0)) == 2 and again.resumed_from == {}
    assert broker.committed["b"][(IN, 0)] == (2, "")


# ------------------------------------------------------------------ the parts


def test_pacer_holds_the_rate_with_an_injected_clock() -> None:
    now = [0.0]
    pacer = Pacer(rate=100.0, burst=8, clock=lambda: now[0])
    assert not pacer.ready(8) and pacer.wait_ms(8) == 80  # starts empty: 8 events = 80 ms
    sent = 0
    for ms in range(10_001):  # 10 s in 1 ms steps
        now[0] = ms / 1000.0
        if pacer.ready(8):
            pacer.take(8)
            sent += 8
    assert 990 <= sent <= 1000  # 100 events/s over 10 s, never above
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s

    blocking = Pacer(rate=50.0, clock=lambda: now[0])
    for _ in range(10):
        blocking.pace(1, sleep=sleep)
    assert sum(slept) == pytest.approx(10 / 50.0)
    with pytest.raises(ValueError):
        Pacer(rate=0)


def test_paced_admission_needs_room_and_tokens() -> None:
    now = [0.0]

    class Room:
        room = True

        def has_room(self) -> bool:
            return self.room

    room = Room()
    paced = Paced(StageRoom(room), Pacer(10.0, burst=2, clock=lambda: now[0]))
    assert not paced.admits(2) and 0 < paced.wait_ms(2) <= 100
    now[0] = 0.2
    assert paced.admits(2)
    room.room = False
    assert not paced.admits(2)
    room.room = True
    paced.submitted(2)
    assert not paced.admits(1)


def test_backpressure_decides_with_hysteresis() -> None:
    bp = Backpressure(max_events=10, max_bytes=1000)
    assert bp.decide(5, 0) == bp.decide(5, 0)  # below: nothing to do
    full = bp.decide(10, 0)
    assert full.pause and not full.resume and full.room == 0
    assert not bp.decide(9, 0).resume  # 9 > 80% of 10: still paused
    resumed = bp.decide(8, 0)
    assert resumed.resume and not resumed.pause and resumed.room == 2
    assert bp.decide(0, 1000).pause  # bytes count too


def test_dead_letter_keeps_the_record_replaces_old_error_headers_and_truncates() -> None:
    src = SourceRef("in", 3, 42, 0)
    raw = RawRecord(src, b"k", b"v" * (MAX_VALUE_BYTES + 10), (("a", b"1"), ("mm-error", b"x")))
    out = dead_letter("dlq", raw, Reason.DECODE_ERROR, "bad " * 2000)
    headers = dict(out.headers)
    assert out.topic == "dlq" and out.key == b"k" and len(out.value or b"") == MAX_VALUE_BYTES
    assert headers["a"] == b"1" and headers["mm-error"] == b"decode_error"
    assert [k for k, _ in out.headers].count("mm-error") == 1
    assert headers["mm-source"] == b"in/3/42" and len(headers["mm-error-detail"]) == 4000
    assert headers[HEADER_VALUE_TRUNCATED] == str(MAX_VALUE_BYTES + 10).encode()
    small = dead_letter("dlq", RawRecord(src, None, None, ()), Reason.MISSING_KEY, "no key")
    assert small.value is None and HEADER_VALUE_TRUNCATED not in dict(small.headers)


def test_poison_budget_is_spent_by_a_streak_only() -> None:
    budget = PoisonBudget(max_streak=2)
    assert not budget.failed_alone() and not budget.failed_alone()
    budget.succeeded()
    assert not budget.failed_alone() and not budget.failed_alone()
    assert budget.failed_alone()


def test_checkpoint_commits_only_owned_finished_work_and_reports_refusals() -> None:
    broker = new_broker(2)
    clients = FakeClients(broker)
    consumer, producer = clients.consumer(config()), clients.producer(config())
    cp = Checkpoint(
        consumer, producer, exactly_once=False, interval_ms=100,
        owned=lambda: {(IN, 0)},
    )  # fmt: skip
    srcs = [SourceRef(IN, p, o, 0) for p in (0, 1) for o in range(3)]
    for s in srcs:
        assert not cp.track(s)
    cp.done(s for s in srcs if s.offset != 1)
    assert cp.commit(0) is Commit.COMMITTED
    assert broker.committed["g"] == {(IN, 0): (1, "mm1:1")}  # partition 1 is not owned
    assert not cp.due(50) and cp.due(100)
    broker.fail_next_commit = CommitFailed("rebalancing", rebalancing=True)
    cp.done([srcs[1]])
    assert cp.commit(100) is Commit.FAILED
    assert cp.commit(200) is Commit.COMMITTED and broker.committed["g"][(IN, 0)] == (3, "")
    assert cp.commit(300) is Commit.IDLE
    # A broker outage is ridden through too: the commit fails, the next one goes.
    cp.track(SourceRef(IN, 0, 3, 0))
    cp.done([SourceRef(IN, 0, 3, 0)])
    broker.fail_next_commit = BrokerError("commit failed: KafkaConnectionError: ECONNREFUSED")
    assert cp.commit(400) is Commit.FAILED and broker.committed["g"][(IN, 0)] == (3, "")
    assert cp.commit(500) is Commit.COMMITTED and broker.committed["g"][(IN, 0)] == (4, "")


def test_checkpoint_abort_ends_the_transaction_and_forgets_offsets() -> None:
    broker = new_broker(1)
    clients = FakeClients(broker)
    eos = config(guarantee="exactly-once")
    consumer, producer = clients.consumer(eos), clients.producer(eos)
    cp = Checkpoint(
        consumer, producer, exactly_once=True, interval_ms=0,
        owned=lambda: {(IN, 0)},
    )  # fmt: skip
    cp.track(SourceRef(IN, 0, 0, 0))
    cp.sending()
    assert cp.in_transaction
    cp.abort()
    assert not cp.in_transaction and cp.open_records() == 0
    assert broker.transactions == ["aborted"]
    broker.committed["g"] = {(IN, 0): (0, "mm1:1-2")}
    fresh = Checkpoint(
        consumer, producer, exactly_once=True, interval_ms=0,
        owned=lambda: {(IN, 0)},
    )  # fmt: skip
    assert not fresh.track(SourceRef(IN, 0, 0, 0))
    assert fresh.track(SourceRef(IN, 0, 1, 0))  # finished before the restart: skipped


def test_outcomes_held_until_commit_and_dropped_on_abort() -> None:
    stats = WorkerStats()
    held = Outcomes(StatsSensor(stats, lambda: 0), held=True)
    held.predicted(0.1)
    held.dead_lettered("decode_error")
    held.outside_window()
    assert stats.predicted == 0
    held.commit()
    assert (stats.predicted, stats.dead_lettered, stats.outside_window) == (
        1,
        {"decode_error": 1},
        1,
    )
    held.incomplete("dlq")
    held.discard()
    held.commit()
    assert stats.incomplete == 0
    direct = Outcomes(Sensor(), held=False)
    direct.predicted(None)  # reaches the sensor at once (nothing held)
    assert direct._pending == []


def test_event_filters() -> None:
    assert Everything().accepts(0)
    w = TimeWindow(100, 200)
    assert [w.accepts(t) for t in (99, 100, 199, 200)] == [False, True, True, False]
    assert TimeWindow(None, None).accepts(-(10**9))


def test_fake_session_output_is_what_the_runner_labels() -> None:
    r = runner()
    assert r.manifest.labels[int(np.argmax(FakeSession().run(None, {"x": [0]})[0][0]))] == "3"
