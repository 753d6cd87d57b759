"""``--processes N``: one port per pod (worker/ops/processes.py).

Unit tests (no broker): the launcher's probe rules over its children, the shared-memory
board, prometheus_client's multiprocess aggregation with real spawned processes, and the
launcher's exit code when its children fail. The integration test runs
``mmstream worker --processes 2`` against the real broker: /readyz, /metrics summed over
both children, a stalled child and a SIGKILLed one on /healthz, and the exit.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import re
import signal
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from worker.config import WorkerConfig
from worker.contract.errors import ConfigError
from worker.ops.http import JOINING, LOADING, ProbeServer
from worker.ops.metrics import MULTIPROC_ENV, PoolMetrics, WorkerMetrics, multiprocess_mode
from worker.ops.processes import (
    Board,
    ChildReport,
    ChildView,
    _environment,
    child_config,
    describe_exit,
    pool_health,
    pool_readiness,
    run_processes,
)

from resilience_tools import (
    EventFactory,
    PredictionReader,
    ProcessPool,
    WorkerProcess,
    free_port,
    http_get,
    interleave,
    scrape,
    send_records,
    summarize,
    wait_http,
    worker_argv,
)

WINDOW = 10.0


def config(**overrides: Any) -> WorkerConfig:
    values: dict[str, Any] = {
        "bootstrap_servers": "127.0.0.1:1",
        "input_topic": "in",
        "output_topic": "out",
        "group_id": "g",
        "model": "m",
        "processes": 2,
    }
    values.update(overrides)
    return WorkerConfig.from_mapping(values)


def view(index: int = 0, **changes: Any) -> ChildView:
    """A running child, started at t=1000, that beat at t=1005 and is ready."""
    base = ChildView(
        index=index, pid=100 + index, started_s=1000.0, last_beat_s=1005.0, ready=True,
        exitcode=None,
    )  # fmt: skip
    return dataclasses.replace(base, **changes)


# ------------------------------------------------------------------ child settings


def test_children_serve_no_port_and_get_their_own_ids() -> None:
    cfg = config(http_port=8080, group_instance_id="pod-a", client_id="c")
    for i in range(2):
        child = child_config(cfg, i)
        assert child.http_port == 0  # the launcher serves the pod's one port
        assert child.processes == 1
        assert (child.client_id, child.group_instance_id) == (f"c-{i}", f"pod-a-{i}")
        assert child.stall_timeout_s == cfg.stall_timeout_s


def test_stall_timeout_is_a_checked_setting() -> None:
    assert config().stall_timeout_s == 60.0
    assert config(stall_timeout_s=2.5).stall_timeout_s == 2.5
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ConfigError, match="--stall-timeout-s"):
            config(stall_timeout_s=bad)


# ------------------------------------------------------------------ the probe rules


def test_health_is_every_childs_loop_health() -> None:
    a, b = view(0), view(1)
    assert pool_health([a, b], 1006.0, WINDOW) == (True, "ok (2 processes)")
    # b's loop has not turned for 11 s > 10 s: the pod is unhealthy, b is named.
    ok, reason = pool_health([a, dataclasses.replace(b, last_beat_s=995.0)], 1006.0, WINDOW)
    assert not ok
    assert reason == "process 1 (pid 101): poll loop stalled for 11.0s (limit 10s)"
    # Exactly at the limit is still healthy (the single-process rule: > limit fails).
    assert pool_health([a, dataclasses.replace(b, last_beat_s=996.0)], 1006.0, WINDOW)[0]


def test_health_while_starting() -> None:
    fresh = view(0, last_beat_s=None, ready=False)
    assert pool_health([fresh], 1010.0, WINDOW) == (True, "ok (1 processes)")
    ok, reason = pool_health([fresh], 1010.5, WINDOW)
    assert not ok and "process 0 (pid 100): poll loop has not run in the 10s" in reason
    not_started = view(0, pid=None, started_s=None, last_beat_s=None, ready=False)
    assert pool_health([not_started], 5000.0, WINDOW)[0]


def test_a_dead_child_is_unhealthy_at_once() -> None:
    killed = view(1, exitcode=-signal.SIGKILL)
    ok, reason = pool_health([view(0), killed], 1005.0, WINDOW)
    assert not ok and reason == "process 1 (pid 101): killed by SIGKILL"
    # Even one that exited 0, unless a stop was asked.
    done = view(1, exitcode=0)
    assert not pool_health([view(0), done], 1005.0, WINDOW)[0]
    assert pool_health([view(0), done], 1005.0, WINDOW, stopping=True)[0]
    assert not pool_health([view(0), view(1, exitcode=1)], 1005.0, WINDOW, stopping=True)[0]
    # Several problems: all named, in child order.
    ok, reason = pool_health([view(0, last_beat_s=900.0), killed], 1005.0, WINDOW)
    assert not ok and reason.index("process 0") < reason.index("process 1")


def test_readiness_needs_every_child_ready() -> None:
    assert pool_readiness([view(0), view(1)]) == (True, "ready (2 processes)")
    loading = view(0, last_beat_s=None, ready=False)
    joining = view(1, ready=False)
    ok, reason = pool_readiness([loading, joining])
    assert not ok
    assert reason == f"process 0 (pid 100): {LOADING}; process 1 (pid 101): {JOINING}"
    ok, reason = pool_readiness([view(0), view(1, exitcode=2)])
    assert not ok and reason == "process 1 (pid 101): exited with code 2"
    assert pool_readiness([view(0), view(1)], stopping=True) == (False, "stopping")


def test_describe_exit() -> None:
    assert describe_exit(0) == "exited with code 0"
    assert describe_exit(2) == "exited with code 2"
    assert describe_exit(-9) == "killed by SIGKILL"
    assert describe_exit(-200) == "killed by signal 200"


def test_board_slots_are_independent() -> None:
    board = Board(mp.get_context("spawn"), 3)
    assert [board.read(i) for i in range(3)] == [(None, False)] * 3
    ChildReport(board.array, 1)(1234.5, False)
    ChildReport(board.array, 2)(1300.0, True)
    assert [board.read(i) for i in range(3)] == [(None, False), (1234.5, False), (1300.0, True)]


# ------------------------------------------------------------------ multiprocess metrics


def _metrics_child(
    array: Any, index: int, consumed: int, assigned: int, ready: Any, stop: Any
) -> None:
    """A stand-in worker process: WorkerMetrics in multiprocess mode, fed by hand."""
    metrics = WorkerMetrics(on_beat=lambda now: ChildReport(array, index)(now, True))
    assert multiprocess_mode()
    for _ in range(consumed):
        metrics.records_consumed.labels(modality="image").inc()
    metrics.predictions.inc(index + 1)
    metrics.batch_size.observe(4)
    metrics.assigned_partitions.set(assigned)
    metrics.pending_events.set(10)
    metrics.set_provider("CUDAExecutionProvider")
    metrics.set_provider("CPUExecutionProvider")  # replaces it, even in multiprocess mode
    metrics.beat(2000.0 + index)
    ready.set()
    stop.wait(60)


def test_metrics_of_the_processes_add_up(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    board = Board(ctx, 2)
    stops = [ctx.Event(), ctx.Event()]
    readies = [ctx.Event(), ctx.Event()]
    procs = [
        ctx.Process(
            target=_metrics_child, args=(board.array, i, 3 + i, 2 - i, readies[i], stops[i])
        )
        for i in range(2)
    ]
    with _environment(MULTIPROC_ENV, str(tmp_path)):  # as the launcher starts its children
        for p in procs:
            p.start()
    try:
        for ready in readies:
            assert ready.wait(60), "a metrics child did not start"
        pool = PoolMetrics(tmp_path)
        assert pool.value("mmstream_records_consumed_total", modality="image") == 3 + 4
        assert pool.value("mmstream_predictions_total") == 1 + 2
        assert pool.value("mmstream_events_completed_total") == 0  # created, never counted
        assert pool.value("mmstream_batch_size_count") == 2
        assert pool.value("mmstream_batch_size_bucket", le="4.0") == 2
        assert pool.value("mmstream_assigned_partitions") == 2 + 1  # livesum
        assert pool.value("mmstream_pending_events") == 20
        for i, p in enumerate(procs):  # liveall: one series per process
            assert pool.value("mmstream_loop_last_iteration_seconds", pid=str(p.pid)) == 2000 + i
        assert pool.value("mmstream_execution_provider", provider="CPUExecutionProvider") == 1
        assert pool.value("mmstream_execution_provider", provider="CUDAExecutionProvider") == 0
        assert board.read(0) == (2000.0, True) and board.read(1) == (2001.0, True)
        text = pool.render().decode()
        assert "# TYPE mmstream_predictions_total counter" in text
        # Process 1 exits: its live gauges go with it, its counters stay in the sums.
        stops[1].set()
        procs[1].join(30)
        assert procs[1].exitcode == 0
        assert procs[1].pid is not None
        pool.process_dead(procs[1].pid)
        assert pool.value("mmstream_assigned_partitions") == 2
        assert pool.value("mmstream_loop_last_iteration_seconds", pid=str(procs[1].pid)) is None
        assert pool.value("mmstream_predictions_total") == 3
    finally:
        for stop in stops:
            stop.set()
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
                p.join(10)


def test_pool_metrics_need_their_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        PoolMetrics(tmp_path / "nope")
    # An empty directory (no child started yet) is an empty exposition, served by the
    # same server and routes as one process's.
    with ProbeServer("127.0.0.1", 0, PoolMetrics(tmp_path), _ok, _ok) as srv:
        for path in ("/metrics", "/healthz", "/readyz"):
            assert http_get(srv.bound_port, path)[0] == 200, path


def _ok() -> tuple[bool, str]:
    return True, "ok"


# ------------------------------------------------------------------ the launcher, no broker


def _metrics_dir(caplog: pytest.LogCaptureFixture) -> Path:
    """The directory the launcher says it made for its children's metrics."""
    found = [
        r.args[0]
        for r in caplog.records
        if r.name == "worker.ops.processes" and r.msg.startswith("metrics of the worker")
        and isinstance(r.args, tuple)
    ]  # fmt: skip
    assert len(found) == 1, found
    return Path(str(found[0]))


