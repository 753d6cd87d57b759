"""The loop's parts on their own, without a broker: outputs, liveness, the incomplete
policy, dispatch, the sensor fan-out and the guarantees."""

from __future__ import annotations

import inspect
from typing import Any

import pytest

from worker.contract.errors import BrokerError, ConfigError, Reason
from worker.contract.records import Event, OutRecord, Part, RawRecord, SourceRef
from worker.core.admission import StageRoom
from worker.core.assemble import Incomplete
from worker.core.batcher import Batcher
from worker.core.checkpoint import Checkpoint
from worker.core.dispatch import Dispatch
from worker.core.filters import Everything, TimeWindow
from worker.core.incomplete import OUTSIDE_WINDOW, IncompletePolicy
from worker.core.liveness import Liveness
from worker.core.outputs import Outputs
from worker.core.sensors import CALLS, Outcomes, Sensor, Sensors, StatsSensor, WorkerStats
from worker.core.stage import BatchStage

IN = "in"


class Producer:
    """Records what is sent; acks and failures are the test's to deliver."""

    def __init__(self) -> None:
        self.sent: list[tuple[OutRecord, Any, Any]] = []
        self.began = 0

    def send(self, record: OutRecord, on_ack: Any, on_error: Any) -> None:
        self.sent.append((record, on_ack, on_error))

    def begin_transaction(self) -> None:
        self.began += 1


class Consumer:
    def committed(self, tp: Any) -> tuple[int | None, str]:
        return None, ""


def checkpoint(exactly_once: bool, producer: Producer | None = None) -> Checkpoint:
    return Checkpoint(
        Consumer(),  # type: ignore[arg-type]
        producer or Producer(),  # type: ignore[arg-type]
        exactly_once=exactly_once,
        interval_ms=0,
        owned=lambda: {(IN, 0)},
    )


def outputs(exactly_once: bool) -> tuple[Outputs, Checkpoint, Producer, WorkerStats]:
    producer, stats = Producer(), WorkerStats()
    cp = checkpoint(exactly_once, producer)
    out = Outputs(
        cp,
        Outcomes(StatsSensor(stats, lambda: 0), held=False),
        lambda: 1_000,
        topic="out",
        dlq_topic="dlq",
        done_on_ack=not exactly_once,
    )
    return out, cp, producer, stats


def src(offset: int) -> SourceRef:
    return SourceRef(IN, 0, offset, 0)


# ------------------------------------------------------------------ outputs


def test_at_least_once_a_source_is_done_when_its_output_is_acknowledged() -> None:
    out, cp, producer, stats = outputs(exactly_once=False)
    cp.track(src(0))
    out.prediction(b"ev", b"{}", (src(0),), last_part_ms=400)
    assert (out.records, out.settle(), cp.open_records()) == (1, None, 1)
    producer.sent[0][1]()  # the ack, on the client's thread
    assert out.records == 0 and out.settle() is None
    assert cp.open_records() == 0 and stats.predicted == 1


def test_exactly_once_a_source_is_done_when_sent_and_the_transaction_is_opened() -> None:
    out, cp, producer, _ = outputs(exactly_once=True)
    cp.track(src(0))
    out.dead_letter(RawRecord(src(0), b"ev", b"x", ()), Reason.DECODE_ERROR, "bad")
    assert producer.began == 1 and producer.sent[0][0].topic == "dlq"
    assert out.settle() is None and cp.open_records() == 0  # done before any ack


def test_a_failed_send_is_returned_and_a_refusal_raises() -> None:
    out, _, producer, _ = outputs(exactly_once=False)
    out.prediction(b"a", b"{}", (src(0),), last_part_ms=0)
    out.prediction(b"b", b"{}", (src(1),), last_part_ms=0)
    producer.sent[0][2](BrokerError("timed out", retriable=True))
    assert isinstance(out.settle(), BrokerError) and out.records == 1
    producer.sent[1][2](BrokerError("not authorized", retriable=False))
    with pytest.raises(BrokerError, match="refused by the broker: not authorized"):
        out.settle()


