"""The inference stage: order, depth, idle waits and error hand-off (no broker, no ORT)."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import pytest

from worker.contract.errors import ConfigError, InferenceError
from worker.core.stage import BatchStage


class Recorder:
    """A handler that records batches and can be held back or made to fail."""

    def __init__(self) -> None:
        self.seen: list[list[int]] = []
        self.threads: set[str] = set()
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()
        self.fail_on: int | None = None

    def __call__(self, batch: Sequence[int]) -> None:
        self.started.set()
        self.threads.add(threading.current_thread().name)
        if not self.gate.wait(10):
            raise TimeoutError("gate never opened")
        if self.fail_on is not None and self.fail_on in batch:
            raise InferenceError(f"poison {self.fail_on}")
        self.seen.append(list(batch))


def test_batches_run_in_order_on_the_stage_thread() -> None:
    rec = Recorder()
    stage: BatchStage[int] = BatchStage(rec, depth=3, name="test-infer")
    try:
        for i in range(20):
            while not stage.has_room():
                stage.wait_idle(0.01)
            stage.submit([2 * i, 2 * i + 1])
        assert stage.wait_idle(10)
        assert rec.seen == [[2 * i, 2 * i + 1] for i in range(20)]
        assert rec.threads == {"test-infer"}
        assert stage.pending_items == 0
    finally:
        stage.close()


def test_depth_bounds_queued_and_running_batches() -> None:
    rec = Recorder()
    rec.gate.clear()
    stage: BatchStage[int] = BatchStage(rec, depth=2, name="test-infer")
    try:
        stage.submit([1, 2, 3])
        assert rec.started.wait(5)  # the first batch is running, held at the gate
        assert stage.has_room()
        stage.submit([4])
        assert not stage.has_room()  # one running + one queued = depth
        assert stage.pending_items == 4
        assert not stage.wait_idle(0.05)
        rec.gate.set()
        assert stage.wait_idle(10)
        assert stage.has_room()
        assert rec.seen == [[1, 2, 3], [4]]
    finally:
        rec.gate.set()
        stage.close()


def test_handler_error_is_raised_on_the_callers_thread_and_later_batches_are_not_run() -> None:
    rec = Recorder()
    rec.fail_on = 3
    rec.gate.clear()
    stage: BatchStage[int] = BatchStage(rec, depth=4, name="test-infer")
    try:
        stage.submit([1, 2])
        stage.submit([3])
        stage.submit([4])
        rec.gate.set()
        assert stage.wait_idle(10)
        with pytest.raises(InferenceError, match="poison 3"):
            stage.check()
        with pytest.raises(InferenceError, match="poison 3"):
            stage.submit([5])
        stage.close()
        assert rec.seen == [[1, 2]]  # [4] was dropped unrun, [5] never accepted
    finally:
        rec.gate.set()
        stage.close()


def test_depth_zero_runs_inline() -> None:
    rec = Recorder()
    stage: BatchStage[int] = BatchStage(rec, depth=0, name="unused")
    stage.submit([7, 8])
    assert rec.seen == [[7, 8]]
    assert rec.threads == {threading.current_thread().name}
    assert stage.has_room() and stage.wait_idle(0)
    rec.fail_on = 9
    with pytest.raises(InferenceError):
        stage.submit([9])
    stage.close()


def test_negative_depth_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="depth"):
        BatchStage(Recorder(), depth=-1, name="x")


def test_close_can_discard_queued_batches() -> None:
    rec = Recorder()
    rec.gate.clear()
    stage: BatchStage[int] = BatchStage(rec, depth=3, name="test-infer")
    stage.submit([1])
    assert rec.started.wait(5)
    stage.submit([2, 3])
    stage.submit([4])
    # The running batch is held at the gate while close() drops the queued ones.
    threading.Timer(0.2, rec.gate.set).start()
    stage.close(discard=True)
    assert rec.seen == [[1]]  # [2, 3] and [4] were dropped unrun
    assert stage.pending_items == 0
