"""``--processes N``: N worker processes in one consumer group, from one command.

One Python interpreter tops out long before a GPU or many cores do (decode,
kafka-python and publishing are per-record Python work), and Kafka's consumer
group already spreads partitions over members: so scaling within a machine is
N independent worker processes. Each child gets its own ``client_id``,
``group_instance_id`` and ``transactional_id`` (suffix ``-<i>``) and, with
``--http-port P``, serves its probes on ``P + i``. The parent forwards
SIGTERM/SIGINT to every child, waits, and exits 0 only if every child did.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import signal
from types import FrameType

from worker.config import WorkerConfig

log = logging.getLogger(__name__)


def child_config(config: WorkerConfig, index: int) -> WorkerConfig:
    """The settings of child ``index``: same group, its own identities and port."""

    def suffixed(value: str) -> str:
        return f"{value}-{index}" if value else value

    return dataclasses.replace(
        config,
        processes=1,
        client_id=suffixed(config.client_id),
        group_instance_id=suffixed(config.group_instance_id),
        transactional_id=suffixed(config.transactional_id),
        http_port=config.http_port + index if config.http_port else 0,
    )


def _child(config: WorkerConfig) -> None:
    import threading

    from worker.ops.serve import run_worker
    from worker.ops.logs import configure_logging

    configure_logging(config.log_level, config.log_format)
    stop = threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    run_worker(config, stop)


def run_processes(config: WorkerConfig) -> int:
    """Start ``config.processes`` workers, forward stop signals, return the exit code."""
    ctx = mp.get_context("spawn")  # no fork after kafka-python / ORT threads exist
    children = [
        ctx.Process(target=_child, args=(child_config(config, i),), name=f"mmstream-worker-{i}")
        for i in range(config.processes)
    ]

    def forward(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %d: stopping %d worker processes", signum, len(children))
        for child in children:
            if child.is_alive() and child.pid is not None:
                child.terminate()  # SIGTERM: each child drains, commits and exits 0

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for child in children:
        child.start()
    log.info("started %d worker processes: %s", len(children), [c.pid for c in children])
    for child in children:
        child.join()
    codes = [child.exitcode for child in children]
    if any(code != 0 for code in codes):
        log.error("worker processes exited with %s", codes)
        return 1
    return 0