def test_after_a_restart_late_results_of_the_aborted_sends_are_ignored() -> None:
    out, cp, producer, stats = outputs(exactly_once=False)
    cp.track(src(0))
    out.prediction(b"ev", b"{}", (src(0),), last_part_ms=0)
    out.restart()
    producer.sent[0][1]()  # a late ack of an aborted send
    producer.sent[0][2](BrokerError("late"))
    assert out.records == 0 and out.settle() is None
    assert cp.open_records() == 1 and stats.predicted == 0


# ------------------------------------------------------------------ liveness


def test_liveness_raises_in_the_loop_what_it_reports_to_the_probe() -> None:
    now = [0]
    live = Liveness(30, "g", lambda: now[0])
    live.check(lambda: True, lambda: False)  # work waits from 0 s
    now[0] = 29_000
    live.check(lambda: True, lambda: False)
    assert live.health() == (True, "ok")
    now[0] = 31_000
    assert live.health() == (False, "no commit or transaction completed in 31 s while work waited")
    with pytest.raises(BrokerError, match=r"in 31 s .*--progress-timeout-s 30") as caught:
        live.check(lambda: True, lambda: False)
    assert caught.value.retriable
    live.progressed()
    now[0] = 32_000
    live.check(lambda: False, lambda: True)  # caught up, but out of the group from now
    now[0] = 63_000
    assert live.out_of_group_s() == 31.0
    assert live.health() == (False, "out of consumer group 'g' for 31 s")


# ------------------------------------------------------------------ the incomplete policy


def incomplete(ts: int = 100) -> Incomplete:
    part = Part("ev", "image", {}, SourceRef(IN, 0, 3, ts))
    return Incomplete("ev", 0, {"image": part}, (), 0, ts, ("text",))


def policy(action: str, events: Any = None, accepts_missing: bool = True) -> IncompletePolicy:
    return IncompletePolicy(
        action, events or Everything(), timeout_ms=500, max_events=10, max_bytes=99,
        accepts_missing=accepts_missing,
    )  # fmt: skip


def test_the_incomplete_policy_decides_by_window_action_and_cause() -> None:
    inc = incomplete()
    assert policy("dlq", TimeWindow(200, 300)).decide(inc, evicted=False).action == OUTSIDE_WINDOW
    assert policy("drop").decide(inc, evicted=True).action == "drop"
    assert policy("infer").decide(inc, evicted=False).action == "infer"
    timed_out = policy("dlq").decide(inc, evicted=False)
    assert timed_out.reason is Reason.INCOMPLETE_EVENT and "+ 500 ms" in timed_out.detail
    evicted = policy("dlq").decide(inc, evicted=True)
    assert evicted.reason is Reason.EVICTED_AT_BOUND
    assert "--max-pending-events 10, --max-pending-bytes 99" in evicted.detail


def test_infer_is_refused_for_a_model_that_does_not_accept_missing_inputs() -> None:
    with pytest.raises(ConfigError, match="accepts_missing"):
        policy("infer", accepts_missing=False)


# ------------------------------------------------------------------ dispatch


def test_dispatch_holds_a_batch_while_outputs_in_flight_fill_the_bound() -> None:
    out, cp, producer, _ = outputs(exactly_once=False)
    ran: list[int] = []
    stage: BatchStage[Event] = BatchStage(lambda events: ran.append(len(events)), 0, "t")
    batcher = Batcher(2, 10_000)
    dispatch = Dispatch(
        batcher, StageRoom(stage), stage, out, cp, max_events=3, max_bytes=10**6,
        clock=lambda: 0,
    )  # fmt: skip
    for i in range(2):
        batcher.add(Event(f"e{i}", 0, {}, 0, 0), 0)
    out.prediction(b"x", b"{}", (src(0),), 0)
    out.prediction(b"y", b"{}", (src(1),), 0)  # 2 in flight + a batch of 2 > 3
    assert not dispatch.may_submit(2)
    dispatch.submit_ready()
    assert ran == [] and len(batcher) == 2
    producer.sent[0][1]()  # one acknowledged: 1 + 2 fits
    dispatch.submit_ready()
    assert ran == [2] and len(batcher) == 0


