"""``mmstream archive``: a topic's time or offset range to a JSON Lines archive
(flags: :class:`worker.backfill.archive_copy.ArchiveConfig`)."""

from __future__ import annotations

import argparse
import json

from worker.backfill import archive_copy
from worker.cli.common import Command
from worker.config import add_config_args, config_from_args


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_args(p, archive_copy.ArchiveConfig)


def run(args: argparse.Namespace) -> int:
    """Prints a one-line JSON summary."""
    # Looked up at call time, so a test can replace run_archive on its module.
    summary = archive_copy.run_archive(config_from_args(archive_copy.ArchiveConfig, args))
    print(json.dumps(summary, separators=(", ", ": ")))
    return 0


COMMAND = Command(
    "archive",
    "write a topic's time or offset range to a JSON Lines archive (restore: replay --source-file)",
    add_arguments,
    run,
)
