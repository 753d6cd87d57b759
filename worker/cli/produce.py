"""``mmstream produce``: sample / load traffic for the input topic
(flags: :class:`worker.tools.produce.ProduceConfig`)."""

from __future__ import annotations

import argparse
import json

from worker.cli.common import Command
from worker.config import add_config_args, config_from_args
from worker.tools.produce import ProduceConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_args(p, ProduceConfig)


def run(args: argparse.Namespace) -> int:
    from worker.tools.produce import produce

    print(json.dumps(produce(config_from_args(ProduceConfig, args))))
    return 0


COMMAND = Command(
    "produce",
    "produce events (reference, random or from files) to the input topic",
    add_arguments,
    run,
)
