"""What to read for a backfill or an archive: per partition, an offset range.

A range is given either as a time window (``--from`` / ``--to``, ISO-8601,
resolved per partition with Kafka's offsets-for-times: the first offset whose
timestamp is at or after the time) or as explicit ``partition:start-end``
offsets (end exclusive; either side may be left out: ``0:100-``, ``1:-500``).
Ranges are clamped to what the log still holds (retention may have deleted
the start); :class:`PartitionRange` says both what was asked and what is read.

The time window can be widened by a margin on both sides for reading, so that
an event whose parts straddle an edge is read whole; which events *belong* to
the window is the caller's rule (replay: the event's newest part must fall in
``[from, to)``, so consecutive windows predict every event exactly once).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import ClassVar

from worker.config import setting
from worker.contract.errors import ConfigError
from worker.edge.client import Inspector

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_RANGE = re.compile(r"^(\d+):(\d*)-(\d*)$")


@dataclass(frozen=True)
class PartitionRange:
    """One partition's part of a read.

    Attributes:
        partition: the partition number.
        start: first offset to read (inclusive).
        end: one past the last offset to read (exclusive); ``start == end`` is empty.
        log_start, log_end: the partition's first and next offsets when resolved.
    """

    partition: int
    start: int
    end: int
    log_start: int
    log_end: int

    @property
    def count(self) -> int:
        """Records in the range (a compacted topic may hold fewer)."""
        return max(0, self.end - self.start)


def parse_time(text: str, flag: str) -> int:
    """ISO-8601 (``2026-11-29T10:00:00Z``, ``...+01:00``; no zone = UTC) -> epoch ms."""
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError as exc:
        raise ConfigError(
            f"{flag} {text!r}: not an ISO-8601 time (e.g. 2026-11-29T10:00:00Z)"
        ) from exc
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return (when - _EPOCH) // timedelta(milliseconds=1)  # exact: no float rounding


def format_time(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


def parse_offset_ranges(specs: Sequence[str]) -> dict[int, tuple[int | None, int | None]]:
    """``["0:100-200", "1:-50", "2:7-"]`` -> partition -> (start or None, end or None)."""
    out: dict[int, tuple[int | None, int | None]] = {}
    for spec in specs:
        m = _RANGE.match(spec.strip())
        if m is None:
            raise ConfigError(
                f"--range {spec!r}: expected PARTITION:START-END (END exclusive, "
                "either may be empty), e.g. 0:100-200"
            )
        part = int(m.group(1))
        start = int(m.group(2)) if m.group(2) else None
        end = int(m.group(3)) if m.group(3) else None
        if start is not None and end is not None and end < start:
            raise ConfigError(f"--range {spec!r}: END is before START")
        if part in out:
            raise ConfigError(f"--range: partition {part} given twice")
        out[part] = (start, end)
    return out


def resolve_ranges(
    inspector: Inspector,
    topic: str,
    *,
    from_ms: int | None = None,
    to_ms: int | None = None,
    offsets: dict[int, tuple[int | None, int | None]] | None = None,
    margin_ms: int = 0,
) -> list[PartitionRange]:
    """Per partition of ``topic``, the offsets to read (nothing is assigned or moved).

    With ``offsets``, only the partitions named there; otherwise every partition
    over ``[from_ms - margin_ms, to_ms + margin_ms)``, open ends meaning the log's
    start or its current end.
    """
    if offsets is not None and (from_ms is not None or to_ms is not None):
        raise ConfigError("give --from/--to or --range, not both")
    if from_ms is not None and to_ms is not None and to_ms <= from_ms:
        raise ConfigError("--to must be after --from")
    parts = inspector.partitions(topic)
    if not parts:
        raise ConfigError(f"topic {topic!r} does not exist or has no partitions")
    if offsets is not None:
        unknown = sorted(set(offsets) - set(parts))
        if unknown:
            raise ConfigError(f"topic {topic!r} has no partition {unknown} (it has {parts})")
        parts = sorted(offsets)
    bounds = inspector.offset_bounds(topic, parts)
    first = {p: lo for p, (lo, _hi) in bounds.items()}
    nxt = {p: hi for p, (_lo, hi) in bounds.items()}

    def at_time(ms: int | None, default: dict[int, int]) -> dict[int, int]:
        if ms is None:
            return dict(default)
        found = inspector.offsets_for_time(topic, parts, ms)
        out: dict[int, int] = {}
        for p in parts:
            off = found.get(p)
            out[p] = nxt[p] if off is None else off
        return out

    if offsets is not None:
        starts = {p: (s if s is not None else first[p]) for p, (s, _) in offsets.items()}
        ends = {p: (e if e is not None else nxt[p]) for p, (_, e) in offsets.items()}
    else:
        starts = at_time(None if from_ms is None else from_ms - margin_ms, first)
        ends = at_time(None if to_ms is None else to_ms + margin_ms, nxt)
    out = []
    for p in parts:
        lo, hi = first[p], nxt[p]
        start = min(max(starts[p], lo), hi)
        end = min(max(ends[p], start), hi)
        out.append(PartitionRange(p, start, end, lo, hi))
    return out


# ------------------------------------------------------------------ the flags


@dataclass(frozen=True, kw_only=True)
class RangeSettings:
    """``--from`` / ``--to`` / ``--range`` of the commands that read a range (replay,
    archive). ``ranges`` may be given as one comma-separated string too."""

    #: ``--help`` groups these flags under this title.
    SETTINGS_TITLE: ClassVar[str] = "range (a time window, or explicit offsets)"

    from_time: str = setting(
        "", flag="from", metavar="TIME", help="start of the window, ISO-8601 (no zone = UTC)"
    )
    to_time: str = setting(
        "", flag="to", metavar="TIME", help="end of the window, ISO-8601, exclusive"
    )
    ranges: tuple[str, ...] = setting(
        (),
        flag="range",
        metavar="PARTITION:START-END",
        help="explicit offsets instead of times, END exclusive, either side may be empty "
        "(0:100-200, 1:-50, 2:7-); repeatable or comma-separated, only the partitions "
        "named; not with --from/--to",
    )

    def _check_range(self) -> None:
        given = [self.ranges] if isinstance(self.ranges, str) else list(self.ranges or ())
        # Each --range (and MMSTREAM_RANGE) may also be a comma-separated list.
        specs = tuple(s for g in given for s in re.split(r"[,\s]+", g) if s)
        object.__setattr__(self, "ranges", specs)
        object.__setattr__(self, "from_time", self.from_time or "")
        object.__setattr__(self, "to_time", self.to_time or "")
        if self.ranges and (self.from_time or self.to_time):
            raise ConfigError("give --from/--to or --range, not both")
        parse_offset_ranges(self.ranges)  # errors now, before connecting
        self.window()

    def window(self) -> tuple[int | None, int | None]:
        """(``--from``, ``--to``) in epoch ms, None where not given."""
        start = parse_time(self.from_time, "--from") if self.from_time else None
        end = parse_time(self.to_time, "--to") if self.to_time else None
        if start is not None and end is not None and end <= start:
            raise ConfigError("--to must be after --from")
        return start, end

    def offsets(self) -> dict[int, tuple[int | None, int | None]] | None:
        """The ``--range`` offsets by partition, None where none were given."""
        return parse_offset_ranges(self.ranges) if self.ranges else None
