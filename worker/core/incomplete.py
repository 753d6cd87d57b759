"""The incomplete-event policy: what becomes of an event whose parts never all came.

Pure: :meth:`IncompletePolicy.decide` returns a :class:`Decision`; the intake acts
on it. In order: an event outside the run's window (a replay's neighbour) is
finished without output; otherwise ``--on-incomplete`` applies: ``infer`` (the
missing parts blanked), ``dlq`` (every part dead-lettered with ``incomplete_event``,
or ``evicted_at_bound`` when the pending bound pushed it out) or ``drop``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Self

from worker.config import WorkerConfig
from worker.contract.errors import ConfigError, Reason
from worker.core.assemble import Incomplete
from worker.core.filters import EventFilter

log = logging.getLogger(__name__)

#: What a decision does: "outside_window", or the --on-incomplete action applied.
OUTSIDE_WINDOW = "outside_window"


@dataclass(frozen=True)
class Decision:
    action: str  # OUTSIDE_WINDOW, "infer", "dlq" or "drop"
    reason: Reason | None = None  # dlq only
    detail: str = ""


class IncompletePolicy:
    """``--on-incomplete`` with the bounds and timeout its dead letters explain; a
    configuration it cannot serve is refused when it is made, before any client is."""

    def __init__(
        self,
        action: str,
        events: EventFilter,
        *,
        timeout_ms: int,
        max_events: int,
        max_bytes: int,
        accepts_missing: bool,
    ) -> None:
        if action == "infer" and not accepts_missing:
            raise ConfigError(
                "--on-incomplete infer: the model's manifest does not say it accepts missing "
                "inputs (accepts_missing); use dlq or drop"
            )
        if timeout_ms == 0:
            log.warning(
                "--assembly-timeout-ms 0: incomplete events are held until they fill "
                "--max-pending-events/bytes, then pushed out oldest first (evicted_at_bound)"
            )
        self.action = action
        self.events = events
        self.timeout_ms = timeout_ms
        self.max_events = max_events
        self.max_bytes = max_bytes

    @classmethod
    def of(cls, config: WorkerConfig, events: EventFilter, accepts_missing: bool) -> Self:
        """The policy of a worker's settings (``accepts_missing``: its model's manifest)."""
        return cls(
            config.on_incomplete,
            events,
            timeout_ms=config.assembly_timeout_ms,
            max_events=config.max_pending_events,
            max_bytes=config.max_pending_bytes,
            accepts_missing=accepts_missing,
        )

    def decide(self, inc: Incomplete, *, evicted: bool) -> Decision:
        if not self.events.accepts(max(p.source.timestamp_ms for p in inc.parts.values())):
            return Decision(OUTSIDE_WINDOW)
        if self.action != "dlq":
            return Decision(self.action)
        if evicted:
            return Decision(
                "dlq",
                Reason.EVICTED_AT_BOUND,
                f"event {inc.event_id!r} still lacked {list(inc.missing)} when the pending "
                f"bound (--max-pending-events {self.max_events}, --max-pending-bytes "
                f"{self.max_bytes}) was full of incomplete events: its parts are farther "
                "apart in the log than the bound holds",
            )
        return Decision(
            "dlq",
            Reason.INCOMPLETE_EVENT,
            f"event {inc.event_id!r} still lacks {list(inc.missing)}: its partition's stream "
            f"time passed its first part's timestamp + {self.timeout_ms} ms",
        )
