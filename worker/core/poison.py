"""The poison budget: when single events failing inference mean a broken model.

A batch that makes ONNX Runtime fail is split until the failing event stands
alone; that event is dead-lettered (``inference_error``). When more than
``max_streak`` single events fail in a row, the model or the device is broken,
not the input: the loop stops (exit 1) instead of dead-lettering the whole
stream, and a restart re-reads everything past the last commit.
"""

from __future__ import annotations

from dataclasses import dataclass

#: More single events than this failing in a row means a broken model or device.
MAX_POISON_STREAK = 8


@dataclass
class PoisonBudget:
    """Counts single-event inference failures in a row."""

    max_streak: int = MAX_POISON_STREAK
    streak: int = 0

    def succeeded(self) -> None:
        """A batch ran: the streak ends."""
        self.streak = 0

    def failed_alone(self) -> bool:
        """One event failed on its own; True when the budget is spent (stop the worker)."""
        self.streak += 1
        return self.streak > self.max_streak
