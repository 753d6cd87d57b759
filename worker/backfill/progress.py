"""A replay's progress, observed as a sensor of the loop.

A bar on a terminal (tqdm: records read of the range, rate, ETA, predictions),
else a log line every 10 s. A resumed run counts the records before its
checkpoint as done (``done_before``, known once the source has joined).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import TextIO

from tqdm import tqdm

from worker.core.sensors import Sensor

log = logging.getLogger(__name__)

LOG_EVERY_S = 10.0


class Progress(Sensor):
    """Counts records read and predictions; shows them as ``mode`` says
    (``auto``: a bar on a terminal, log lines otherwise; ``bar``, ``log``, ``none``)."""

    def __init__(
        self,
        total_records: int,
        mode: str,
        parts_per_event: int = 1,
        stream: TextIO | None = None,
        done_before: Callable[[], int] = lambda: 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream or sys.stderr
        if mode == "auto":
            mode = "bar" if self.stream.isatty() else "log"
        self.mode = mode
        self.total = max(1, total_records)
        self.total_events = total_records // max(1, parts_per_event)
        self.done_before = done_before
        self.clock = clock
        self.records = 0
        self.events = 0
        self._start = clock()
        self._last_log = self._start
        self._bar: tqdm[None] | None = None
        if mode == "bar":
            self._bar = tqdm(
                total=self.total, unit="rec", file=self.stream, mininterval=0.5, leave=True
            )

    def consumed(self, modality: str) -> None:
        self.records += 1

    def predicted(self, latency_s: float | None) -> None:
        self.events += 1

    def beat(self, now_s: float) -> None:
        self.update()

    def update(self, final: bool = False) -> None:
        read = min(self.total, self.records + self.done_before())
        if self._bar is not None:
            if self._bar.n != read or final:
                self._bar.set_postfix_str(f"{self.events}/~{self.total_events} events", False)
                self._bar.update(read - self._bar.n)
            if final:
                self._bar.close()
            return
        now = self.clock()
        if self.mode != "log" or (not final and now - self._last_log < LOG_EVERY_S):
            return
        self._last_log = now
        elapsed = max(1e-3, now - self._start)
        frac = read / self.total
        eta = (elapsed / frac - elapsed) if frac > 0 else float("nan")
        log.info(
            "replay: %.1f%% of %d records, %d of ~%d events predicted, %.1f events/s, ETA %.0f s",
            100 * frac,
            self.total,
            self.events,
            self.total_events,
            self.events / elapsed,
            eta,
        )
