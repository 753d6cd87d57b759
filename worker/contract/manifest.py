"""The model manifest: what a model directory holds and how raw media becomes its inputs.

A model directory has ``model.onnx``, ``manifest.json`` (JSON Schema:
``schemas/manifest.schema.json``) and any file a transform reads (a
``tokenizer.json``). The manifest (format 2) says:

* ``inputs``: the graph's inputs, each with its dtype and shape (``null`` first: the
  batch dimension; an input without it is fed as it is, e.g. a sample-rate scalar);
* ``parts``: the parts an event has (the ``mm-modality`` header names one), each with
  its transform and the model inputs it fills (model input -> transform output): one
  text part may fill ``input_ids``, ``attention_mask`` and ``token_type_ids``;
* ``constants``: inputs no part fills, with their value (a zero state, a rate);
* ``outputs``: the graph's outputs, each with what it is (probabilities, logits,
  multi-label scores, an embedding, any tensor) and its labels;
* ``files``: the sha256 of every file beside ``model.onnx`` (``sha256`` is its own);
* the labels, how the export was checked, the model card.

Every model input is filled exactly once, by a part or a constant, with a matching
shape and dtype: :class:`Manifest` refuses anything else when it is made or read.
Format-1 manifests (one input per part, ``preprocessing`` per input) still load:
:func:`Manifest.from_dict` migrates them. The worker verifies every sha256 before it
loads the model (:func:`load_manifest`).
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from worker.contract.errors import ModelError
from worker.contract.transforms import (
    DTYPES_OF_KIND,
    Transform,
    transform_from_dict,
)

MANIFEST_FILE = "manifest.json"
MODEL_FILE = "model.onnx"
FORMAT_VERSION = 2
#: Formats :meth:`Manifest.from_dict` reads (1 is migrated).
FORMAT_VERSIONS = (1, 2)
#: ``model.onnx``'s weights and compute; its inputs and outputs keep their dtypes.
PRECISIONS = ("fp32", "fp16")
#: What an output holds, and so how it is published (see :class:`OutputInfo`).
OUTPUT_KINDS = ("probabilities", "logits", "multilabel", "embedding", "tensor")
INPUT_DTYPES = ("float32", "float16", "float64", "int64", "int32", "uint8", "bool")


@dataclass(frozen=True)
class InputInfo:
    """One graph input.

    Attributes:
        name: the ONNX input name.
        dtype: numpy dtype name (``float32``, ``int64``, ...).
        shape: per-example shape (without the batch dimension) when ``batched``,
            else the whole tensor's shape.
        batched: the first dimension is the batch (``null`` in the manifest).
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    batched: bool = True

    def to_dict(self) -> dict[str, Any]:
        shape: list[int | None] = [None, *self.shape] if self.batched else list(self.shape)
        return {"name": self.name, "dtype": self.dtype, "shape": shape}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InputInfo:
        shape = d["shape"]
        if not isinstance(shape, list) or any(not isinstance(s, int) for s in shape[1:]):
            raise ModelError(f"input {d.get('name')!r}: shape must be [null, ints...], got {shape}")
        dtype = str(d["dtype"])
        if dtype not in INPUT_DTYPES:
            raise ModelError(f"input {d['name']!r}: dtype {dtype!r} is not one of {INPUT_DTYPES}")
        if shape and shape[0] is None:
            return cls(str(d["name"]), dtype, tuple(shape[1:]))
        if any(not isinstance(s, int) for s in shape):
            raise ModelError(f"input {d['name']!r}: shape must be ints, got {shape}")
        return cls(str(d["name"]), dtype, tuple(shape), batched=False)


