"""Scoring: the inference stage's handler, from a batch of events to its outputs.

:class:`Scorer` runs ONNX Runtime on a batch and publishes one prediction per
event. A batch that fails is split in halves until the failing event stands
alone; that event is dead-lettered (``inference_error``), unless the
:class:`~worker.core.poison.PoisonBudget` says single events keep failing, which
means a broken model or device: then it raises and the worker stops.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import orjson

from worker.contract.errors import InferenceError, Reason
from worker.contract.records import Event, RawRecord
from worker.core.outputs import Outputs
from worker.core.poison import PoisonBudget
from worker.core.sensors import Sensor
from worker.inference.model import ModelRunner


class Scorer:
    """``scorer(events)``: predict and publish, isolating poison events."""

    def __init__(
        self,
        runner: ModelRunner,
        outputs: Outputs,
        sensor: Sensor,
        clock: Callable[[], int],
        poison: PoisonBudget | None = None,
    ) -> None:
        self.runner = runner
        self.outputs = outputs
        self.sensor = sensor
        self.clock = clock
        self.poison = poison or PoisonBudget()

    def __call__(self, events: Sequence[Event]) -> None:
        started = time.perf_counter()
        try:
            preds = self.runner.predict(events, self.clock)
        except InferenceError as err:
            self._failed(events, err)
            return
        self.poison.succeeded()
        self.sensor.batch(len(events), time.perf_counter() - started)
        model = self.runner.model_ref
        for event, pred in zip(events, preds, strict=True):
            value = orjson.dumps(pred.to_json_dict(model))
            self.outputs.prediction(
                event.event_id.encode(), value, event.sources, event.last_part_ms
            )

    def _failed(self, events: Sequence[Event], err: InferenceError) -> None:
        if len(events) > 1:
            mid = len(events) // 2
            self(events[:mid])
            self(events[mid:])
        elif self.poison.failed_alone():
            # Nothing past the last commit is lost: a restart re-reads it.
            raise InferenceError(
                f"ONNX Runtime failed on {self.poison.streak} events in a row, each "
                f"alone: stopping (last error: {err})"
            ) from err
        else:
            event = events[0]
            for part in event.parts.values():
                raw = part.raw or RawRecord(part.source, event.event_id.encode(), b"", ())
                self.outputs.dead_letter(raw, Reason.INFERENCE_ERROR, str(err))
            self.outputs.finished(event.duplicates)
