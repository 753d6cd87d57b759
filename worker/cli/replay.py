"""``mmstream replay``: re-score a topic's range (backfill), or restore an archive
(flags: :class:`worker.backfill.replay.ReplayConfig`)."""

from __future__ import annotations

import argparse
import json
import sys

from worker.backfill.replay import ReplayConfig
from worker.cli.common import Command, stop_on_signals
from worker.config import add_config_args, config_from_args
from worker.ops.logs import configure_logging


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_args(p, ReplayConfig)


def run(args: argparse.Namespace) -> int:
    from worker.backfill.replay import run_replay

    config = config_from_args(ReplayConfig, args)
    configure_logging(config.log_level, config.log_format)
    stop = stop_on_signals("stopping the replay at a checkpoint")
    summary = run_replay(config, stop)
    print(json.dumps(summary, sort_keys=True))
    if stop.is_set():
        print(
            "mmstream: replay stopped before the end; run the same command to continue",
            file=sys.stderr,
        )
        return 1
    return 0


COMMAND = Command(
    "replay",
    "re-score a topic's time or offset range (backfill), resumable; or restore an archive",
    add_arguments,
    run,
)
