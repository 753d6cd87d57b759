"""A pipeline stage on its own thread: batches in, in order, through one handler.

The poll loop owns the Kafka consumer and must keep polling; inference (ONNX
Runtime releases the GIL) and publishing (serialising predictions, handing
them to the producer) run on this stage's thread, so they overlap the next
poll and decode. :class:`BatchStage` is deliberately small:

* ``submit(batch)`` queues a batch; at most ``depth`` batches are queued or
  running (``has_room()`` says whether another fits; the loop leaves events
  in its batcher until then, so batches grow while the stage is busy).
* Batches run one at a time, in submission order, on one thread.
* An exception in the handler stops the stage; ``check()`` re-raises it on
  the caller's thread, and later batches are dropped unrun (the caller stops
  and nothing past the last commit was acknowledged, so nothing is lost).
* ``wait_idle()`` blocks until every submitted batch has run: the loop calls
  it before committing a transaction, aborting one, and at shutdown.

``depth=0`` runs each batch inline in ``submit`` (no thread): the same code
path, synchronous, for tests and for comparing in benchmarks.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from worker.contract.errors import ConfigError, MMStreamError

log = logging.getLogger(__name__)

T = TypeVar("T")


class BatchStage(Generic[T]):
    """Runs ``handler(batch)`` for each submitted batch, in order, on one thread."""

    def __init__(self, handler: Callable[[Sequence[T]], None], depth: int, name: str) -> None:
        if depth < 0:
            raise ConfigError(f"stage depth must be >= 0, not {depth}")
        self._handler = handler
        self._name = name
        self.depth = depth
        self._queue: deque[Sequence[T]] = deque()
        self._cond = threading.Condition()
        self._running = 0  # batches taken by the thread and not finished
        self._items = 0  # items in queued + running batches
        self._error: BaseException | None = None
        self._closed = False
        self._thread: threading.Thread | None = None
        if depth > 0:
            self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
            self._thread.start()

    # ------------------------------------------------------------- caller side

    def has_room(self) -> bool:
        if self.depth == 0:
            return True
        with self._cond:
            return len(self._queue) + self._running < self.depth

    @property
    def pending_items(self) -> int:
        """Items in batches queued or running (the loop counts them as held)."""
        with self._cond:
            return self._items

    def submit(self, batch: Sequence[T]) -> None:
        """Queue ``batch`` (run it now if ``depth`` is 0). Raises the stage's error, if any."""
        self.check()
        if self._thread is None:
            self._handler(batch)
            return
        with self._cond:
            if self._closed:
                raise MMStreamError(f"stage {self._name} is closed: batch not accepted")
            self._queue.append(batch)
            self._items += len(batch)
            self._cond.notify_all()

    def check(self) -> None:
        """Re-raise, on the caller's thread, an exception the handler raised."""
        err = self._error
        if err is not None:
            raise err

    def wait_idle(self, timeout_s: float | None = None) -> bool:
        """Block until every submitted batch has run (or the stage failed); False on timeout."""
        with self._cond:
            return self._cond.wait_for(
                lambda: self._error is not None or (not self._queue and not self._running),
                timeout=timeout_s,
            )

    def close(self, timeout_s: float = 30.0, discard: bool = False) -> None:
        """Stop the thread after the queued batches ran (``discard``: drop them unrun,
        when the loop failed and nothing they send would be committed)."""
        with self._cond:
            self._closed = True
            if discard:
                self._items -= sum(len(b) for b in self._queue)
                self._queue.clear()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout_s)

    # ------------------------------------------------------------- thread side

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._queue) or self._closed)
                if not self._queue:
                    return  # closed and drained
                batch = self._queue.popleft()
                self._running += 1
            try:
                if self._error is None:
                    self._handler(batch)
            except BaseException as exc:  # handed to the caller's thread by check()
                log.debug("stage handler failed: %r", exc)
                self._error = exc
            finally:
                with self._cond:
                    self._running -= 1
                    self._items -= len(batch)
                    self._cond.notify_all()