@dataclass(frozen=True)
class PartInfo:
    """One part of an event: its transform and the model inputs it fills.

    Attributes:
        name: the ``mm-modality`` header value of its records.
        transform: how its raw media becomes tensors.
        fills: (model input, transform output) pairs, in the manifest's order.
    """

    name: str
    transform: Transform
    fills: tuple[tuple[InputInfo, str], ...]

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(info.name for info, _ in self.fills)

    @functools.cached_property
    def only_input(self) -> InputInfo | None:
        """The one input the part fills (an npy part's), else None."""
        return self.fills[0][0] if len(self.fills) == 1 else None

    def fill(self, outputs: dict[str, NDArray[Any]]) -> dict[str, NDArray[Any]]:
        """The transform's outputs (one example, or stacked) as model inputs, in their dtypes."""
        return {info.name: outputs[out].astype(info.dtype, copy=False) for info, out in self.fills}

    def blank(self) -> dict[str, NDArray[Any]]:
        """What an absent part feeds: its transform applied to blank media (black image,
        empty text, silence), as the reference model was trained with dropped parts."""
        return self.fill(self.transform.apply(self.transform.blank_media()))

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "transform": self.transform.to_dict(),
            "inputs": {info.name: out for info, out in self.fills},
        }


@dataclass(frozen=True)
class ConstantInfo:
    """A graph input no part fills: the same value for every batch.

    Attributes:
        input: the graph input.
        value: a number (every element) or nested lists of the input's shape.
    """

    input: InputInfo
    value: Any

    @functools.cached_property
    def array(self) -> NDArray[Any]:
        """The value as one example (batched) or the whole tensor (not batched)."""
        try:
            arr = np.asarray(self.value, dtype=self.input.dtype)
            return np.broadcast_to(arr, self.input.shape).copy()
        except (ValueError, TypeError, OverflowError) as exc:
            raise ModelError(
                f"constant {self.input.name!r}: value does not fit {self.input.dtype}"
                f"{list(self.input.shape)}: {exc}"
            ) from exc

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.input.name, "value": self.value}


