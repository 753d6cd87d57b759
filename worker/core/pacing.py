"""The one pacer: a token bucket that holds a rate (replay ``--rate``, archive restore,
the producer).

On average ``rate`` units per second, bursts of up to ``burst`` units. It starts
empty, so the rate holds from the first unit on (a full bucket at the start would
let one extra burst through). The clock is injected (seconds, monotonic), so the
rate is tested without waiting; :meth:`Pacer.pace` sleeps with an injected
``sleep`` for callers that block (the producer, a restore).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

#: Float sums of rate x seconds are not exact; a token this close counts as there.
_EPS = 1e-9


class Pacer:
    """Token bucket: ``rate`` units/s on average, at most ``burst`` at once."""

    def __init__(
        self,
        rate: float,
        burst: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError(f"a pacer needs rate > 0 and burst > 0, not {rate}, {burst}")
        self.rate = rate
        self.burst = float(burst)
        self._clock = clock
        self._tokens = 0.0
        self._at = clock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now

    def ready(self, n: float) -> bool:
        """Whether ``n`` units may go now (more than ``burst`` waits for a full bucket)."""
        self._refill()
        return self._tokens + _EPS >= min(n, self.burst)

    def wait_s(self, n: float) -> float:
        """Seconds until ``n`` units may go (0 = now)."""
        self._refill()
        missing = min(n, self.burst) - self._tokens
        return 0.0 if missing <= _EPS else missing / self.rate

    def wait_ms(self, n: float) -> int:
        """:meth:`wait_s` in whole milliseconds, rounded up."""
        return math.ceil(self.wait_s(n) * 1000.0)

    def take(self, n: float) -> None:
        """``n`` units went (the bucket may go negative: later units wait for it)."""
        self._refill()
        self._tokens -= n

    def pace(self, n: float = 1.0, sleep: Callable[[float], None] = time.sleep) -> None:
        """Block until ``n`` units may go, then take them."""
        while (delay := self.wait_s(n)) > 0:
            sleep(delay)
        self.take(n)
