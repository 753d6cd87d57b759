"""``mmstream``: the one command line, with subcommands, one module each.

    mmstream train-reference   train the reference "digits seen, read and heard" model  [export]
    mmstream export            Keras model -> model.onnx + manifest.json, parity-checked [export]
    mmstream worker            the streaming worker                        (cli/worker.py)
    mmstream produce           sample / load traffic for the input topic    (cli/produce.py)
    mmstream archive           a topic range to a JSON Lines archive        (cli/archive.py)
    mmstream replay            re-score a topic range; restore an archive   (cli/replay.py)
    mmstream demo              produce, run the worker, print a summary     (cli/demo.py)
    mmstream bench             raw ORT, raw consume, worker end to end and under load

Each command's flags are built from the fields of its config dataclass
(:func:`worker.config.add_config_args`), and every flag can also come from an
``MMSTREAM_*`` variable (named in ``--help``). Errors print one line,
``mmstream: error: ...``, and exit 2 (bad input or config) or 1 (a runtime
failure such as an unreachable broker).

Building the parser imports no TensorFlow and no ONNX Runtime: the command
modules import those only when a command runs.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from worker import __version__
from worker.cli import archive, bench, demo, export, produce, replay
from worker.cli import worker as worker_command
from worker.cli.common import Command, Handler, Parser
from worker.config import bind_env, check_unknown_env, env_snapshot
from worker.contract.errors import (
    EXIT_INTERRUPTED,
    STORAGE_ERRNOS,
    MMStreamError,
    one_line,
    os_error,
)
from worker.ops.logs import configure_logging

log = logging.getLogger(__name__)

# The handlers, by name: build_parser reads these at call time (tests replace one).
_cmd_train_reference: Handler = export.TRAIN_REFERENCE.run
_cmd_export: Handler = export.EXPORT.run
_cmd_worker: Handler = worker_command.COMMAND.run
_cmd_produce: Handler = produce.COMMAND.run
_cmd_archive: Handler = archive.COMMAND.run
_cmd_replay: Handler = replay.COMMAND.run
_cmd_demo: Handler = demo.COMMAND.run
_cmd_bench: Handler = bench.COMMAND.run


def commands() -> list[tuple[Command, Handler]]:
    """Every subcommand, in ``--help`` order, with the handler it runs."""
    return [
        (export.TRAIN_REFERENCE, _cmd_train_reference),
        (export.EXPORT, _cmd_export),
        (worker_command.COMMAND, _cmd_worker),
        (produce.COMMAND, _cmd_produce),
        (archive.COMMAND, _cmd_archive),
        (replay.COMMAND, _cmd_replay),
        (demo.COMMAND, _cmd_demo),
        (bench.COMMAND, _cmd_bench),
    ]


def build_parser(environ: dict[str, str] | None = None) -> argparse.ArgumentParser:
    environ = env_snapshot() if environ is None else environ
    parser = Parser(
        prog="mmstream",
        description="Streaming multimodal inference: Kafka parts in, ONNX Runtime predictions out.",
        epilog="Every flag can also be set by the MMSTREAM_* variable named in its help.",
    )
    parser.add_argument("--version", action="version", version=f"mmstream {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    known: set[str] = set()
    for command, handler in commands():
        p = sub.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(p)
        p.set_defaults(handler=handler)
        known |= bind_env(p, environ)
    parser.set_defaults(known_env=known)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    configure_logging("INFO", "text")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        check_unknown_env(args.known_env, env_snapshot())
        del args.known_env
        handler: Handler = args.handler
        return handler(args)
    except MMStreamError as exc:  # the error says its exit code (worker.contract.errors)
        print(f"mmstream: error: {one_line(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # a full disk wherever a command writes: one line, exit 1
        if exc.errno not in STORAGE_ERRNOS:
            raise
        err = os_error(repr(exc.filename) if exc.filename else "file system", exc)
        print(f"mmstream: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