@dataclass(frozen=True)
class OutputInfo:
    """One graph output and how it is published.

    Attributes:
        name, dtype: ONNX name and numpy dtype name.
        shape: per-example shape (without the batch dimension).
        kind: ``probabilities`` (softmax scores: argmax label and its score),
            ``logits`` (the label is the argmax, its score the softmax there),
            ``multilabel`` (one score per label; ``tags`` in the prediction lists the
            labels at or over their threshold), ``embedding`` (a float vector) or
            ``tensor`` (anything else). All are published as values.
        labels: class names of the last axis (``multilabel``; the manifest's
            ``labels`` serve ``label_output``).
        thresholds: ``multilabel``: one for every label, or one per label.
        from_logits: ``multilabel``: the values are logits (sigmoid before thresholds).
        description: free text from the spec.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    kind: str = "tensor"
    labels: tuple[str, ...] = ()
    thresholds: tuple[float, ...] = ()
    from_logits: bool = False
    description: str = ""

    def __post_init__(self) -> None:
        if self.kind not in OUTPUT_KINDS:
            raise ModelError(
                f"output {self.name!r}: kind {self.kind!r} is not one of {OUTPUT_KINDS}"
            )
        if self.kind in ("multilabel", "probabilities", "logits") and len(self.shape) != 1:
            raise ModelError(
                f"output {self.name!r}: a {self.kind} output needs one axis per example, not "
                f"{[None, *self.shape]}"
            )
        if self.kind == "multilabel":
            if not self.labels:
                raise ModelError(f"output {self.name!r}: a multilabel output needs its labels")
            if len(self.thresholds) not in (1, len(self.labels)):
                raise ModelError(
                    f"output {self.name!r}: thresholds needs one value or one per label "
                    f"({len(self.labels)})"
                )
        if self.labels and self.shape[-1:] != (len(self.labels),):
            raise ModelError(
                f"output {self.name!r}: {len(self.labels)} labels but its shape is "
                f"{[None, *self.shape]}"
            )

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name,
            "dtype": self.dtype,
            "shape": [None, *self.shape],
            "kind": self.kind,
        }
        if self.labels:
            d["labels"] = list(self.labels)
        if self.thresholds:
            d["thresholds"] = list(self.thresholds)
        if self.from_logits:
            d["from_logits"] = True
        if self.description:
            d["description"] = self.description
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OutputInfo:
        return cls(
            name=str(d["name"]),
            dtype=str(d["dtype"]),
            shape=tuple(int(s) for s in d["shape"][1:]),
            kind=str(d.get("kind", "tensor")),
            labels=tuple(str(x) for x in d.get("labels", ())),
            thresholds=tuple(float(x) for x in d.get("thresholds", ())),
            from_logits=bool(d.get("from_logits", False)),
            description=str(d.get("description", "")),
        )


@dataclass(frozen=True)
class Manifest:
    """Everything the worker needs to know about a model directory.

    Attributes:
        name, version: model identity, copied into every prediction.
        sha256: hex digest of ``model.onnx``.
        opset: ONNX opset of the graph (its default domain).
        inputs, outputs: the graph's tensors, in the order the graph declares them.
        parts: the parts of an event and the inputs each fills.
        constants: inputs filled with a constant.
        files: file name -> sha256 of every other file the transforms read.
        labels: class names of ``label_output``'s last axis.
        label_output: the output whose argmax gives ``label`` and ``score``.
        producer: tool versions used for the export.
        parity: how the export was checked (Keras vs ONNX Runtime, or batched vs
            one-by-one runs of an imported ONNX graph).
        model_card: free-form facts (training data, held-out accuracies).
        accepts_missing: the model was trained with absent parts given as blank media
            (:meth:`PartInfo.blank`), so an incomplete event may be inferred.
        precision: ``fp32`` or ``fp16`` (manifests without the field are ``fp32``).
        fp16_parity: for ``fp16``, the FP16 vs FP32 ONNX Runtime check; else empty.
    """

    name: str
    version: str
    sha256: str
    opset: int
    inputs: tuple[InputInfo, ...]
    outputs: tuple[OutputInfo, ...]
    parts: tuple[PartInfo, ...] = ()
    constants: tuple[ConstantInfo, ...] = ()
    files: dict[str, str] = field(default_factory=dict)
    labels: tuple[str, ...] = ()
    label_output: str | None = None
    producer: dict[str, str] = field(default_factory=dict)
    parity: dict[str, Any] = field(default_factory=dict)
    model_card: dict[str, Any] = field(default_factory=dict)
    accepts_missing: bool = False
    precision: str = "fp32"
    fp16_parity: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_fills(self.inputs, self.parts, self.constants)
        needed = {f for p in self.parts for f in p.transform.files()}
        unlisted = sorted(needed - set(self.files))
        if unlisted:
            raise ModelError(f"files {unlisted} are read by a transform but have no sha256")
        if self.precision not in PRECISIONS:
            raise ModelError(
                f"manifest precision {self.precision!r} is not supported (expected one of "
                f"{list(PRECISIONS)})"
            )
        if self.label_output is not None:
            out = self.output(self.label_output)
            if out is None:
                raise ModelError(
                    f"label_output {self.label_output!r} is not an output "
                    f"({[o.name for o in self.outputs]})"
                )
            if out.kind not in ("probabilities", "logits"):
                raise ModelError(
                    f"label_output {out.name!r} is described as {out.kind}: the label comes "
                    "from probabilities or logits"
                )
            if self.labels and out.shape[-1:] != (len(self.labels),):
                raise ModelError(
                    f"{len(self.labels)} labels but output {out.name!r} has shape "
                    f"{[None, *out.shape]}"
                )

    def input(self, name: str) -> InputInfo | None:
        for info in self.inputs:
            if info.name == name:
                return info
        return None

    def part(self, name: str) -> PartInfo | None:
        return self._parts.get(name)

    def output(self, name: str) -> OutputInfo | None:
        return next((o for o in self.outputs if o.name == name), None)

    @functools.cached_property
    def _parts(self) -> dict[str, PartInfo]:
        return {p.name: p for p in self.parts}

    @property
    def part_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.parts)

    def part_of(self, input_name: str) -> PartInfo | None:
        """The part that fills ``input_name`` (None: a constant fills it)."""
        return next((p for p in self.parts if input_name in p.input_names), None)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "version": self.version,
            "model_file": MODEL_FILE,
            "sha256": self.sha256,
            "files": dict(self.files),
            "opset": self.opset,
            "producer": dict(self.producer),
            "inputs": [i.to_dict() for i in self.inputs],
            "parts": [p.to_dict() for p in self.parts],
            "constants": [c.to_dict() for c in self.constants],
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
    def from_dict(cls, d: dict[str, Any], base_dir: Path | None = None) -> Manifest:
        """Read a manifest of any format in :data:`FORMAT_VERSIONS`; ``base_dir``: the
        model directory, where transforms find their files."""
        try:
            version = d.get("format_version")
            if version not in FORMAT_VERSIONS:
                raise ModelError(
                    f"manifest format_version {version!r} is not supported "
                    f"(expected one of {list(FORMAT_VERSIONS)})"
                )
            if version == 1:
                d = migrate_v1(d)
            inputs = tuple(InputInfo.from_dict(i) for i in d["inputs"])
            by_name = {i.name: i for i in inputs}
            parts = tuple(_part_from_dict(p, by_name, base_dir) for p in d["parts"])
            constants = tuple(_constant_from_dict(c, by_name) for c in d.get("constants", ()))
            return cls(
                name=str(d["name"]),
                version=str(d["version"]),
                sha256=str(d["sha256"]),
                opset=int(d["opset"]),
                inputs=inputs,
                outputs=tuple(OutputInfo.from_dict(o) for o in d["outputs"]),
                parts=parts,
                constants=constants,
                files={str(k): str(v) for k, v in d.get("files", {}).items()},
                labels=tuple(d.get("labels", ())),
                label_output=d.get("label_output"),
                producer=dict(d.get("producer", {})),
                parity=dict(d.get("parity", {})),
                model_card=dict(d.get("model_card", {})),
                accepts_missing=bool(d.get("accepts_missing", False)),
                precision=str(d.get("precision", "fp32")),
                fp16_parity=dict(d.get("fp16_parity", {})),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ModelError(f"manifest is malformed: {type(exc).__name__}: {exc}") from exc

    def write(self, model_dir: Path) -> Path:
        path = model_dir / MANIFEST_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path


def check_fills(
    inputs: tuple[InputInfo, ...], parts: tuple[PartInfo, ...], constants: tuple[ConstantInfo, ...]
) -> None:
    """Every input filled exactly once, by a transform output of its shape and a kind its
    dtype takes, or by a constant; every part named once and filling something."""
    names = [p.name for p in parts]
    if len(set(names)) != len(names):
        raise ModelError(f"part names repeat: {names}")
    if not parts:
        raise ModelError("a model needs at least one part")
    filled: dict[str, str] = {}
    known = {i.name for i in inputs}

    def claim(input_name: str, by: str) -> None:
        if input_name not in known:
            raise ModelError(
                f"{by} fills {input_name!r}, which is not a model input {sorted(known)}"
            )
        if input_name in filled:
            raise ModelError(
                f"input {input_name!r} is filled twice: by {filled[input_name]} and {by}"
            )
        filled[input_name] = by

    for part in parts:
        if not part.fills:
            raise ModelError(f"part {part.name!r} fills no model input")
        outputs = part.transform.outputs()
        for info, out in part.fills:
            claim(info.name, f"part {part.name!r}")
            made = outputs.get(out)
            if made is None:
                raise ModelError(
                    f"part {part.name!r}: transform {part.transform.kind!r} makes "
                    f"{sorted(outputs)}, not {out!r}"
                )
            if not info.batched:
                raise ModelError(
                    f"input {info.name!r} has no batch dimension: only a constant can fill it"
                )
            if made.shape != info.shape:
                raise ModelError(
                    f"input {info.name!r} takes [batch, {', '.join(map(str, info.shape))}] but "
                    f"part {part.name!r} makes {out} of [batch, {', '.join(map(str, made.shape))}]"
                )
            if info.dtype not in DTYPES_OF_KIND[made.kind]:
                raise ModelError(
                    f"input {info.name!r} is {info.dtype} but part {part.name!r} makes {out} as "
                    f"{made.kind} values (it can feed {list(DTYPES_OF_KIND[made.kind])})"
                )
    for const in constants:
        claim(const.input.name, "a constant")
        _ = const.array  # the value fits the input
    missing = sorted(known - set(filled))
    if missing:
        raise ModelError(f"inputs {missing} are filled by no part and no constant")


def _part_from_dict(
    d: dict[str, Any], inputs: dict[str, InputInfo], base_dir: Path | None
) -> PartInfo:
    fills = []
    for input_name, out in d["inputs"].items():
        info = inputs.get(input_name)
        if info is None:
            raise ModelError(
                f"part {d['name']!r} fills {input_name!r}, which is not a model input "
                f"{sorted(inputs)}"
            )
        fills.append((info, str(out)))
    return PartInfo(str(d["name"]), transform_from_dict(d["transform"], base_dir), tuple(fills))


def _constant_from_dict(d: dict[str, Any], inputs: dict[str, InputInfo]) -> ConstantInfo:
    info = inputs.get(d["name"])
    if info is None:
        raise ModelError(f"constant {d['name']!r} is not a model input {sorted(inputs)}")
    return ConstantInfo(info, d["value"])


#: The one output a format-1 transform filled its input with.
_V1_OUTPUT = {"image": "pixels", "text": "input_ids", "audio": "features"}


def migrate_v1(d: dict[str, Any]) -> dict[str, Any]:
    """A format-1 manifest as format 2: each input its own part (named as the input),
    its ``preprocessing`` the part's transform; ``label_output`` holds probabilities."""
    out = {k: v for k, v in d.items() if k != "inputs"}
    out["format_version"] = 2
    out["inputs"] = [{k: i[k] for k in ("name", "dtype", "shape")} for i in d["inputs"]]
    out["parts"] = []
    for i in d["inputs"]:
        pre = dict(i["preprocessing"])
        kind = pre.get("kind")
        if kind not in _V1_OUTPUT:
            raise ModelError(
                f"unknown preprocessing kind {kind!r}; expected one of {sorted(_V1_OUTPUT)}"
            )
        transform = transform_from_dict(pre, legacy=True).to_dict()
        out["parts"].append(
            {"name": i["name"], "transform": transform, "inputs": {i["name"]: _V1_OUTPUT[kind]}}
        )
    label_output = d.get("label_output")
    out["outputs"] = [
        {**o, "kind": "probabilities" if o["name"] == label_output else "tensor"}
        for o in d["outputs"]
    ]
    return out


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_manifest(model_dir: Path, *, verify: bool = True) -> Manifest:
    """Read ``model_dir/manifest.json``; with ``verify``, check the sha256 of ``model.onnx``
    and of every listed file, and load what the transforms read (a tokenizer)."""
    path = Path(model_dir) / MANIFEST_FILE
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ModelError(f"no {MANIFEST_FILE} in {model_dir} (export a model first)") from exc
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ModelError(f"{path} must hold a JSON object")
    manifest = Manifest.from_dict(raw, Path(model_dir))
    if verify:
        for name, digest in [(MODEL_FILE, manifest.sha256), *manifest.files.items()]:
            file = Path(model_dir) / name
            if Path(name).name != name or not file.is_file():
                raise ModelError(f"no {name} in {model_dir}")
            actual = sha256_file(file)
            if actual != digest:
                raise ModelError(
                    f"{file} sha256 {actual[:12]}... does not match the manifest's "
                    f"{digest[:12]}...: refusing to load a model that was changed"
                )
        for part in manifest.parts:
            part.transform.load()
    return manifest
