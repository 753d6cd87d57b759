"""The event filter: which events are this run's to predict.

The live worker predicts every event (:class:`Everything`). A time-window replay
predicts the events whose **newest** part's record timestamp is in
``[start, end)`` (:class:`TimeWindow`); the others belong to a neighbouring window
and are finished without output, so back-to-back windows predict every event
once. The same rule applies to incomplete events (the newest part that did
arrive), mid-range and at the range's end.
"""

from __future__ import annotations

from typing import Protocol


class EventFilter(Protocol):
    def accepts(self, newest_part_ms: int) -> bool: ...


class Everything:
    def accepts(self, newest_part_ms: int) -> bool:
        return True


class TimeWindow:
    """``[start_ms, end_ms)``; None leaves that side open."""

    def __init__(self, start_ms: int | None, end_ms: int | None) -> None:
        self.start_ms = start_ms
        self.end_ms = end_ms

    def accepts(self, newest_part_ms: int) -> bool:
        return (self.start_ms is None or newest_part_ms >= self.start_ms) and (
            self.end_ms is None or newest_part_ms < self.end_ms
        )
