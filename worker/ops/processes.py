"""``--processes N``: N worker processes in one consumer group, from one command, one port.

One Python interpreter tops out long before a GPU or many cores do (decode,
kafka-python and publishing are per-record Python work), and Kafka's consumer
group already spreads partitions over members: so scaling within a machine is
N independent worker processes, spawned by a launcher (this parent process). Each
child gets its own ``client_id``, ``group_instance_id`` and ``transactional_id``
(suffix ``-<i>``) and serves no HTTP port. The launcher serves the pod's one
``--http-port`` (the routes of worker/ops/http.py):

    /healthz   200 while every child is alive and its poll loop turned within
               --stall-timeout-s (the single-process rule, per child; a child that has
               not turned yet is "starting" for that long after it was started);
               else 503 naming each child that is not
    /readyz    200 once every child loaded its model and joined the group, else 503
    /metrics   all children's metrics, merged in prometheus_client's multiprocess mode
               (worker/ops/metrics.py: PROMETHEUS_MULTIPROC_DIR is a fresh directory
               the launcher makes for its children and removes at exit)

Children report to the launcher through shared memory: one ``RawArray`` of two
doubles per child (the unix time of its loop's last turn, and 1.0 once it is ready),
written by the child's poll loop on every turn. Only the launcher's main thread reaps
children and records their exits; the probe threads only read.

Lifecycle. SIGTERM/SIGINT to the launcher are forwarded to every child (each drains,
commits and exits 0); the launcher exits 0 if every child did. A child that exits
while no stop was asked (a crash, the OOM killer, SIGKILL) makes the launcher stop the
others the same way and exit non-zero (the failed child's exit code; 1 when a signal
killed it or it exited 0): the pod restarts as a whole (Kubernetes restarts the container; static
members get their partitions back within the session timeout) instead of running on
with fewer members and an idle share of partitions. While the others drain, /healthz
answers 503 naming the dead child. A child still running --shutdown-timeout-s + 15 s
after the stop is killed (exit 1). A child that is alive but stalled only turns
/healthz to 503, as for one process: the liveness probe restarts the container.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import logging
import multiprocessing as mp
import multiprocessing.connection
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.context import SpawnContext, SpawnProcess
from pathlib import Path
from types import FrameType
from typing import Any, cast

from worker.config import WorkerConfig
from worker.ops.http import JOINING, LOADING, ProbeServer, beat_health
from worker.ops.metrics import MULTIPROC_ENV, PoolMetrics

log = logging.getLogger(__name__)

#: After a stop, a child gets --shutdown-timeout-s plus this long before it is killed.
STOP_GRACE_S = 15.0
_FIELDS = 2  # per child in the shared array: last beat (unix s, 0 = none), ready (0/1)


def child_config(config: WorkerConfig, index: int) -> WorkerConfig:
    """The settings of child ``index``: same group, its own identities, no HTTP port."""

    def suffixed(value: str) -> str:
        return f"{value}-{index}" if value else value

    return dataclasses.replace(
        config,
        processes=1,
        client_id=suffixed(config.client_id),
        group_instance_id=suffixed(config.group_instance_id),
        transactional_id=suffixed(config.transactional_id),
        http_port=0,  # the launcher serves the pod's one port
    )


# ------------------------------------------------------------------ what the probes see


@dataclass(frozen=True)
class ChildView:
    """One child as the launcher's probes see it (a snapshot)."""

    index: int
    pid: int | None  # None: not started
    started_s: float | None  # unix time the launcher started it
    last_beat_s: float | None  # unix time of its loop's last turn; None: none yet
    ready: bool  # model loaded and group joined
    exitcode: int | None  # None: running (or not started)

    @property
    def name(self) -> str:
        pid = f" (pid {self.pid})" if self.pid is not None else ""
        return f"process {self.index}{pid}"


def describe_exit(code: int) -> str:
    """``exited with code 2`` / ``killed by SIGKILL``, as multiprocessing reports codes."""
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exited with code {code}"


def child_health(
    child: ChildView, now_s: float, max_stall_s: float, stopping: bool
) -> tuple[bool, str]:
    """The single-process liveness rule (worker.ops.http.beat_health) for one child, plus:
    a child that exited is unhealthy unless it exited 0 after a stop was asked."""
    if child.exitcode is not None:
        if stopping and child.exitcode == 0:
            return True, "stopped"
        return False, describe_exit(child.exitcode)
    if child.started_s is None:
        return True, "not started"
    return beat_health(child.last_beat_s, child.started_s, now_s, max_stall_s)


