"""Serving one worker process: load the model, serve probes and metrics, run the loop.

``run_worker`` is what ``mmstream worker`` (and each ``--processes`` child) runs:
it starts the probe server (``--http-port``: ``/metrics``, ``/healthz``,
``/readyz``) before the model loads, so a pod is live while it loads and ready
only once its consumer joined the group.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from worker.config import WorkerConfig
from worker.core.pipeline import Worker, WorkerStats
from worker.inference.model import ModelRunner
from worker.ops.metrics import WorkerMetrics


def run_worker(
    config: WorkerConfig,
    stop: threading.Event | None = None,
    on_ready: Callable[[Worker], Any] | None = None,
) -> WorkerStats:
    """Load the model, connect, serve probes (``--http-port``), and run until stopped."""
    from worker.ops.http import ProbeServer, loop_health

    metrics = WorkerMetrics()
    server: ProbeServer | None = None
    holder: dict[str, Worker] = {}
    if config.http_port:
        server = ProbeServer(
            config.http_host,
            config.http_port,
            metrics,
            healthy=loop_health(metrics, max_stall_s=60.0),
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
        worker = holder["worker"] = Worker(config, runner, metrics=metrics)
        if on_ready is not None:
            on_ready(worker)
        return worker.run(stop or threading.Event())
    finally:
        if server is not None:
            server.stop()


def _readiness(worker: Worker | None) -> tuple[bool, str]:
    if worker is None:
        return False, "loading the model"
    if not worker.ready.is_set():
        return False, "joining the consumer group"
    return True, f"ready on {worker.stats.provider}"
