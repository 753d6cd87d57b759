"""``mmstream demo``: produce, run the worker, print a summary
(flags: :class:`worker.tools.demo.DemoConfig`)."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from worker.cli.common import Command
from worker.config import add_config_args, config_from_args
from worker.tools.demo import DemoConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_args(p, DemoConfig)


def run(args: argparse.Namespace) -> int:
    from worker.tools.demo import format_summary, run_demo

    config = config_from_args(DemoConfig, args)
    with tempfile.TemporaryDirectory(prefix="mmstream-demo-") as tmp:
        summary = run_demo(config, Path(tmp))
    print(format_summary(summary))
    return 0


COMMAND = Command("demo", "produce events, run the worker, print a summary", add_arguments, run)
