"""Admission: whether a ready batch may go to inference now.

The live worker admits a batch when the inference stage has room; a replay
also paces it (``--rate``). The loop asks :meth:`Admission.admits`, tells
:meth:`Admission.submitted` what went, and polls for :meth:`Admission.wait_ms`
while a batch waits.
"""

from __future__ import annotations

from typing import Protocol

from worker.core.pacing import Pacer

#: How long to poll while a ready batch may not go yet, when nothing says longer.
BLOCKED_WAIT_MS = 2


class _Stage(Protocol):
    def has_room(self) -> bool: ...


class Admission(Protocol):
    def admits(self, events: int) -> bool: ...

    def wait_ms(self, events: int) -> int: ...

    def submitted(self, events: int) -> None: ...


class StageRoom:
    """Admit while the inference stage has room (``--inference-queue`` batches)."""

    def __init__(self, stage: _Stage) -> None:
        self.stage = stage

    def admits(self, events: int) -> bool:
        return self.stage.has_room()

    def wait_ms(self, events: int) -> int:
        return BLOCKED_WAIT_MS

    def submitted(self, events: int) -> None:
        pass


class Paced:
    """Another admission, plus a rate: at most ``pacer.rate`` events/s."""

    def __init__(self, inner: Admission, pacer: Pacer) -> None:
        self.inner = inner
        self.pacer = pacer

    def admits(self, events: int) -> bool:
        return self.inner.admits(events) and self.pacer.ready(events)

    def wait_ms(self, events: int) -> int:
        return max(self.inner.wait_ms(events), min(100, self.pacer.wait_ms(events)))

    def submitted(self, events: int) -> None:
        self.inner.submitted(events)
        self.pacer.take(events)
