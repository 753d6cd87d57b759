"""Backpressure: pause fetching at the memory bounds, resume below them.

Pure: :meth:`Backpressure.decide` takes what the worker holds and returns a
:class:`Pressure` decision; the loop applies it to its source (pause or resume
partitions) and asks the consumer for at most ``room`` records. The loop keeps
polling while paused, so the consumer stays in its group.

Held is what the worker has taken responsibility for and not yet finished:
events waiting for parts, for a batch or in inference, and their bytes.
Fetching resumes once both are at or below :data:`RESUME_AT` of their bounds
(hysteresis, so a worker at the bound does not flap).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)

#: Resume fetching once held events/bytes fall to this share of their bound.
RESUME_AT = 0.8


@dataclass(frozen=True)
class Pressure:
    """One turn's decision: ``pause`` / ``resume`` fetching (at most one is true),
    ``room`` = how many more records may be fetched now."""

    pause: bool
    resume: bool
    room: int


class Backpressure:
    """Bounds on held events and bytes."""

    def __init__(self, max_events: int, max_bytes: int, resume_at: float = RESUME_AT) -> None:
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.resume_at = resume_at
        self.paused = False

    def below_resume(self, events: int, nbytes: int) -> bool:
        """Both at or below the level where paused fetching resumes."""
        at = self.resume_at
        return events <= at * self.max_events and nbytes <= at * self.max_bytes

    def decide(self, events: int, nbytes: int) -> Pressure:
        full = events >= self.max_events or nbytes >= self.max_bytes
        resume = not full and self.paused and self.below_resume(events, nbytes)
        if full and not self.paused:
            log.info("pending bound reached (%d events, %d bytes): pausing", events, nbytes)
        elif resume:
            log.info("pending below the bound (%d events, %d bytes): resuming", events, nbytes)
        if full:
            self.paused = True
        elif resume:
            self.paused = False
        return Pressure(pause=full, resume=resume, room=max(0, self.max_events - events))
