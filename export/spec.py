"""The spec sidecar (``mmstream-spec.json``) and how it is fitted to a graph's inputs.

The sidecar says what a model file alone does not: the parts an event has, each
part's transform and the model inputs it fills, constants for inputs no part fills,
what each output is, the labels and the model card. ``mmstream train-reference``
writes one; a team bringing its own model writes its own (``docs/byom.md``)::

    {
      "name": "my-model", "version": "3",
      "parts": {
        "photo":   {"transform": {"kind": "image", "height": 224, "width": 224, ...},
                    "inputs": {"pixel_values": "pixels"}},
        "caption": {"transform": {"kind": "tokenizer", "file": "tokenizer.json",
                                  "max_length": 32},
                    "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask"}}
      },
      "constants": {"sample_rate": 16000},
      "outputs": {"logits": {"kind": "logits"}, "embedding": {"kind": "embedding"}},
      "labels": ["cat", "dog"], "label_output": "logits",
      "model_card": {}
    }

A part's ``inputs`` maps model input -> transform output; a list of input names is
short for: each name the transform makes fills the input of that name, and one other
name takes its main output (the first it makes: pixels, input_ids, features, waveform).
Files a transform reads (``tokenizer.json``) are found beside the sidecar and copied
into the model directory.
:func:`fit_inputs` matches all this against the graph's inputs, fixing dynamic
dimensions from the transforms; every refusal names the input and the mismatch.
The format-1 sidecar (``inputs: {name: {modality, preprocessing}}``) is still read.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from export import SIDECAR_FILE
from worker.contract.errors import STORAGE_ERRNOS, ExportError, ModelError, os_error
from worker.contract.manifest import (
    OUTPUT_KINDS,
    ConstantInfo,
    InputInfo,
    OutputInfo,
    PartInfo,
    check_fills,
    migrate_v1,
)
from worker.contract.transforms import DTYPES_OF_KIND, Transform, transform_from_dict

SPEC_HELP = (
    f"{SIDECAR_FILE} must be a JSON object with name, version, parts "
    '({part: {"transform": {"kind": ...}, "inputs": {model input: transform output}}}) '
    "and optionally constants, outputs, labels, label_output, model_card, accepts_missing; "
    "see docs/byom.md"
)
_KEYS = {
    "name",
    "version",
    "parts",
    "constants",
    "outputs",
    "labels",
    "label_output",
    "model_card",
    "accepts_missing",
}


@dataclass(frozen=True)
class SpecPart:
    """One part as the sidecar describes it: (model input, transform output) pairs."""

    name: str
    transform: Transform
    fills: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class GraphTensor:
    """A graph input or output as a framework reports it: dims are ints, or None/str
    for dynamic ones."""

    name: str
    dtype: str
    dims: tuple[int | str | None, ...]


@dataclass(frozen=True)
class Spec:
    """The parsed sidecar."""

    name: str
    version: str
    parts: tuple[SpecPart, ...]
    constants: dict[str, Any]
    outputs: dict[str, dict[str, Any]]
    labels: tuple[str, ...]
    label_output: str | None
    model_card: dict[str, Any]
    accepts_missing: bool = False
    base_dir: Path = field(default=Path("."))

    def files(self) -> dict[str, Path]:
        """File name -> path beside the sidecar, for every file a transform reads."""
        return {f: self.base_dir / f for p in self.parts for f in p.transform.files()}


def load_spec(path: Path) -> Spec:
    """Read and check a sidecar; any problem is an :class:`ExportError` naming what is wrong."""
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ExportError(f"no sidecar {path}: {SPEC_HELP}") from exc
    except OSError as exc:
        if exc.errno in STORAGE_ERRNOS:
            raise os_error(f"sidecar {path}", exc) from exc
        raise ExportError(f"cannot read sidecar {path}: {exc}; {SPEC_HELP}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ExportError(f"cannot read sidecar {path}: {exc}; {SPEC_HELP}") from exc
    if not isinstance(raw, dict):
        raise ExportError(f"sidecar {path} is not a JSON object; {SPEC_HELP}")
    try:
        return parse_spec(raw, path.parent)
    except ModelError as exc:
        raise ExportError(f"sidecar {path}: {exc}") from exc


def model_and_spec(
    model: str | Path,
    file_name: str,
    spec_path: str | Path | None,
    version: str | None,
    missing: str,
) -> tuple[Path, Spec, str]:
    """The model file (``model``, or ``file_name`` in it when it is a directory), its spec
    (``spec_path``, else the sidecar beside the model) and the version to serve
    (``version``, else the spec's). ``missing`` says what a missing model is, with
    ``{path}`` where it was looked for."""
    path = Path(model)
    if path.is_dir():
        path = path / file_name
    if not path.is_file():
        raise ExportError(missing.format(path=path))
    spec = load_spec(Path(spec_path) if spec_path else path.parent / SIDECAR_FILE)
    version = spec.version if version is None else version
    if not version:
        raise ExportError("the model version must not be empty")
    return path, spec, version


def parse_spec(raw: dict[str, Any], base_dir: Path) -> Spec:
    """The sidecar ``raw`` (format 1 or 2); ``base_dir``: where its files are."""
    if "parts" not in raw and "inputs" in raw:
        raw = _from_v1(raw)
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise ModelError(f"unknown keys {unknown}; {SPEC_HELP}")
    missing = [k for k in ("name", "version", "parts") if k not in raw]
    if missing:
        raise ModelError(f"lacks {missing}; {SPEC_HELP}")
    parts_raw = raw["parts"]
    if not isinstance(parts_raw, dict) or not parts_raw:
        raise ModelError(f"parts must be a non-empty object; {SPEC_HELP}")
    parts = tuple(_part(str(name), entry, base_dir) for name, entry in parts_raw.items())
    constants = raw.get("constants", {})
    outputs = raw.get("outputs", {})
    labels = raw.get("labels", [])
    card = raw.get("model_card", {})
    if not isinstance(constants, dict):
        raise ModelError("constants must be an object: {input name: value}")
    if not isinstance(outputs, dict) or not all(isinstance(v, dict) for v in outputs.values()):
        raise ModelError('outputs must be an object: {output name: {"kind": ...}}')
    for name, desc in outputs.items():
        if desc.get("kind", "tensor") not in OUTPUT_KINDS:
            raise ModelError(f"output {name!r}: kind must be one of {list(OUTPUT_KINDS)}")
        extra = sorted(set(desc) - {"kind", "labels", "thresholds", "from_logits", "description"})
        if extra:
            raise ModelError(f"output {name!r}: unknown keys {extra}")
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        raise ModelError("labels must be a list of strings")
    if not isinstance(card, dict):
        raise ModelError("model_card must be an object")
    label_output = raw.get("label_output")
    return Spec(
        name=str(raw["name"]),
        version=str(raw["version"]),
        parts=parts,
        constants=dict(constants),
        outputs={str(k): dict(v) for k, v in outputs.items()},
        labels=tuple(labels),
        label_output=None if label_output is None else str(label_output),
        model_card=card,
        accepts_missing=bool(raw.get("accepts_missing", False)),
        base_dir=base_dir,
    )


def _part(name: str, entry: Any, base_dir: Path) -> SpecPart:
    if not isinstance(entry, dict) or "transform" not in entry or "inputs" not in entry:
        raise ModelError(f'part {name!r} needs {{"transform": {{...}}, "inputs": {{...}}}}')
    extra = sorted(set(entry) - {"transform", "inputs"})
    if extra:
        raise ModelError(f"part {name!r}: unknown keys {extra}")
    try:
        transform = transform_from_dict(entry["transform"], base_dir)
    except ModelError as exc:
        raise ModelError(f"part {name!r}: {exc}") from exc
    inputs = entry["inputs"]
    made = list(transform.outputs())
    if isinstance(inputs, str):
        inputs = [inputs]
    if isinstance(inputs, list):
        # Shorthand: a name the transform makes fills the input of that name; another name
        # takes the transform's main output (the first: pixels, input_ids, features,
        # waveform), and only one name may.
        others = [i for i in inputs if i not in made]
        if len(others) > 1:
            raise ModelError(
                f"part {name!r}: transform {transform.kind!r} makes {made}; {others} cannot all "
                'take its main output: say which fills which, {"model input": "transform output"}'
            )
        inputs = {i: (i if i in made else made[0]) for i in inputs}
    if not isinstance(inputs, dict) or not inputs:
        raise ModelError(f"part {name!r}: inputs must name the model inputs it fills")
    for model_input, out in inputs.items():
        if out not in made:
            raise ModelError(
                f"part {name!r}: transform {transform.kind!r} makes {made}, not {out!r} "
                f"(for input {model_input!r})"
            )
    return SpecPart(name, transform, tuple((str(k), str(v)) for k, v in inputs.items()))


def _from_v1(raw: dict[str, Any]) -> dict[str, Any]:
    """A format-1 sidecar (one input per part, ``preprocessing`` per input) as format 2."""
    inputs = raw.get("inputs")
    if not isinstance(inputs, dict) or not inputs:
        raise ModelError(f"inputs must be a non-empty object; {SPEC_HELP}")
    as_manifest = {
        "inputs": [
            {
                "name": name,
                "dtype": "float32",
                "shape": [None],
                "preprocessing": entry.get("preprocessing"),
            }
            if isinstance(entry, dict)
            else {"name": name}
            for name, entry in inputs.items()
        ],
        "outputs": [],
    }
    for entry in as_manifest["inputs"]:
        if entry.get("preprocessing") is None:
            raise ModelError(f"input {entry['name']!r} needs a preprocessing object")
    try:
        parts = migrate_v1(as_manifest)["parts"]
    except (KeyError, TypeError, AttributeError) as exc:
        raise ModelError(f"a format-1 input is malformed: {exc}") from exc
    for name, entry in inputs.items():
        modality = entry.get("modality")
        kind = entry["preprocessing"].get("kind")
        if modality is not None and modality != kind:
            raise ModelError(f"input {name!r} has modality {modality!r} but {kind!r} preprocessing")
    out = {k: v for k, v in raw.items() if k != "inputs"}
    out["parts"] = {p["name"]: {"transform": p["transform"], "inputs": p["inputs"]} for p in parts}
    if raw.get("label_output"):
        out.setdefault("outputs", {raw["label_output"]: {"kind": "probabilities"}})
    return out


# ---------------------------------------------------------------- fitting to a graph


def fit_inputs(
    spec: Spec, graph_inputs: Sequence[GraphTensor]
) -> tuple[tuple[InputInfo, ...], tuple[PartInfo, ...], tuple[ConstantInfo, ...]]:
    """The manifest's inputs, parts and constants for a graph with ``graph_inputs``.

    Every graph input must be filled by exactly one part output or one constant. A
    part-filled input has a dynamic first (batch) dimension and the transform output's
    shape after it (dynamic dimensions take the transform's sizes); its dtype must take
    the output's kind. A constant fills a batched input (dynamic first dimension) or an
    unbatched one (all dimensions fixed); its value must fit.
    """
    by_name = {g.name: g for g in graph_inputs}
    filled: dict[str, str] = {}

    def claim(input_name: str, by: str) -> GraphTensor:
        g = by_name.get(input_name)
        if g is None:
            raise ExportError(
                f"{by} fills {input_name!r}, which is not a model input "
                f"(the model takes {sorted(by_name)})"
            )
        if input_name in filled:
            raise ExportError(
                f"input {input_name!r} is filled twice: by {filled[input_name]} and {by}"
            )
        filled[input_name] = by
        return g

    for part in spec.parts:
        for input_name, _ in part.fills:
            claim(input_name, f"part {part.name!r}")
    for input_name in spec.constants:
        claim(input_name, "a constant")
    infos: dict[str, InputInfo] = {}
    for part in spec.parts:
        outputs = part.transform.outputs()
        for input_name, out in part.fills:
            made = outputs[out]
            infos[input_name] = _fit_part_input(
                by_name[input_name], part, out, made.shape, made.kind
            )
    for input_name, value in spec.constants.items():
        infos[input_name] = _fit_constant(by_name[input_name], value)
    unfilled = [g.name for g in graph_inputs if g.name not in filled]
    if unfilled:
        first = by_name[unfilled[0]]
        raise ExportError(
            f"model input {unfilled[0]!r} ({_show(first)}) is filled by no part "
            f"and no constant"
            + (f" (nor are {unfilled[1:]})" if len(unfilled) > 1 else "")
            + ': add it to a part\'s "inputs" or to "constants"'
        )
    inputs = tuple(infos[g.name] for g in graph_inputs)
    parts = tuple(
        PartInfo(p.name, p.transform, tuple((infos[i], o) for i, o in p.fills)) for p in spec.parts
    )
    constants = tuple(ConstantInfo(infos[name], _value(v)) for name, v in spec.constants.items())
    try:
        check_fills(inputs, parts, constants)
    except ModelError as exc:
        raise ExportError(str(exc)) from exc
    return inputs, parts, constants


def _fit_part_input(
    g: GraphTensor, part: SpecPart, out: str, shape: tuple[int, ...], kind: str
) -> InputInfo:
    where = f"input {g.name!r} ({_show(g)}), filled by part {part.name!r} {out}"
    if len(g.dims) != len(shape) + 1:
        raise ExportError(
            f"{where}: the graph has {len(g.dims)} dimensions but the transform makes "
            f"[batch, {', '.join(map(str, shape))}]"
        )
    if isinstance(g.dims[0], int):
        raise ExportError(
            f"{where}: the batch dimension is fixed at {g.dims[0]}; the worker runs batches: "
            "export the graph with a dynamic first dimension"
        )
    for k, (dim, want) in enumerate(zip(g.dims[1:], shape, strict=True), start=1):
        if isinstance(dim, int) and dim != want:
            raise ExportError(
                f"{where}: dimension {k} is {dim} in the graph but the transform makes {want} "
                f"(transform output [batch, {', '.join(map(str, shape))}])"
            )
    if g.dtype not in DTYPES_OF_KIND[kind]:
        raise ExportError(
            f"{where}: the graph wants {g.dtype} but the transform makes {kind} values "
            f"(which feed {list(DTYPES_OF_KIND[kind])})"
        )
    return InputInfo(g.name, g.dtype, shape)


def _show(g: GraphTensor) -> str:
    """``float32[batch, 3, 224, 224]``: a graph tensor as a refusal names it."""
    return f"{g.dtype}[{', '.join('?' if d is None else str(d) for d in g.dims)}]"


def _value(v: Any) -> Any:
    return v["value"] if isinstance(v, dict) else v


def _fit_constant(g: GraphTensor, v: Any) -> InputInfo:
    given = v.get("shape") if isinstance(v, dict) else None
    value = _value(v)
    batched = bool(g.dims) and not isinstance(g.dims[0], int)
    rest = g.dims[1:] if batched else g.dims
    if given is not None:
        if (
            not isinstance(given, list)
            or len(given) != len(rest)
            or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in given)
        ):
            raise ExportError(
                f"constant {g.name!r}: shape {given} is not positive ints matching the "
                f"graph's {_show(g)}"
            )
        shape = tuple(given)
    else:
        if not all(isinstance(d, int) for d in rest):
            raise ExportError(
                f"constant {g.name!r}: the graph's {_show(g)} has dynamic dimensions "
                'after the first: give {"value": ..., "shape": [...]}'
            )
        shape = tuple(int(d) for d in rest)  # type: ignore[arg-type]
    info = InputInfo(g.name, g.dtype, shape, batched=batched)
    try:
        _ = ConstantInfo(info, value).array
    except ModelError as exc:
        raise ExportError(str(exc)) from exc
    return info


def output_infos(
    spec: Spec, graph_outputs: Sequence[GraphTensor], shapes: dict[str, tuple[int, ...]]
) -> tuple[OutputInfo, ...]:
    """The manifest's outputs: the graph's, with their per-example ``shapes`` (as a run
    gave them) and the sidecar's descriptions. (The label output and its labels are the
    manifest's to check.)"""
    names = [g.name for g in graph_outputs]
    unknown = sorted(set(spec.outputs) - set(names))
    if unknown:
        raise ExportError(f"outputs {unknown} in the sidecar are not model outputs {names}")
    outs = []
    for g in graph_outputs:
        desc = spec.outputs.get(g.name, {})
        kind = desc.get("kind", "probabilities" if g.name == spec.label_output else "tensor")
        thresholds = desc.get("thresholds", [])
        try:
            outs.append(
                OutputInfo(
                    name=g.name,
                    dtype=g.dtype,
                    shape=shapes[g.name],
                    kind=kind,
                    labels=tuple(str(x) for x in desc.get("labels", ())),
                    thresholds=tuple(float(x) for x in thresholds),
                    from_logits=bool(desc.get("from_logits", False)),
                    description=str(desc.get("description", "")),
                )
            )
        except (ModelError, TypeError, ValueError) as exc:
            raise ExportError(f"output {g.name!r}: {exc}") from exc
    return tuple(outs)


# ---------------------------------------------------------------- generated inputs


def sample_feed(
    parts: Sequence[PartInfo],
    constants: Sequence[ConstantInfo],
    batch_size: int,
    seed: int,
    *,
    through_bytes: bool = False,
) -> dict[str, NDArray[Any]]:
    """A batch for every model input, made by the transforms from generated media.

    Row 0 is every part's blank media (black image, empty text, silence); the other
    rows are random valid media (:meth:`Transform.sample_media`). With
    ``through_bytes`` each medium is first encoded and decoded as a record's value
    would be (the smoke run's way: the decoders run too).
    """
    from worker.contract.transforms import Limits

    rng = np.random.default_rng(seed)
    feed: dict[str, NDArray[Any]] = {}
    for part in parts:
        t = part.transform
        media = [t.blank_media(), *(t.sample_media(rng) for _ in range(batch_size - 1))]
        if through_bytes:
            media = [_round_trip(t, m, Limits()) for m in media]
        feed.update(part.fill(t.apply_batch(media[:batch_size])))
    for const in constants:
        value = const.array
        info = const.input
        feed[info.name] = (
            np.ascontiguousarray(np.broadcast_to(value, (batch_size, *info.shape)))
            if info.batched
            else value
        )
    return feed


def _round_trip(t: Transform, media: Any, limits: Any) -> Any:
    """``media`` encoded in its family's first content type, then decoded by ``t``."""
    from worker.contract.transforms.media import ENCODINGS, encode_media, media_type

    ctype = ENCODINGS[t.family][0]
    main, params = media_type(ctype)
    return t.decode(encode_media(media, ctype), main, params, limits)
