"""Stream time: how far each partition's records have got, for assembly timeouts.

A partition's stream time is the newest record timestamp seen there, so an event
expires at the same place in the stream whether the records are read live, late
(fetching stalled: a broker outage, a paused partition, a lagging replay) or
replayed a month later. Only a partition that is **idle** (read to the end of its
log, not paused) also advances with the wall clock: a part that never comes must
still time out when nothing more is written. The clock never goes back.

Pure: the loop passes every record's timestamp (:meth:`StreamTime.observe`) and,
each turn, the partitions it found idle (:meth:`StreamTime.idle`) with the wall
clock; records without a timestamp (``-1``) count as written now.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class _Partition:
    time_ms: int
    #: (wall ms, stream ms) when the partition was last found idle; None when busy
    idle_from: tuple[int, int] | None = None


class StreamTime:
    """Per-partition stream time (ms)."""

    def __init__(self) -> None:
        self._parts: dict[int, _Partition] = {}

    def observe(self, partition: int, timestamp_ms: int, now_ms: int) -> int:
        """A record of ``partition`` was read; return the partition's stream time."""
        ts = timestamp_ms if timestamp_ms >= 0 else now_ms
        state = self._parts.get(partition)
        if state is None:
            state = self._parts[partition] = _Partition(ts)
        else:
            state.time_ms = max(state.time_ms, ts)
        state.idle_from = None  # records arrive: no longer idle
        return state.time_ms

    def idle(self, partition: int, now_ms: int) -> int:
        """``partition`` is idle now: advance it by the wall time since it became idle."""
        state = self._parts.get(partition)
        if state is None:
            return -1  # nothing read there yet: nothing pending to expire
        if state.idle_from is None:
            state.idle_from = (now_ms, state.time_ms)
        wall0, stream0 = state.idle_from
        state.time_ms = max(state.time_ms, stream0 + now_ms - wall0)
        return state.time_ms

    def busy(self, partition: int) -> None:
        """``partition`` is not idle (behind its log end, paused, or its leader away)."""
        state = self._parts.get(partition)
        if state is not None:
            state.idle_from = None

    def time(self, partition: int) -> int:
        """The partition's stream time; -1 before its first record."""
        state = self._parts.get(partition)
        return -1 if state is None else state.time_ms

    def forget(self, partitions: set[int]) -> None:
        """Revoked partitions (their next owner starts from their records)."""
        for p in partitions:
            self._parts.pop(p, None)

    def clear(self) -> None:
        """After a rewind: the records are read again."""
        self._parts.clear()
