"""Assemble stage: parts -> complete events, keyed by (partition, event id).

Pure: the caller passes the clock (``now_ms``) and the stream time. An event is
complete when every part of the manifest has arrived. Parts of one event share a key,
hence a partition, so state is per partition and can be dropped when a
partition is revoked (its new owner re-reads the parts from the committed offset).

Incomplete events are handed back for the caller to dead-letter, drop or infer:
by :meth:`Assembler.expire` once their partition's stream time
(:mod:`worker.core.streamtime`) passes their first part's timestamp plus the
assembly timeout, by :meth:`Assembler.evict_oldest` when the pending bound is
full of them, and by :meth:`Assembler.expire_all` at a bounded source's end.
The assembler counts the events and bytes it holds so the pipeline can bound them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from worker.contract.records import Event, Part

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    parts: dict[str, Part] = field(default_factory=dict)
    first_seen_ms: int = 0
    first_ts_ms: int = 0
    duplicates: list[Part] = field(default_factory=list)
    nbytes: int = 0


@dataclass(frozen=True)
class Incomplete:
    """An event whose assembly timed out.

    Attributes:
        event_id, partition: its key and partition.
        parts: the parts that did arrive, by part name.
        duplicates: earlier parts replaced by later ones (their offsets settle with it).
        first_seen_ms: worker clock when its first part arrived.
        first_ts_ms: its first part's record timestamp (where its timeout starts).
        missing: required parts that never arrived.
    """

    event_id: str
    partition: int
    parts: dict[str, Part]
    duplicates: tuple[Part, ...]
    first_seen_ms: int
    first_ts_ms: int
    missing: tuple[str, ...]

    @property
    def all_parts(self) -> tuple[Part, ...]:
        return (*self.parts.values(), *self.duplicates)

    def as_event(self, now_ms: int) -> Event:
        """The event as it stands, for ``--on-incomplete infer`` (``missing`` blanked)."""
        return Event(
            event_id=self.event_id,
            partition=self.partition,
            parts=self.parts,
            first_seen_ms=self.first_seen_ms,
            completed_ms=now_ms,
            duplicates=tuple(p.source for p in self.duplicates),
            missing=self.missing,
        )


class Assembler:
    """Collects parts by (partition, event id) until every required part is present."""

    def __init__(self, required: frozenset[str]) -> None:
        self.required = required
        # Per partition, in the order of first parts (log order): the oldest is first.
        self._pending: dict[int, dict[str, _Pending]] = {}
        self._count = 0
        self.duplicate_parts = 0
        self.pending_bytes = 0

    def __len__(self) -> int:
        return self._count

    def partitions(self) -> set[int]:
        """Partitions with events pending."""
        return set(self._pending)

    def add(self, part: Part, now_ms: int) -> Event | None:
        """Add one part; return the event if this part completed it."""
        partition = part.source.partition
        events = self._pending.setdefault(partition, {})
        pending = events.get(part.event_id)
        if pending is None:
            ts = part.source.timestamp_ms
            pending = events[part.event_id] = _Pending(
                first_seen_ms=now_ms, first_ts_ms=ts if ts >= 0 else now_ms
            )
            self._count += 1
        old = pending.parts.get(part.name)
        if old is not None:
            # Deterministic: the later record replaces the earlier one; the earlier
            # is kept as a duplicate so its offset is settled with the event.
            self.duplicate_parts += 1
            pending.duplicates.append(old)
            log.debug("duplicate %s part for event %r at %s", part.name, part.event_id, part.source)
        pending.parts[part.name] = part
        nbytes = part.nbytes
        pending.nbytes += nbytes
        self.pending_bytes += nbytes
        if not self.required.issubset(pending.parts):
            return None
        self._remove(partition, part.event_id)
        return Event(
            event_id=part.event_id,
            partition=partition,
            parts=pending.parts,
            first_seen_ms=pending.first_seen_ms,
            completed_ms=now_ms,
            duplicates=tuple(d.source for d in pending.duplicates),
        )

    def expire(self, partition: int, stream_ms: int, timeout_ms: int) -> list[Incomplete]:
        """Remove and return the events of ``partition`` whose first part is ``timeout_ms``
        or more older than the partition's stream time ``stream_ms``."""
        events = self._pending.get(partition, {})
        due = []
        for event_id, pending in events.items():
            if stream_ms - pending.first_ts_ms < timeout_ms:
                break  # the rest came later in the log
            due.append(event_id)
        return [self._take(partition, event_id) for event_id in due]

    def expire_all(self) -> list[Incomplete]:
        """Remove and return everything (a bounded source's end: no more parts will come)."""
        return [self._take(p, e) for p, events in list(self._pending.items()) for e in list(events)]

    def evict_oldest(self) -> Incomplete | None:
        """Remove and return the pending event with the oldest first part (None if none)."""
        firsts = [(next(iter(ev.values())).first_ts_ms, p) for p, ev in self._pending.items()]
        if not firsts:
            return None
        _ts, partition = min(firsts)
        return self._take(partition, next(iter(self._pending[partition])))

    def _take(self, partition: int, event_id: str) -> Incomplete:
        pending = self._pending[partition][event_id]
        self._remove(partition, event_id)
        return Incomplete(
            event_id=event_id,
            partition=partition,
            parts=pending.parts,
            duplicates=tuple(pending.duplicates),
            first_seen_ms=pending.first_seen_ms,
            first_ts_ms=pending.first_ts_ms,
            missing=tuple(sorted(self.required - set(pending.parts))),
        )

    def _remove(self, partition: int, event_id: str) -> None:
        events = self._pending[partition]
        pending = events.pop(event_id)
        if not events:
            del self._pending[partition]
        self._count -= 1
        self.pending_bytes -= pending.nbytes

    def drop_partitions(self, partitions: set[int]) -> int:
        """Forget incomplete events of ``partitions``; return how many were dropped."""
        dropped = 0
        for p in partitions & set(self._pending):
            events = self._pending.pop(p)
            dropped += len(events)
            self._count -= len(events)
            self.pending_bytes -= sum(e.nbytes for e in events.values())
        return dropped

    def clear(self) -> int:
        """Forget everything (after an aborted transaction); return how many were dropped."""
        n = self._count
        self._pending.clear()
        self._count = 0
        self.pending_bytes = 0
        return n
