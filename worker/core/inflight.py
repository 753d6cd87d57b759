"""Outputs in flight: records sent to Kafka and not yet acknowledged.

They are part of what the worker holds: a broker that stops acknowledging (a
frozen leader, a full disk, a long election) must not let them grow without
bound, and kafka-python's producer no longer bounds its own buffer. The loop
counts them in its pending bounds (``--max-pending-events`` and
``--max-pending-bytes``), so at the bound it stops fetching and stops handing
batches to inference until acknowledgements come back.

Sends happen on the inference thread and acknowledgements arrive on the
client's thread, so the counts are kept under a lock. Each send is tagged with
the checkpoint's generation: after an exactly-once abort the counts restart at
zero and late callbacks of the aborted sends are ignored.
"""

from __future__ import annotations

import threading


class InFlight:
    """Records (and their bytes) sent and not yet acknowledged or failed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._generation = 0
        self.records = 0
        self.nbytes = 0

    def sent(self, generation: int, nbytes: int) -> None:
        with self._lock:
            if generation == self._generation:
                self.records += 1
                self.nbytes += nbytes

    def settled(self, generation: int, nbytes: int) -> None:
        """Acknowledged, or failed: either way no longer held by the client."""
        with self._lock:
            if generation == self._generation:
                self.records -= 1
                self.nbytes -= nbytes

    def reset(self, generation: int) -> None:
        """An abort: the sends of earlier generations no longer count."""
        with self._lock:
            self._generation = generation
            self.records = 0
            self.nbytes = 0
