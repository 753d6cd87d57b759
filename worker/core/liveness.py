"""Liveness: whether the worker is making progress, for the loop and the probes alike.

Two :class:`~worker.core.watchdog.Watchdog` timers: how long work has waited without
a commit completing, and how long the member has been out of its group. The loop
calls :meth:`Liveness.check` every turn (past ``--progress-timeout-s`` it raises, so
that the worker stops and is restarted); ``/healthz`` calls :meth:`Liveness.health`,
which reads the same timers and says the same thing to a probe that asks first.
"""

from __future__ import annotations

from collections.abc import Callable

from worker.contract.errors import BrokerError
from worker.core.watchdog import Watchdog


class Liveness:
    """The progress and membership watchdogs of one worker, read by loop and probes."""

    def __init__(self, timeout_s: float, group_id: str, clock: Callable[[], int]) -> None:
        self.timeout_s = timeout_s
        self.group_id = group_id
        self.clock = clock
        self.progress = Watchdog(timeout_s)
        self.membership = Watchdog(timeout_s)

    def progressed(self) -> None:
        """A commit or transaction completed."""
        self.progress.progressed()

    def check(self, work_waiting: Callable[[], bool], out_of_group: Callable[[], bool]) -> None:
        """Raise :class:`BrokerError` once either timer passed the timeout."""
        now_s = self._now_s()
        self.progress.check(now_s, work_waiting)
        self.membership.check(now_s, out_of_group)
        found = self._problem(now_s)
        if found is not None:
            problem, not_doing = found
            raise BrokerError(
                f"{problem} (--progress-timeout-s {self.timeout_s:g}): the Kafka client is "
                f"not {not_doing}; stopping so that the worker is restarted"
            )

    def health(self) -> tuple[bool, str]:
        """For ``/healthz``: unhealthy once the loop would stop for want of progress."""
        found = self._problem(self._now_s())
        return (True, "ok") if found is None else (False, found[0])

    def out_of_group_s(self) -> float:
        return self.membership.stalled_s(self._now_s())

    def _problem(self, now_s: float) -> tuple[str, str] | None:
        """What is past the timeout, and what the client is therefore not doing."""
        stalled = self.progress.stalled_s(now_s)
        if stalled > self.timeout_s:
            waited = f"no commit or transaction completed in {stalled:.0f} s while work waited"
            return waited, "recovering"
        out = self.membership.stalled_s(now_s)
        if out > self.timeout_s:
            return f"out of consumer group {self.group_id!r} for {out:.0f} s", "rejoining"
        return None

    def _now_s(self) -> float:
        return self.clock() / 1000
