"""Assemble stage: parts -> complete events, keyed by (partition, event id).

Pure: the caller passes the clock (``now_ms``). An event is complete when
every model input has a part. Parts of one event share a key, hence a
partition, so state is per partition and can be dropped when a partition is
revoked (its new owner re-reads the parts from the committed offset).

Incomplete events older than the assembly timeout are handed back by
:meth:`Assembler.expire` for the caller to dead-letter, drop or infer. The
assembler counts the events and bytes it holds so the pipeline can bound them.
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
    duplicates: list[Part] = field(default_factory=list)
    nbytes: int = 0


@dataclass(frozen=True)
class Incomplete:
    """An event whose assembly timed out.

    Attributes:
        event_id, partition: its key and partition.
        parts: the parts that did arrive, by input name.
        duplicates: earlier parts replaced by later ones (their offsets settle with it).
        first_seen_ms: worker clock when its first part arrived.
        missing: required inputs that never arrived.
    """

    event_id: str
    partition: int
    parts: dict[str, Part]
    duplicates: tuple[Part, ...]
    first_seen_ms: int
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
    """Collects parts by (partition, event id) until every required input is present."""

    def __init__(self, required: frozenset[str]) -> None:
        self.required = required
        # Insertion order = order of first parts, so the oldest pending event is first.
        self._pending: dict[tuple[int, str], _Pending] = {}
        self.duplicate_parts = 0
        self.pending_bytes = 0

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
            pending.duplicates.append(old)
            log.debug(
                "duplicate %s part for event %r at %s", part.input_name, part.event_id, part.source
            )
        pending.parts[part.input_name] = part
        pending.nbytes += part.nbytes
        self.pending_bytes += part.nbytes
        if not self.required.issubset(pending.parts):
            return None
        self._remove(key)
        return Event(
            event_id=part.event_id,
            partition=part.source.partition,
            parts=pending.parts,
            first_seen_ms=pending.first_seen_ms,
            completed_ms=now_ms,
            duplicates=tuple(d.source for d in pending.duplicates),
        )

    def expire(self, now_ms: int, timeout_ms: int) -> list[Incomplete]:
        """Remove and return the events still incomplete ``timeout_ms`` after their first part."""
        out: list[Incomplete] = []
        for key, pending in self._pending.items():
            if now_ms - pending.first_seen_ms < timeout_ms:
                break  # the rest arrived later
            out.append(
                Incomplete(
                    event_id=key[1],
                    partition=key[0],
                    parts=pending.parts,
                    duplicates=tuple(pending.duplicates),
                    first_seen_ms=pending.first_seen_ms,
                    missing=tuple(sorted(self.required - set(pending.parts))),
                )
            )
        for inc in out:
            self._remove((inc.partition, inc.event_id))
        return out

    def _remove(self, key: tuple[int, str]) -> None:
        pending = self._pending.pop(key)
        self.pending_bytes -= pending.nbytes

    def drop_partitions(self, partitions: set[int]) -> int:
        """Forget incomplete events of ``partitions``; return how many were dropped."""
        keys = [k for k in self._pending if k[0] in partitions]
        for k in keys:
            self._remove(k)
        return len(keys)

    def clear(self) -> int:
        """Forget everything (after an aborted transaction); return how many were dropped."""
        n = len(self._pending)
        self._pending.clear()
        self.pending_bytes = 0
        return n
