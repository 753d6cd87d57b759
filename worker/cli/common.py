"""What every ``mmstream`` subcommand module shares: the :class:`Command` it exports,
argparse's one-line usage errors, and stopping on SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import NoReturn

log = logging.getLogger(__name__)

Handler = Callable[[argparse.Namespace], int]
AddArguments = Callable[[argparse.ArgumentParser], None]


@dataclass(frozen=True)
class Command:
    """One subcommand: its name, one-line help, how it adds its flags (from its config
    dataclass, :func:`worker.config.add_config_args`) and its handler."""

    name: str
    help: str
    add_arguments: AddArguments
    run: Handler


class Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (``--help`` shows the usage)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def stop_on_signals(what: str) -> threading.Event:
    """An event SIGTERM and SIGINT set (logged with ``what``): the loop drains and stops."""
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %d: %s", signum, what)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return stop
