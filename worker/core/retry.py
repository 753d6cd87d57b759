"""Waiting out a cluster that is failing over, within ``--progress-timeout-s``.

Some calls the loop cannot do without: reading the checkpoints to rewind to after
an abort, a partition's checkpoint at its first record, a new transactional
producer's ``init_transactions``. While a cluster fails over (the coordinator
moving, no controller quorum yet) they fail with a *retriable*
:class:`~worker.contract.errors.BrokerError` for a while. :class:`Retry` calls
again after a short pause until the call succeeds, the failure is not retriable
(a refusal, a fenced producer: raised at once), or the budget is spent (the last
failure is raised: the worker stops so that it is restarted).

Pure but for the pause: the caller passes the clock (ms) and may pass ``sleep`` (the
worker's also beats its loop: a loop that retries within its budget is alive).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from worker.contract.errors import BrokerError

__all__ = ["RETRY_PAUSE_S", "Retry"]

log = logging.getLogger(__name__)

#: Pause between two tries of a call that failed with a retriable error.
RETRY_PAUSE_S = 0.2

T = TypeVar("T")


class Retry:
    """Calls again what fails with a retriable :class:`BrokerError`, for ``budget_s``."""

    def __init__(
        self,
        budget_s: float,
        clock: Callable[[], int],
        *,
        sleep: Callable[[float], None] = time.sleep,
        pause_s: float | None = None,
    ) -> None:
        self.budget_s = budget_s
        self.clock = clock
        self.sleep = sleep
        self.pause_s = RETRY_PAUSE_S if pause_s is None else pause_s

    def call(self, what: str, fn: Callable[[], T]) -> T:
        """``fn()``'s result; ``what`` names it in the warning of each failed try."""
        give_up_ms = self.clock() + int(self.budget_s * 1000)
        while True:
            try:
                return fn()
            except BrokerError as exc:
                if not exc.retriable or self.clock() >= give_up_ms:
                    raise
                log.warning("%s failed, retrying: %s", what, exc)
                self.sleep(self.pause_s)
