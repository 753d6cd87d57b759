"""Dispatch: when batches leave the batcher for scoring.

A batch goes when the batcher says it is ready (full, or its oldest event waited
``--max-batch-delay-ms``), admission lets it (the inference stage has room; a
replay's pacer has tokens), and the outputs in flight leave room for its outputs
under the pending bounds. The loop's poll never waits past the next batch's
deadline, so a partial batch leaves on time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from worker.contract.records import Event
from worker.core.admission import Admission
from worker.core.batcher import Batcher
from worker.core.checkpoint import Checkpoint
from worker.core.outputs import Outputs
from worker.core.stage import BatchStage

#: The longest poll: the loop turns at least this often.
MAX_POLL_WAIT_MS = 100


class Dispatch:
    """Hands ready batches to the inference stage, as admission and the bounds allow."""

    def __init__(
        self,
        batcher: Batcher,
        admission: Admission,
        stage: BatchStage[Event],
        outputs: Outputs,
        checkpoint: Checkpoint,
        *,
        max_events: int,
        max_bytes: int,
        clock: Callable[[], int],
    ) -> None:
        self.batcher = batcher
        self.admission = admission
        self.stage = stage
        self.outputs = outputs
        self.checkpoint = checkpoint
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.clock = clock

    def submit_ready(self) -> None:
        while self.batcher.ready(self.clock()) and self.may_submit(self._next_batch()):
            self._submit(self.batcher.take())

    def submit_all(self) -> None:
        """At shutdown: every batch goes, full or not."""
        while len(self.batcher):
            self._submit(self.batcher.take())

    def may_submit(self, events: int) -> bool:
        """Admission says yes, and the outputs in flight leave room for this batch's (a
        batch still goes when nothing is in flight, so a bound below a batch cannot stall)."""
        out = self.outputs
        full = out.records > 0 and (
            out.records + events > self.max_events or out.nbytes >= self.max_bytes
        )
        return not full and self.admission.admits(events)

    def poll_timeout_ms(self) -> int:
        """Never past the next batch deadline; a ready batch that may not go yet waits as
        long as admission says."""
        wait = self.batcher.wait_ms(self.clock())
        timeout = MAX_POLL_WAIT_MS if wait is None else min(wait, MAX_POLL_WAIT_MS)
        if timeout == 0 and not self.may_submit(self._next_batch()):
            timeout = self.admission.wait_ms(self._next_batch())
        return timeout

    def _next_batch(self) -> int:
        return min(len(self.batcher), self.batcher.max_size)

    def _submit(self, events: Sequence[Event]) -> None:
        self.checkpoint.sending()  # exactly-once: the batch's sends go in the transaction
        self.admission.submitted(len(events))
        self.stage.submit(events)
