"""Commit stage's bookkeeping: which offsets are safe to commit.

At-least-once: a partition's committed offset never passes a record whose
work is unfinished -- a part waiting in an incomplete event, an event in a
batch, or a prediction / dead-letter record not yet acknowledged by the
broker. Records are tracked when consumed and marked done when their output
is acknowledged; the safe position is the lowest offset still open (or one
past the highest seen when none is open). Offsets per partition arrive in
increasing order, so a deque plus a done-set gives amortised O(1) updates.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

TopicPartition = tuple[str, int]


@dataclass
class _PartitionState:
    open: deque[int] = field(default_factory=deque)
    done: set[int] = field(default_factory=set)
    next_offset: int | None = None  # one past the highest offset seen
    committed: int | None = None


class OffsetTracker:
    """Tracks open offsets per partition and tells what may be committed."""

    def __init__(self) -> None:
        self._parts: dict[TopicPartition, _PartitionState] = {}

    def track(self, tp: TopicPartition, offset: int) -> None:
        """A record was consumed and its work has begun."""
        st = self._parts.setdefault(tp, _PartitionState())
        st.open.append(offset)
        st.next_offset = offset + 1

    def done(self, tp: TopicPartition, offset: int) -> None:
        """The record's work is finished and acknowledged (ignored if forgotten)."""
        st = self._parts.get(tp)
        if st is None:
            return
        st.done.add(offset)
        while st.open and st.open[0] in st.done:
            st.done.discard(st.open.popleft())

    def open_count(self) -> int:
        return sum(len(st.open) - len(st.done) for st in self._parts.values())

    def safe_position(self, tp: TopicPartition) -> int | None:
        st = self._parts.get(tp)
        if st is None or st.next_offset is None:
            return None
        return st.open[0] if st.open else st.next_offset

    def committable(self) -> dict[TopicPartition, int]:
        """Positions that are safe and ahead of the last commit."""
        out = {}
        for tp, st in self._parts.items():
            pos = self.safe_position(tp)
            if pos is not None and (st.committed is None or pos > st.committed):
                out[tp] = pos
        return out

    def mark_committed(self, positions: dict[TopicPartition, int]) -> None:
        for tp, pos in positions.items():
            st = self._parts.get(tp)
            if st is not None:
                st.committed = pos

    def forget(self, tps: set[TopicPartition]) -> None:
        """Drop state of revoked partitions; late acknowledgements are then ignored."""
        for tp in tps:
            self._parts.pop(tp, None)
