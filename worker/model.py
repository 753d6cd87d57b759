"""Infer stage: a model directory -> an ONNX Runtime session that scores batches.

The manifest's sha256 is checked before the session is created. The provider
that really runs is read from ``session.get_providers()`` after creation:
``get_available_providers()`` lists what was compiled in (onnxruntime-gpu lists
CUDA on machines without a GPU and then silently runs on CPU).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from worker.errors import ConfigError, InferenceError, ModelError
from worker.manifest import MODEL_FILE, Manifest, load_manifest
from worker.preprocess import blank_input
from worker.records import Event, Prediction, as_f32_list

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")


class Session(Protocol):
    """The slice of ``onnxruntime.InferenceSession`` the worker uses (fakes in unit tests)."""

    def run(
        self, output_names: Sequence[str] | None, input_feed: dict[str, NDArray[Any]]
    ) -> list[NDArray[Any]]: ...


@dataclass(frozen=True)
class SessionInfo:
    """What runs: the provider in use, and all providers the session was given."""

    provider: str
    providers: tuple[str, ...]


def create_session(
    model_path: Path, device: str, intra_op_threads: int = 0
) -> tuple[Session, SessionInfo]:
    """An ORT session on ``device`` (auto = CUDA when it works, else CPU)."""
    import onnxruntime as ort

    if device not in DEVICES:
        raise ConfigError(f"--device must be one of {DEVICES}, not {device!r}")
    available = ort.get_available_providers()
    want: list[str] = ["CPUExecutionProvider"]
    if device in ("auto", "cuda"):
        if "CUDAExecutionProvider" in available:
            want.insert(0, "CUDAExecutionProvider")
        elif device == "cuda":
            raise ModelError(
                "--device cuda: this onnxruntime has no CUDAExecutionProvider "
                f"(available: {available}); install the [gpu] extra"
            )
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if intra_op_threads > 0:
        opts.intra_op_num_threads = intra_op_threads
    opts.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(model_path), sess_options=opts, providers=want)
    except Exception as exc:  # ORT raises its own untyped exceptions
        raise ModelError(f"ONNX Runtime cannot load {model_path}: {exc}") from exc
    used = tuple(session.get_providers())
    if device == "cuda" and used[0] != "CUDAExecutionProvider":
        raise ModelError(f"--device cuda: CUDA did not initialise; session runs on {used}")
    info = SessionInfo(provider=used[0], providers=used)
    log.info("model %s runs on %s (asked %s)", model_path, info.provider, want)
    return session, info


class ModelRunner:
    """Stacks a batch of events, runs the session, and builds predictions."""

    def __init__(self, manifest: Manifest, session: Session, info: SessionInfo) -> None:
        self.manifest = manifest
        self.session = session
        self.info = info
        self.output_names = [o.name for o in manifest.outputs]
        self.model_ref = {
            "name": manifest.name,
            "version": manifest.version,
            "sha256": manifest.sha256,
        }
        self._blanks: dict[str, NDArray[Any]] = {}
        self._label_index = (
            self.output_names.index(manifest.label_output)
            if manifest.labels and manifest.label_output in self.output_names
            else None
        )

    @classmethod
    def load(cls, model_dir: Path, device: str = "auto", intra_op_threads: int = 0) -> ModelRunner:
        manifest = load_manifest(model_dir, verify=True)
        session, info = create_session(Path(model_dir) / MODEL_FILE, device, intra_op_threads)
        return cls(manifest, session, info)

    @property
    def required_inputs(self) -> frozenset[str]:
        return frozenset(i.name for i in self.manifest.inputs)

    def feed(self, events: Sequence[Event]) -> dict[str, NDArray[Any]]:
        """Stack each input over the batch; inputs an incomplete event lacks are blanked."""
        feed = {}
        for i in self.manifest.inputs:
            rows = [
                e.parts[i.name].tensor if i.name in e.parts else self._blank(i.name) for e in events
            ]
            feed[i.name] = np.stack(rows).astype(i.dtype, copy=False)
        return feed

    def _blank(self, name: str) -> NDArray[Any]:
        if name not in self._blanks:
            info = self.manifest.input(name)
            if info is None:
                raise InferenceError(f"no model input {name!r}")
            self._blanks[name] = blank_input(info.preprocessing).astype(info.dtype)
        return self._blanks[name]

    def run(self, feed: dict[str, NDArray[Any]]) -> list[NDArray[Any]]:
        try:
            return self.session.run(self.output_names, feed)
        except Exception as exc:  # ORT raises its own untyped exceptions
            raise InferenceError(f"ONNX Runtime failed on a batch: {exc}") from exc

    def predict(self, events: Sequence[Event], clock: Callable[[], int]) -> list[Prediction]:
        """Run one batch; ``clock`` (ms) stamps ``inferred_ms`` after ORT returns."""
        outputs = self.run(self.feed(events))
        now_ms = clock()
        labels = self.manifest.labels
        preds = []
        for row, event in enumerate(events):
            values = {
                name: as_f32_list(out[row])
                for name, out in zip(self.output_names, outputs, strict=True)
            }
            label = score = None
            if self._label_index is not None:
                probs = outputs[self._label_index][row].ravel()
                top = int(np.argmax(probs))
                label, score = labels[top] if top < len(labels) else str(top), float(probs[top])
            preds.append(
                Prediction(
                    event_id=event.event_id,
                    outputs=values,
                    label=label,
                    score=score,
                    modalities=tuple(sorted(event.parts)),
                    missing=event.missing,
                    timing={
                        "last_part_ms": event.last_part_ms,
                        "completed_ms": event.completed_ms,
                        "inferred_ms": now_ms,
                        "batch_size": len(events),
                    },
                )
            )
        return preds
