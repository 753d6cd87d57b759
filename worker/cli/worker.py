"""``mmstream worker``: the streaming worker (flags: :class:`worker.config.WorkerConfig`)."""

from __future__ import annotations

import argparse
import json

from worker.cli.common import Command, stop_on_signals
from worker.config import WorkerConfig, add_config_args, config_from_args
from worker.ops.logs import configure_logging


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_args(p, WorkerConfig)


def run(args: argparse.Namespace) -> int:
    from worker.ops.serve import run_worker  # loads the model runner (ORT on first use)

    config = config_from_args(WorkerConfig, args)
    configure_logging(config.log_level, config.log_format)
    if config.processes > 1:
        from worker.ops.processes import run_processes

        return run_processes(config)
    stop = stop_on_signals("stopping (draining in-flight work)")
    stats = run_worker(config, stop)
    print(
        json.dumps(
            {
                "predicted": stats.predicted,
                "dead_lettered": stats.dead_lettered,
                "consumed": stats.consumed,
                "provider": stats.provider,
            }
        )
    )
    return 0


COMMAND = Command("worker", "run the streaming worker", add_arguments, run)