# ------------------------------------------------------------------ sensors


def test_the_fan_out_calls_only_the_sensors_that_observe_a_call() -> None:
    calls: list[str] = []

    class Beats(Sensor):
        def beat(self, now_s: float) -> None:
            calls.append(f"beat {now_s}")

    class Commits(Sensor):
        def beat(self, now_s: float) -> None:
            calls.append("commits beat")

        def commit(self, ok: bool) -> None:
            calls.append(f"commit {ok}")

    both = Sensors([Beats(), Sensor(), Commits()])
    both.beat(1.0)
    both.commit(True)
    both.rebalance()  # nobody observes it
    assert calls == ["beat 1.0", "commits beat", "commit True"]


def test_every_call_of_the_interface_fans_out() -> None:
    seen: list[str] = []

    class All(Sensor):
        pass

    for name in CALLS:
        setattr(All, name, lambda self, *args, _name=name: seen.append(_name))
    fan = Sensors([All()])
    for name in CALLS:
        arity = len(inspect.signature(getattr(Sensor, name)).parameters) - 1
        getattr(fan, name)(*[None] * arity)
    assert seen == list(CALLS) and len(CALLS) == 15


# ------------------------------------------------------------------ the guarantees


def wired(guarantee: str) -> tuple[Any, Any, Any]:
    from test_loop import config, runner

    from worker.core.pipeline import Worker

    from fake_kafka import FakeBroker, FakeClients

    broker = FakeBroker()
    for topic, n in (("in", 1), ("out", 1), ("in.dlq", 1)):
        broker.create(topic, n)
    clients = FakeClients(broker)
    worker = Worker(config(guarantee=guarantee), runner(), broker.clock, clients=clients)
    worker.source.join()
    return worker, broker, clients


def test_at_least_once_stops_at_a_send_the_broker_did_not_acknowledge() -> None:
    worker, broker, _ = wired("at-least-once")
    broker.fail_next_send = BrokerError("timed out", retriable=True)
    worker.outputs.prediction(b"ev", b"{}", (src(0),), 0)
    with pytest.raises(BrokerError, match="not acknowledged by the broker: timed out"):
        worker.guarantee.settle()


def test_exactly_once_aborts_and_rewinds_at_a_failed_send() -> None:
    worker, broker, _ = wired("exactly-once")
    worker.guarantee.start()
    before = worker.outputs.interval
    broker.fail_next_send = BrokerError("timed out", retriable=True)
    worker.outputs.prediction(b"ev", b"{}", (src(0),), 0)  # opens the transaction
    worker.guarantee.settle()
    assert broker.transactions == ["aborted"] and worker.stats.aborts == 1
    assert worker.outputs.interval is not before and not worker.checkpoint.in_transaction


def test_exactly_once_replaces_a_producer_that_can_neither_commit_nor_abort() -> None:
    worker, broker, clients = wired("exactly-once")
    worker.guarantee.start()
    worker.outputs.prediction(b"ev", b"{}", (src(0),), 0)
    stuck = clients.producers[0]
    stuck.wedged = True
    worker.guarantee.commit(broker.clock())  # cannot commit: abort, which cannot either
    assert stuck.closed and len(clients.producers) == 2
    assert worker.checkpoint.producer is clients.producers[1]
    assert not worker.checkpoint.in_transaction and worker.stats.aborts == 1


def test_a_nested_fan_out_still_reaches_its_sensors() -> None:
    seen: list[float] = []

    class Beats(Sensor):
        def beat(self, now_s: float) -> None:
            seen.append(now_s)

    Sensors([Sensor(), Sensors([Beats()])]).beat(2.0)
    assert seen == [2.0]


def test_an_impossible_incomplete_policy_is_refused_before_any_client_is_made() -> None:
    from test_loop import config, runner

    from worker.core.pipeline import Worker

    from fake_kafka import FakeBroker, FakeClients

    clients = FakeClients(FakeBroker())
    with pytest.raises(ConfigError, match="accepts_missing"):
        Worker(config(on_incomplete="infer"), runner(), clients=clients)
    assert clients.consumers == [] and clients.producers == []