def pool_health(
    children: Sequence[ChildView], now_s: float, max_stall_s: float, stopping: bool = False
) -> tuple[bool, str]:
    """``/healthz`` of the launcher: healthy only if every child is."""
    problems = []
    for child in children:
        ok, reason = child_health(child, now_s, max_stall_s, stopping)
        if not ok:
            problems.append(f"{child.name}: {reason}")
    if problems:
        return False, "; ".join(problems)
    return True, f"ok ({len(children)} processes)"


def pool_readiness(children: Sequence[ChildView], stopping: bool = False) -> tuple[bool, str]:
    """``/readyz`` of the launcher: ready only if every child is (worker.ops.serve's rule)."""
    if stopping:
        return False, "stopping"
    problems = []
    for child in children:
        if child.exitcode is not None:
            problems.append(f"{child.name}: {describe_exit(child.exitcode)}")
        elif child.last_beat_s is None:
            problems.append(f"{child.name}: {LOADING}")
        elif not child.ready:
            problems.append(f"{child.name}: {JOINING}")
    if problems:
        return False, "; ".join(problems)
    return True, f"ready ({len(children)} processes)"


# ------------------------------------------------------------------ shared memory


class Board:
    """Per child: the unix time of its loop's last turn and whether it is ready, in shared
    memory (a lock-free ``RawArray``: each slot has one writer, its child, and a reader
    that needs no consistency between the two values)."""

    def __init__(self, ctx: SpawnContext, processes: int) -> None:
        self.processes = processes
        self.array: Any = ctx.RawArray(ctypes.c_double, processes * _FIELDS)

    def read(self, index: int) -> tuple[float | None, bool]:
        beat = float(self.array[index * _FIELDS])
        return (beat if beat > 0 else None), self.array[index * _FIELDS + 1] == 1.0


class ChildReport:
    """The child's side of its :class:`Board` slot: ``report(now_s, ready)`` per loop turn
    (worker.ops.serve.Report)."""

    def __init__(self, array: Any, index: int) -> None:
        self._array = array
        self._at = index * _FIELDS

    def __call__(self, now_s: float, ready: bool) -> None:
        self._array[self._at + 1] = 1.0 if ready else 0.0
        self._array[self._at] = now_s


def _watch_launcher(launcher_pid: int, stop: threading.Event, interval_s: float = 1.0) -> None:
    """Stop (drain and exit) once the launcher is gone: a child must not outlive it and
    consume on as an orphan nobody probes."""
    while not stop.wait(interval_s):
        if os.getppid() != launcher_pid:
            log.error("the launcher (pid %d) is gone: stopping", launcher_pid)
            stop.set()


def _child(config: WorkerConfig, array: Any, index: int, launcher_pid: int) -> None:
    import sys

    from worker.contract.errors import MMStreamError
    from worker.ops.logs import configure_logging
    from worker.ops.serve import run_worker

    configure_logging(config.log_level, config.log_format)
    stop = threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    threading.Thread(
        target=_watch_launcher,
        args=(launcher_pid, stop),
        name="mmstream-launcher-watch",
        daemon=True,
    ).start()
    try:
        run_worker(config, stop, report=ChildReport(array, index))
    except MMStreamError as exc:  # one line, the CLI's exit code (no traceback)
        log.error("worker process %d: %s", index, exc)
        sys.exit(exc.exit_code)


# ------------------------------------------------------------------ the launcher


