"""Batch stage: complete events -> micro-batches.

Pure: the caller passes the clock. A batch is ready when it is full
(``max_size`` events) or when its oldest event has waited ``max_delay_ms``.
"""

from __future__ import annotations

from collections import deque

from worker.contract.records import Event


class Batcher:
    """FIFO of complete events, released in batches of at most ``max_size``."""

    def __init__(self, max_size: int, max_delay_ms: int) -> None:
        self.max_size = max_size
        self.max_delay_ms = max_delay_ms
        self._queue: deque[tuple[int, Event]] = deque()

    def __len__(self) -> int:
        return len(self._queue)

    def add(self, event: Event, now_ms: int) -> None:
        self._queue.append((now_ms, event))

    def ready(self, now_ms: int) -> bool:
        if len(self._queue) >= self.max_size:
            return True
        return bool(self._queue) and now_ms - self._queue[0][0] >= self.max_delay_ms

    def wait_ms(self, now_ms: int) -> int | None:
        """Milliseconds until the oldest event's deadline (0 if ready), None if empty."""
        if not self._queue:
            return None
        if len(self._queue) >= self.max_size:
            return 0
        return max(0, self._queue[0][0] + self.max_delay_ms - now_ms)

    def take(self) -> list[Event]:
        """Remove and return up to ``max_size`` events, oldest first."""
        n = min(self.max_size, len(self._queue))
        return [self._queue.popleft()[1] for _ in range(n)]

    def clear(self) -> int:
        n = len(self._queue)
        self._queue.clear()
        return n

    def drop_partitions(self, partitions: set[int]) -> int:
        kept = deque((t, e) for t, e in self._queue if e.partition not in partitions)
        dropped = len(self._queue) - len(kept)
        self._queue = kept
        return dropped
