"""``mmstream bench``: raw ORT, raw consume, the worker end to end and under load
(flags: :class:`worker.tools.bench.config.BenchConfig`)."""

from __future__ import annotations

import argparse

from worker.cli.common import Command
from worker.config import add_config_args, config_from_args
from worker.tools.bench.config import BenchConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_args(p, BenchConfig)


def run(args: argparse.Namespace) -> int:
    from worker.tools.bench.report import format_summary
    from worker.tools.bench.run import run_bench

    print(format_summary(run_bench(config_from_args(BenchConfig, args))))
    return 0


COMMAND = Command(
    "bench",
    "benchmark: raw ORT, raw consume, the worker end to end and under load",
    add_arguments,
    run,
)
