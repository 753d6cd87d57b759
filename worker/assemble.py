"""Assemble stage: parts -> complete events, keyed by (partition, event id).

Pure: the caller passes the clock (``now_ms``). An event is complete when
every model input has a part. Parts of one event share a key, hence a
partition, so state is per partition and can be dropped when a partition is
revoked (its new owner re-reads the parts from the committed offset).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from worker.records import Event, Part, SourceRef

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    parts: dict[str, Part] = field(default_factory=dict)
    first_seen_ms: int = 0
    duplicates: list[SourceRef] = field(default_factory=list)


class Assembler:
    """Collects parts by (partition, event id) until every required input is present."""

    def __init__(self, required: frozenset[str]) -> None:
        self.required = required
        self._pending: dict[tuple[int, str], _Pending] = {}
        self.duplicate_parts = 0

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, part: Part, now_ms: int) -> Event | None:
        """Add one part; return the event if this part completed it."""
        key = (part.source.partition, part.event_id)
        pending = self._pending.get(key)
        if pending is None:
            pending = self._pending[key] = _Pending(first_seen_ms=now_ms)
        old = pending.parts.get(part.input_name)
        if old is not None:
            # Deterministic: the later record replaces the earlier one; the earlier
            # is kept as a duplicate so its offset is settled with the event.
            self.duplicate_parts += 1
            pending.duplicates.append(old.source)
            log.debug(
                "duplicate %s part for event %r at %s", part.input_name, part.event_id, part.source
            )
        pending.parts[part.input_name] = part
        if not self.required.issubset(pending.parts):
            return None
        del self._pending[key]
        return Event(
            event_id=part.event_id,
            partition=part.source.partition,
            parts=pending.parts,
            first_seen_ms=pending.first_seen_ms,
            completed_ms=now_ms,
            duplicates=tuple(pending.duplicates),
        )

    def drop_partitions(self, partitions: set[int]) -> int:
        """Forget incomplete events of ``partitions``; return how many were dropped."""
        keys = [k for k in self._pending if k[0] in partitions]
        for k in keys:
            del self._pending[k]
        return len(keys)