def test_launcher_exits_with_the_failing_childs_code(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Both children fail to load the model (exit 2, a config error): the launcher exits 2,
    removes its metrics directory, closes its port and leaves the environment as it was."""
    port = free_port()
    with caplog.at_level("INFO", logger="worker.ops.processes"):
        code = run_processes(config(model=str(tmp_path / "no-model"), http_port=port))
    assert code == 2
    assert not _metrics_dir(caplog).exists()
    assert MULTIPROC_ENV not in os.environ
    assert any("unexpectedly: stopping the other" in r.getMessage() for r in caplog.records)
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), 2):
        pass


def test_launcher_refuses_a_taken_port_before_starting_children(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with (
            caplog.at_level("INFO", logger="worker.ops.processes"),
            pytest.raises(ConfigError, match="cannot listen"),
        ):
            run_processes(config(model=str(tmp_path), http_port=port, http_host="127.0.0.1"))
    assert not _metrics_dir(caplog).exists()
    assert not any("started" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------ with a broker

STARTED_RE = re.compile(r"started 2 worker processes: \[(\d+), (\d+)\]")
METRICS_DIR_RE = re.compile(r"metrics of the worker processes in (\S+) ")


def wait_body(
    port: int, path: str, want: Callable[[int | None, str], bool], timeout_s: float,
    proc: WorkerProcess,
) -> str:  # fmt: skip
    """Poll ``path`` until ``want(status, body)``; the last body."""
    deadline = time.monotonic() + timeout_s
    status, body = None, ""
    while time.monotonic() < deadline:
        status, body = http_get(port, path)
        if want(status, body):
            return body
        time.sleep(0.1)
    raise AssertionError(f"{path}: last {status} {body!r} after {timeout_s} s\n{proc.tail()}")


def _start_time(pid: int) -> str | None:
    """The process's start time (/proc/<pid>/stat field 22): tells a pid's reuse apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[ProcessPool]:
    pool = ProcessPool(tmp_path)
    try:
        yield pool
    finally:
        pool.close()


@pytest.mark.integration
@pytest.mark.slow
def test_one_port_serves_both_processes(
    kafka_bootstrap: str,
    topic_factory: Callable[..., str],
    tiny_model_dir: Path,
    procs: ProcessPool,
) -> None:
    topics = (topic_factory(3), topic_factory(1), topic_factory(1))
    port = free_port()
    n = 60
    ids = [f"one-port-{i:04d}" for i in range(n)]
    w = procs.start(
        "launcher",
        worker_argv(
            kafka_bootstrap, topics, f"g-{uuid.uuid4().hex}", tiny_model_dir,
            "--processes", "2",
            "--http-port", str(port),
            "--http-host", "127.0.0.1",
            "--stall-timeout-s", "3",
            "--session-timeout-ms", "6000",
        ),
    )  # fmt: skip
    children: list[int] = []
    start_times: list[str | None] = []
    try:
        assert w.wait_for_log(STARTED_RE, 60), w.tail()
        match = STARTED_RE.search(w.log())
        assert match is not None
        children = [int(match.group(1)), int(match.group(2))]
        start_times = [_start_time(pid) for pid in children]
        dir_match = METRICS_DIR_RE.search(w.log())
        assert dir_match is not None
        metrics_dir = Path(dir_match.group(1))
        assert metrics_dir.is_dir()
        # /readyz turns 200 once both children loaded the model and joined the group.
        wait_http(port, "/readyz", 200, 120, w)
        assert http_get(port, "/healthz") == (200, "ok\n")

        factory = EventFactory(tiny_model_dir)
        records = [r for chunk in interleave(factory.events(ids), 8, 3) for r in chunk]
        send_records(kafka_bootstrap, topics[0], records)
        reader = PredictionReader(kafka_bootstrap, topics[1])
        try:
            assert reader.wait_all(ids, 90), f"not every event predicted\n{w.tail()}"
            missing, duplicates, unexpected = summarize(reader.counts(), ids)
        finally:
            reader.close()
        assert not missing and not unexpected and not duplicates

        # The one /metrics adds both children up (counters settle at the acknowledgement,
        # which the output topic may show first: poll until they reach the totals).
        def totals() -> tuple[float, float]:
            m = scrape(port)
            assert m is not None, "GET /metrics failed"
            return m.get("mmstream_records_consumed_total"), m.get("mmstream_predictions_total")

        deadline = time.monotonic() + 30
        while totals() != (3 * n, n) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert totals() == (3 * n, n)
        m = scrape(port)
        assert m is not None
        assert m.get("mmstream_assigned_partitions") == 3  # livesum over the two members
        beats = {lab["pid"] for name, lab, _ in m.samples
                 if name == "mmstream_loop_last_iteration_seconds"}  # fmt: skip
        assert beats == {str(p) for p in children}
        assert m.get("mmstream_execution_provider", provider="CPUExecutionProvider") == 1

        # A stalled child (SIGSTOP: alive, its loop frozen) fails /healthz within 3 s.
        os.kill(children[1], signal.SIGSTOP)
        body = wait_body(port, "/healthz", lambda s, _: s == 503, 30, w)
        assert f"process 1 (pid {children[1]}): poll loop stalled" in body
        assert w.alive()  # a stall alone is the liveness probe's business

        # A SIGKILLed child: 503 naming it. (Child 1, still stopped, cannot finish its
        # drain, so the launcher is still there to answer.)
        os.kill(children[0], signal.SIGKILL)
        body = wait_body(port, "/healthz", lambda s, b: "SIGKILL" in b, 30, w)
        assert f"process 0 (pid {children[0]}): killed by SIGKILL" in body
        assert http_get(port, "/readyz") == (503, "stopping\n")
        # The launcher stops the other child and exits 1.
        os.kill(children[1], signal.SIGCONT)
        rc = w.wait(90)
        assert rc == 1, f"launcher exit {rc}\n{w.tail()}"
        assert f"worker process 0 (pid {children[0]}) killed by SIGKILL unexpectedly" in w.log()
        assert not metrics_dir.exists()
        for pid in children:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    finally:
        for pid, started in zip(children, start_times, strict=True):
            if _start_time(pid) == started:  # still that child, not a reused pid
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGKILL)
