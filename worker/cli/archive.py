"""``mmstream archive``: a topic's time or offset range to a JSON Lines archive
(flags: :class:`worker.backfill.archive.ArchiveConfig`)."""

from __future__ import annotations

import argparse
import json

from worker.backfill.archive import ArchiveConfig, add_archive_args
from worker.cli.common import Command
from worker.config import config_from_args


def run(args: argparse.Namespace) -> int:
    """Prints a one-line JSON summary."""
    from worker.backfill.archive import run_archive

    summary = run_archive(config_from_args(ArchiveConfig, args))
    print(json.dumps(summary, separators=(", ", ": ")))
    return 0


COMMAND = Command(
    "archive",
    "write a topic's time or offset range to a JSON Lines archive (restore: replay --source-file)",
    add_archive_args,
    run,
)
