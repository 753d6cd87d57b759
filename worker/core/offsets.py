"""Commit stage's bookkeeping: which offsets are safe to commit.

At-least-once: a partition's committed offset never passes a record whose
work is unfinished -- a part waiting in an incomplete event, an event in a
batch, or a prediction / dead-letter record not yet acknowledged by the
broker. Records are tracked when consumed and marked done when their output
is acknowledged; the safe position is the lowest offset still open (or one
past the highest seen when none is open). Offsets per partition arrive in
increasing order, so a deque plus a done-set gives amortised O(1) updates.

Offsets already finished *beyond* the safe position (events that completed
while an older event is still incomplete) travel in the commit's metadata
string, as Confluent's Parallel Consumer does: ``mm1:`` followed by
comma-separated ranges ``a-b`` (or ``a``) of offsets relative to the committed
position. After a restart or rebalance, :meth:`OffsetTracker.seed` restores
them and the pipeline skips those records instead of re-emitting their
predictions. The string is capped (Kafka's default limit is 4096 bytes); what
does not fit is simply re-processed.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

TopicPartition = tuple[str, int]
METADATA_PREFIX = "mm1:"
METADATA_MAX_CHARS = 3000


def encode_done(position: int, done: set[int] | list[int]) -> str:
    """Offsets finished beyond ``position`` -> ``mm1:`` ranges relative to it (capped)."""
    ranges: list[list[int]] = []
    for off in sorted(o for o in done if o > position):
        if ranges and off == ranges[-1][1] + 1:
            ranges[-1][1] = off
        else:
            ranges.append([off, off])
    out = METADATA_PREFIX
    for i, (a, b) in enumerate(ranges):
        item = f"{a - position}" if a == b else f"{a - position}-{b - position}"
        if len(out) + len(item) + 1 > METADATA_MAX_CHARS:
            break  # the rest is re-processed after a restart: safe, only wasteful
        out += ("," if i else "") + item
    return out


def decode_done(position: int, metadata: str | None) -> set[int]:
    """The inverse of :func:`encode_done`; anything unreadable gives an empty set."""
    if not metadata or not metadata.startswith(METADATA_PREFIX):
        return set()
    out: set[int] = set()
    try:
        for item in filter(None, metadata[len(METADATA_PREFIX) :].split(",")):
            lo, _, hi = item.partition("-")
            a, b = int(lo), int(hi or lo)
            if a <= 0 or b < a:
                raise ValueError(item)
            out.update(range(position + a, position + b + 1))
    except ValueError:
        log.warning("ignoring unreadable commit metadata %r", metadata[:80])
        return set()
    return out


@dataclass
class _PartitionState:
    open: deque[int] = field(default_factory=deque)
    done: set[int] = field(default_factory=set)
    next_offset: int | None = None  # one past the highest offset seen
    committed: int | None = None
    committed_meta: str = ""
    finished_before: set[int] = field(default_factory=set)  # from the last commit's metadata


class OffsetTracker:
    """Tracks open offsets per partition and tells what may be committed."""

    def __init__(self) -> None:
        self._parts: dict[TopicPartition, _PartitionState] = {}

    def known(self, tp: TopicPartition) -> bool:
        return tp in self._parts

    def seed(self, tp: TopicPartition, committed: int | None, metadata: str | None) -> None:
        """Start a partition's state from its committed position and metadata."""
        st = self._parts[tp] = _PartitionState(committed=committed)
        if committed is not None:
            st.finished_before = decode_done(committed, metadata)
            st.committed_meta = metadata or ""

    def finished_before(self, tp: TopicPartition, offset: int) -> bool:
        """True if the last commit's metadata says this record's work was already done."""
        st = self._parts.get(tp)
        return st is not None and offset in st.finished_before

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

    def committable(self) -> dict[TopicPartition, tuple[int, str]]:
        """Safe positions, with their done-beyond metadata, that differ from the last commit."""
        out = {}
        for tp, st in self._parts.items():
            pos = self.safe_position(tp)
            if pos is None:
                continue
            beyond = st.done | {o for o in st.finished_before if o >= pos}
            meta = encode_done(pos, beyond) if beyond else ""
            if (
                st.committed is None
                or pos > st.committed
                or (pos == st.committed and meta != st.committed_meta)
            ):
                out[tp] = (pos, meta)
        return out

    def mark_committed(self, positions: dict[TopicPartition, tuple[int, str]]) -> None:
        for tp, (pos, meta) in positions.items():
            st = self._parts.get(tp)
            if st is not None:
                st.committed = pos
                st.committed_meta = meta
                st.finished_before = {o for o in st.finished_before if o >= pos}

    def uncommitted(self) -> int:
        """Records consumed past the committed positions (the commit lag)."""
        return sum(
            st.next_offset - (st.committed if st.committed is not None else st.next_offset)
            for st in self._parts.values()
            if st.next_offset is not None
        )

    def clear(self) -> None:
        self._parts.clear()

    def forget(self, tps: set[TopicPartition]) -> None:
        """Drop state of revoked partitions; late acknowledgements are then ignored."""
        for tp in tps:
            self._parts.pop(tp, None)
