"""The ``mmstream`` command line (``main``)."""

from worker.cli.main import main

__all__ = ["main"]