class Pool:
    """The children of one launcher: starting, stopping, reaping, and the probes' view."""

    def __init__(
        self,
        config: WorkerConfig,
        ctx: SpawnContext,
        metrics: PoolMetrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.clock = clock
        self.board = Board(ctx, config.processes)
        self.procs: list[SpawnProcess] = [
            ctx.Process(
                target=_child,
                args=(child_config(config, i), self.board.array, i, os.getpid()),
                name=f"mmstream-worker-{i}",
            )
            for i in range(config.processes)
        ]
        self.started: list[float | None] = [None] * config.processes
        self.exits: dict[int, int] = {}  # index -> exit code; written by the main thread only
        self.stopping = False
        self.killed = False
        self.failure: int | None = None  # exit code of the first child that died unasked

    # -- probes (HTTP threads: read only)

    def views(self) -> list[ChildView]:
        out = []
        for i, proc in enumerate(self.procs):
            beat, ready = self.board.read(i)
            out.append(ChildView(i, proc.pid, self.started[i], beat, ready, self.exits.get(i)))
        return out

    def healthy(self) -> tuple[bool, str]:
        return pool_health(self.views(), self.clock(), self.config.stall_timeout_s, self.stopping)

    def ready(self) -> tuple[bool, str]:
        return pool_readiness(self.views(), self.stopping)

    # -- main thread

    def start(self) -> None:
        for i, proc in enumerate(self.procs):
            if self.stopping:  # a signal arrived while starting: start no more
                break
            self.started[i] = self.clock()
            proc.start()
            log.info("worker process %d: pid %s", i, proc.pid)
            if self.stopping:  # the stop came while it started: it was not signalled
                proc.terminate()
        log.info(
            "started %d worker processes: %s",
            sum(p.pid is not None for p in self.procs),
            [p.pid for p in self.procs if p.pid is not None],
        )

    def stop(self) -> None:
        """SIGTERM to every running child (each drains, commits and exits 0). Safe to call
        from a signal handler: it only sets a flag and sends signals."""
        self.stopping = True
        for i, proc in enumerate(self.procs):
            if proc.pid is not None and i not in self.exits:
                proc.terminate()

    def wait(self) -> int:
        """Reap every started child; the launcher's exit code."""
        pending = {p.sentinel: i for i, p in enumerate(self.procs) if p.pid is not None}
        deadline: float | None = None
        while pending:
            for sentinel in multiprocessing.connection.wait(list(pending), timeout=0.5):
                self._reaped(pending.pop(cast(int, sentinel)))
            if self.stopping and deadline is None:
                deadline = time.monotonic() + self.config.shutdown_timeout_s + STOP_GRACE_S
            if deadline is not None and time.monotonic() > deadline and not self.killed:
                self.killed = True
                for i in pending.values():
                    log.error("worker process %d did not stop in time: killing it", i)
                    self.procs[i].kill()
        if self.failure is not None:
            return self.failure
        if self.killed or any(code != 0 for code in self.exits.values()):
            log.error(
                "worker processes exited with %s",
                [self.exits.get(i) for i in range(len(self.procs))],
            )
            return 1
        return 0

    def _reaped(self, index: int) -> None:
        proc = self.procs[index]
        proc.join()
        code = proc.exitcode if proc.exitcode is not None else 1
        self.exits[index] = code
        if proc.pid is not None:
            self.metrics.process_dead(proc.pid)
        if not self.stopping:
            others = len(self.procs) - len(self.exits)
            log.error(
                "worker process %d (pid %s) %s unexpectedly: stopping the other %d, then exit",
                index, proc.pid, describe_exit(code), others,
            )  # fmt: skip
            self.failure = code if 0 < code <= 125 else 1
            self.stop()
        elif code != 0:
            log.error("worker process %d (pid %s) %s", index, proc.pid, describe_exit(code))
        else:
            log.info("worker process %d (pid %s) stopped", index, proc.pid)


@contextlib.contextmanager
def _environment(name: str, value: str) -> Iterator[None]:
    """``name=value`` in os.environ inside the block (spawned children inherit it)."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def run_processes(config: WorkerConfig) -> int:
    """Start ``config.processes`` workers, serve the pod's probes and metrics on
    ``--http-port``, forward stop signals; return the exit code."""
    ctx = mp.get_context("spawn")  # no fork after kafka-python / ORT threads exist
    metrics_dir = Path(tempfile.mkdtemp(prefix="mmstream-metrics-"))
    try:
        log.info("metrics of the worker processes in %s (removed at exit)", metrics_dir)
        pool = Pool(config, ctx, PoolMetrics(metrics_dir))
        server: ProbeServer | None = None
        if config.http_port:  # bound before any child starts: a taken port fails at once
            server = ProbeServer(
                config.http_host, config.http_port, pool.metrics, pool.healthy, pool.ready
            )
            server.start()

        def forward(signum: int, _frame: FrameType | None) -> None:
            log.info("signal %d: stopping %d worker processes", signum, len(pool.procs))
            pool.stop()

        previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            try:
                with _environment(MULTIPROC_ENV, str(metrics_dir)):
                    pool.start()
            except BaseException:
                pool.stop()
                pool.wait()
                raise
            return pool.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if server is not None:
                server.stop()
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
