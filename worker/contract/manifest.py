"""The model manifest: what a model directory holds and how to feed it.

A model directory has ``model.onnx`` and ``manifest.json`` (JSON Schema:
``schemas/manifest.schema.json``). The manifest names each input with its
modality, dtype, shape (``null`` = dynamic batch) and preprocessing spec, the
outputs, the class labels, the sha256 of ``model.onnx``, its precision
(``fp32``, or ``fp16`` weights and compute behind float32 inputs and outputs)
and how the export was checked. The worker verifies the sha256 before it loads
the model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from worker.contract.errors import ModelError
from worker.contract.preprocess import Spec, spec_from_dict

MANIFEST_FILE = "manifest.json"
MODEL_FILE = "model.onnx"
FORMAT_VERSION = 1
#: ``model.onnx``'s weights and compute; its inputs and outputs keep their dtypes.
PRECISIONS = ("fp32", "fp16")


@dataclass(frozen=True)
class InputInfo:
    """One model input.

    Attributes:
        name: the ONNX input name; also the ``mm-modality`` header value of its parts.
        modality: ``image``, ``text`` or ``audio``.
        dtype: numpy dtype name of the tensor (``float32``, ``int32``).
        shape: per-example shape (without the batch dimension).
        preprocessing: how raw media becomes this tensor.
    """

    name: str
    modality: str
    dtype: str
    shape: tuple[int, ...]
    preprocessing: Spec

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "modality": self.modality,
            "dtype": self.dtype,
            "shape": [None, *self.shape],
            "preprocessing": self.preprocessing.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InputInfo:
        shape = d["shape"]
        if not shape or shape[0] is not None or any(not isinstance(s, int) for s in shape[1:]):
            raise ModelError(f"input {d.get('name')!r}: shape must be [null, ints...], got {shape}")
        spec = spec_from_dict(d["preprocessing"])
        if tuple(shape[1:]) != spec.shape():
            raise ModelError(
                f"input {d['name']!r}: shape {shape[1:]} disagrees with its preprocessing "
                f"{list(spec.shape())}"
            )
        return cls(d["name"], d["modality"], d["dtype"], tuple(shape[1:]), spec)


@dataclass(frozen=True)
class OutputInfo:
    """One model output: ONNX name, dtype and per-example shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": [None, *self.shape]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OutputInfo:
        return cls(d["name"], d["dtype"], tuple(d["shape"][1:]))


@dataclass(frozen=True)
class Manifest:
    """Everything the worker needs to know about a model directory.

    Attributes:
        name, version: model identity, copied into every prediction.
        sha256: hex digest of ``model.onnx``.
        opset: ONNX opset of the export.
        inputs, outputs: tensors, in the order the exporter declared them.
        labels: class names for the first output's last axis ("" entries allowed: none).
        label_output: output whose argmax gives ``label`` and ``score`` in predictions.
        producer: tool versions used for the export (tensorflow, tf2onnx, ...).
        parity: result of the TF vs ONNX Runtime check (of the FP32 graph).
        model_card: free-form facts (training data, held-out accuracies).
        accepts_missing: the model was trained with absent modalities given as blank
            inputs (:func:`worker.contract.preprocess.blank_input`), so an incomplete event may
            be inferred with its missing inputs blanked.
        precision: ``fp32`` or ``fp16`` (manifests without the field are ``fp32``).
        fp16_parity: for ``fp16``, the FP16 vs FP32 ONNX Runtime check (max abs diff,
            argmax agreement); empty for ``fp32``.
    """

    name: str
    version: str
    sha256: str
    opset: int
    inputs: tuple[InputInfo, ...]
    outputs: tuple[OutputInfo, ...]
    labels: tuple[str, ...] = ()
    label_output: str | None = None
    producer: dict[str, str] = field(default_factory=dict)
    parity: dict[str, Any] = field(default_factory=dict)
    model_card: dict[str, Any] = field(default_factory=dict)
    accepts_missing: bool = False
    precision: str = "fp32"
    fp16_parity: dict[str, Any] = field(default_factory=dict)

    def input(self, name: str) -> InputInfo | None:
        for info in self.inputs:
            if info.name == name:
                return info
        return None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "version": self.version,
            "model_file": MODEL_FILE,
            "sha256": self.sha256,
            "opset": self.opset,
            "producer": dict(self.producer),
            "inputs": [i.to_dict() for i in self.inputs],
            "outputs": [o.to_dict() for o in self.outputs],
            "labels": list(self.labels),
            "label_output": self.label_output,
            "parity": dict(self.parity),
            "model_card": dict(self.model_card),
            "accepts_missing": self.accepts_missing,
            "precision": self.precision,
        }
        if self.fp16_parity:
            d["fp16_parity"] = dict(self.fp16_parity)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        try:
            if d.get("format_version") != FORMAT_VERSION:
                raise ModelError(
                    f"manifest format_version {d.get('format_version')!r} is not supported "
                    f"(expected {FORMAT_VERSION})"
                )
            precision = d.get("precision", "fp32")
            if precision not in PRECISIONS:
                raise ModelError(
                    f"manifest precision {precision!r} is not supported (expected one of "
                    f"{list(PRECISIONS)})"
                )
            return cls(
                name=str(d["name"]),
                version=str(d["version"]),
                sha256=str(d["sha256"]),
                opset=int(d["opset"]),
                inputs=tuple(InputInfo.from_dict(i) for i in d["inputs"]),
                outputs=tuple(OutputInfo.from_dict(o) for o in d["outputs"]),
                labels=tuple(d.get("labels", ())),
                label_output=d.get("label_output"),
                producer=dict(d.get("producer", {})),
                parity=dict(d.get("parity", {})),
                model_card=dict(d.get("model_card", {})),
                accepts_missing=bool(d.get("accepts_missing", False)),
                precision=str(precision),
                fp16_parity=dict(d.get("fp16_parity", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"manifest is malformed: {type(exc).__name__}: {exc}") from exc

    def write(self, model_dir: Path) -> Path:
        path = model_dir / MANIFEST_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_manifest(model_dir: Path, *, verify: bool = True) -> Manifest:
    """Read ``model_dir/manifest.json``; with ``verify``, check ``model.onnx``'s sha256."""
    path = Path(model_dir) / MANIFEST_FILE
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ModelError(f"no {MANIFEST_FILE} in {model_dir} (export a model first)") from exc
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ModelError(f"{path} must hold a JSON object")
    manifest = Manifest.from_dict(raw)
    if verify:
        onnx_path = Path(model_dir) / MODEL_FILE
        if not onnx_path.is_file():
            raise ModelError(f"no {MODEL_FILE} in {model_dir}")
        actual = sha256_file(onnx_path)
        if actual != manifest.sha256:
            raise ModelError(
                f"{onnx_path} sha256 {actual[:12]}... does not match the manifest's "
                f"{manifest.sha256[:12]}...: refusing to load a model that was changed"
            )
    return manifest
