"""The progress watchdog: a worker that cannot make progress says so.

A loop that keeps turning is not necessarily making progress: a transactional
producer that cannot reach its coordinator, commits refused without end, outputs
never acknowledged. :class:`Watchdog` measures how long work has been waiting
(finished work not yet committed, outputs not yet acknowledged, a transaction
open) without a commit completing; the loop stops the worker with a
:class:`~worker.contract.errors.BrokerError` once that passes
``--progress-timeout-s``, so that its supervisor (Kubernetes, the ``--processes``
launcher) restarts it, and ``/healthz`` reports the same stall before that.

A second one times the **membership**: how long the consumer has been out of its
group (lost and not rejoining, its coordinator unreachable), which an idle worker
would otherwise sit through alive and silent.

Pure: the caller passes the time (seconds) and what is waiting.
"""

from __future__ import annotations

from collections.abc import Callable


class Watchdog:
    """Seconds without progress while work waits."""

    def __init__(self, timeout_s: float, check_every_s: float = 1.0) -> None:
        self.timeout_s = timeout_s
        self.check_every_s = check_every_s
        self._waiting_since: float | None = None
        self._checked_s = float("-inf")

    def progressed(self) -> None:
        """A commit or transaction completed: whatever waits now starts a new count."""
        self._waiting_since = None
        self._checked_s = float("-inf")

    def check(self, now_s: float, waiting: Callable[[], bool]) -> float:
        """How long work has waited without progress (0: none waits). ``waiting`` is asked
        at most every ``check_every_s``."""
        if now_s - self._checked_s >= self.check_every_s:
            self._checked_s = now_s
            if not waiting():
                self._waiting_since = None
            elif self._waiting_since is None:
                self._waiting_since = now_s
        return self.stalled_s(now_s)

    def stalled_s(self, now_s: float) -> float:
        since = self._waiting_since
        return 0.0 if since is None else max(0.0, now_s - since)

    def expired(self, now_s: float) -> bool:
        return self.stalled_s(now_s) > self.timeout_s
