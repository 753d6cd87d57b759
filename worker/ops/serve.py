"""Serving one worker process: load the model, serve probes and metrics, run the loop.

``run_worker`` is what ``mmstream worker`` (and each ``--processes`` child) runs.
A single worker starts its probe server (``--http-port``: ``/metrics``, ``/healthz``,
``/readyz``) before the model loads, so a pod is live while it loads and ready only
once its consumer joined the group. A ``--processes`` child serves no port
(``http_port`` 0): it reports each loop turn and its readiness to the launcher through
``report``, and the launcher serves the pod's one port (worker/ops/processes.py).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from worker.config import WorkerConfig
from worker.core.pipeline import Worker, WorkerStats
from worker.edge.choice import clients_for
from worker.inference.model import ModelRunner
from worker.ops.metrics import MetricsSensor, WorkerMetrics

Report = Callable[[float, bool], None]
"""``report(beat_unix_s, ready)``: called on every turn of the poll loop."""


def run_worker(
    config: WorkerConfig,
    stop: threading.Event | None = None,
    on_ready: Callable[[Worker], Any] | None = None,
    *,
    report: Report | None = None,
) -> WorkerStats:
    """Load the model, connect, serve probes (``--http-port``), and run until stopped."""
    from worker.ops.http import ProbeServer, loop_health

    holder: dict[str, Worker] = {}
    on_beat: Callable[[float], None] | None = None
    if report is not None:
        sink = report

        def on_beat(now_s: float) -> None:
            worker = holder.get("worker")
            sink(now_s, worker is not None and worker.ready.is_set())

    metrics = WorkerMetrics(on_beat=on_beat)
    server: ProbeServer | None = None
    if config.http_port:
        server = ProbeServer(
            config.http_host,
            config.http_port,
            metrics,
            healthy=_all(
                loop_health(metrics, max_stall_s=config.stall_timeout_s),
                lambda: _progress(holder.get("worker")),
            ),
            ready=lambda: _readiness(holder.get("worker")),
        )
        server.start()
    try:
        runner = ModelRunner.load(
            config.model,
            config.device,
            config.intra_op_threads,
            max_batch_size=config.max_batch_size,
        )
        metrics.set_provider(runner.info.provider)
        worker = holder["worker"] = Worker(
            config,
            runner,
            clients=clients_for(config.kafka_client),
            sensors=[MetricsSensor(metrics)],
        )
        if on_ready is not None:
            on_ready(worker)
        return worker.run(stop or threading.Event())
    finally:
        if server is not None:
            server.stop()


def _all(*probes: Callable[[], tuple[bool, str]]) -> Callable[[], tuple[bool, str]]:
    def check() -> tuple[bool, str]:
        results = [probe() for probe in probes]
        return next((r for r in results if not r[0]), results[0])

    return check


def _progress(worker: Worker | None) -> tuple[bool, str]:
    """Unhealthy when the loop would stop for want of progress (it then does, too)."""
    return (True, "starting") if worker is None else worker.liveness.health()


def _readiness(worker: Worker | None) -> tuple[bool, str]:
    from worker.ops.http import JOINING, LOADING

    if worker is None:
        return False, LOADING
    if not worker.ready.is_set():
        return False, JOINING
    return True, f"ready on {worker.stats.provider}"
