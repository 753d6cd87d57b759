"""Keras -> ONNX export with a parity check: the model directory the worker serves.

:func:`export_model` reads ``model.keras`` and its sidecar ``mmstream-spec.json``
(input specs, labels, model card), converts the model with tf2onnx, runs the
same random-but-valid batches through Keras and ONNX Runtime (CPU), and only if
they agree within ``tolerance`` writes ``model.onnx`` and ``manifest.json``.
With ``fp16=True`` the checked FP32 graph is then converted to FP16 weights and
compute (inputs and outputs stay float32) and served only if its argmax agrees
with the FP32 graph's on at least :data:`FP16_MIN_AGREEMENT` of the parity
inputs and further batches from the same generator (:data:`FP16_MIN_ROWS` in all).
Everything is written into a temporary directory beside ``out_dir`` and renamed
into place at the end, so a failed export never leaves a half-written directory.
Every failure is one :class:`~worker.contract.errors.ExportError` line (exit 2), except
a full disk, quota or I/O error while writing: a ``StorageError`` (exit 1).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from export import KERAS_FILE, SIDECAR_FILE
from worker.contract.errors import (
    STORAGE_ERRNOS,
    ExportError,
    ModelError,
    one_line,
    os_error,
)
from worker.contract.manifest import (
    MANIFEST_FILE,
    MODEL_FILE,
    InputInfo,
    Manifest,
    OutputInfo,
    sha256_file,
)
from worker.contract.preprocess import AudioSpec, ImageSpec, Spec, TextSpec, log_mel, spec_from_dict

log = logging.getLogger(__name__)

#: tf2onnx 1.17 converts to opsets up to 18 ("Opset 19 is not supported yet").
MAX_OPSET = 18
MIN_OPSET = 7  # the manifest schema's minimum
PARITY_SEED = 1234
#: An FP16 export must give the FP32 graph's argmax on at least this share of examples...
FP16_MIN_AGREEMENT = 0.995
#: ... counted over at least this many examples: the parity batches, then more batches of
#: ``FP16_EXTRA_BATCH`` from the same generator (with the 40 default parity examples,
#: 99.5% would mean "no flip at all", and random inputs hold a near-tie now and then).
FP16_MIN_ROWS = 1000
FP16_EXTRA_BATCH = 32

_ORT_DTYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
}
_SIDECAR_HELP = (
    f"{SIDECAR_FILE} must be a JSON object with: name (str), version (str), inputs "
    '({input name: {"modality": "image"|"text"|"audio", "preprocessing": spec.to_dict()}}), '
    "labels (list of str), label_output (output name) and model_card (object); "
    "`mmstream train-reference` writes one beside model.keras"
)


@dataclass(frozen=True)
class SidecarInput:
    """One model input as the sidecar describes it."""

    name: str
    modality: str
    spec: Spec


@dataclass(frozen=True)
class Sidecar:
    """The parsed ``mmstream-spec.json``: what Keras alone does not know about the model."""

    name: str
    version: str
    inputs: tuple[SidecarInput, ...]
    labels: tuple[str, ...]
    label_output: str | None
    model_card: dict[str, Any]
    accepts_missing: bool = False


@dataclass(frozen=True)
class ParityResult:
    """Keras vs ONNX Runtime on the same inputs."""

    max_abs_diff: float
    argmax_agreement: float
    batch_sizes: tuple[int, ...]
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_abs_diff": self.max_abs_diff,
            "tolerance": self.tolerance,
            "batch_sizes": list(self.batch_sizes),
            "argmax_agreement": self.argmax_agreement,
            "passed": self.passed,
        }


@dataclass(frozen=True)
class Fp16Result:
    """FP16 vs FP32 ONNX graph, both in ONNX Runtime (CPU), on the parity inputs and more.

    ``batch_sizes`` are the parity batches; ``rows`` counts all examples compared.
    """

    max_abs_diff: float
    argmax_agreement: float
    batch_sizes: tuple[int, ...]
    min_agreement: float
    rows: int

    @property
    def passed(self) -> bool:
        return self.argmax_agreement >= self.min_agreement

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_abs_diff": self.max_abs_diff,
            "argmax_agreement": self.argmax_agreement,
            "min_agreement": self.min_agreement,
            "batch_sizes": list(self.batch_sizes),
            "rows": self.rows,
            "passed": self.passed,
        }


# ---------------------------------------------------------------- sidecar


def load_sidecar(path: Path) -> Sidecar:
    """Read and check a sidecar; any problem is an :class:`ExportError` naming what is needed."""
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ExportError(f"no sidecar {path}: {_SIDECAR_HELP}") from exc
    except OSError as exc:
        if exc.errno in STORAGE_ERRNOS:
            raise os_error(f"sidecar {path}", exc) from exc
        raise ExportError(f"cannot read sidecar {path}: {exc}; {_SIDECAR_HELP}") from exc
    except json.JSONDecodeError as exc:
        raise ExportError(f"cannot read sidecar {path}: {exc}; {_SIDECAR_HELP}") from exc
    if not isinstance(raw, dict):
        raise ExportError(f"sidecar {path} is not a JSON object; {_SIDECAR_HELP}")
    missing = [k for k in ("name", "version", "inputs", "labels", "label_output") if k not in raw]
    if missing:
        raise ExportError(f"sidecar {path} lacks {missing}; {_SIDECAR_HELP}")
    inputs_raw = raw["inputs"]
    if not isinstance(inputs_raw, dict) or not inputs_raw:
        raise ExportError(f"sidecar {path}: inputs must be a non-empty object; {_SIDECAR_HELP}")
    inputs = []
    for name, entry in inputs_raw.items():
        if not isinstance(entry, dict) or "preprocessing" not in entry:
            raise ExportError(f"sidecar {path}: input {name!r} needs a preprocessing object")
        try:
            spec = spec_from_dict(entry["preprocessing"])
        except (ModelError, TypeError, AttributeError) as exc:
            raise ExportError(f"sidecar {path}: input {name!r}: {exc}") from exc
        modality = str(entry.get("modality", spec.kind))
        if modality != spec.kind:
            raise ExportError(
                f"sidecar {path}: input {name!r} has modality {modality!r} but "
                f"{spec.kind!r} preprocessing"
            )
        inputs.append(SidecarInput(str(name), modality, spec))
    labels = raw["labels"]
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        raise ExportError(f"sidecar {path}: labels must be a list of strings")
    card = raw.get("model_card", {})
    if not isinstance(card, dict):
        raise ExportError(f"sidecar {path}: model_card must be an object")
    label_output = raw["label_output"]
    return Sidecar(
        name=str(raw["name"]),
        version=str(raw["version"]),
        inputs=tuple(inputs),
        labels=tuple(labels),
        label_output=None if label_output is None else str(label_output),
        model_card=card,
        accepts_missing=bool(raw.get("accepts_missing", False)),
    )


# ---------------------------------------------------------------- parity inputs


def parity_inputs(
    inputs: Sequence[SidecarInput], dtypes: Mapping[str, str], batch_size: int, seed: int
) -> dict[str, NDArray[Any]]:
    """A random but valid batch for every input.

    Images uniform in ``[0, 255 * scale]``; token ids uniform in
    ``[0, len(vocabulary))``; audio the real log-mel of noise of random level.
    Row 0 is an "absent" example (all-padding text, silent audio, zero image).
    """
    rng = np.random.default_rng(seed)
    feed: dict[str, NDArray[Any]] = {}
    for item in inputs:
        spec, dtype = item.spec, np.dtype(dtypes[item.name])
        if isinstance(spec, ImageSpec):
            arr: NDArray[Any] = rng.uniform(0.0, 255.0 * spec.scale, (batch_size, *spec.shape()))
            arr[0] = 0.0
        elif isinstance(spec, TextSpec):
            arr = rng.integers(0, len(spec.vocabulary), (batch_size, *spec.shape()))
            arr[0] = spec.pad_id
        elif isinstance(spec, AudioSpec):
            level = rng.uniform(0.0, 0.5, (batch_size, 1))
            level[0] = 0.0
            waves = (rng.standard_normal((batch_size, spec.num_samples)) * level).astype(np.float32)
            arr = log_mel(waves, spec)
        else:  # pragma: no cover - Spec is a closed union
            raise ExportError(f"input {item.name!r}: unsupported spec {type(spec).__name__}")
        feed[item.name] = np.ascontiguousarray(arr, dtype=dtype)
    return feed


def _keras_outputs(model: Any, feed: Mapping[str, NDArray[Any]]) -> dict[str, NDArray[Any]]:
    result = model.predict_on_batch(dict(feed))
    names = list(model.output_names)
    if isinstance(result, dict):
        return {str(k): np.asarray(v) for k, v in result.items()}
    if isinstance(result, list | tuple):
        return {n: np.asarray(v) for n, v in zip(names, result, strict=True)}
    return {names[0]: np.asarray(result)}


def check_parity(
    model: Any,
    session: Any,
    inputs: Sequence[SidecarInput],
    *,
    batch_sizes: Sequence[int],
    tolerance: float,
    label_output: str | None,
) -> ParityResult:
    """Run Keras and ONNX Runtime on the same batches; compare every output.

    ORT is fed by input name with the dtypes the ONNX model declares. Keras
    outputs are matched to ONNX outputs by name, or by position when the names
    differ. Non-finite outputs fail the check.
    """
    dtypes = {i.name: _ORT_DTYPES.get(i.type, "") for i in session.get_inputs()}
    onnx_names = [o.name for o in session.get_outputs()]
    max_diff = 0.0
    agree = rows = 0
    for k, batch in enumerate(batch_sizes):
        feed = parity_inputs(inputs, dtypes, batch, PARITY_SEED + k)
        ort_out = dict(zip(onnx_names, session.run(onnx_names, feed), strict=True))
        keras_out = _keras_outputs(model, feed)
        if set(keras_out) != set(ort_out):
            keras_out = dict(zip(onnx_names, keras_out.values(), strict=True))
        for name in onnx_names:
            ref, got = keras_out[name].astype(np.float64), ort_out[name].astype(np.float64)
            if ref.shape != got.shape:
                raise ExportError(
                    f"parity: output {name!r} has shape {got.shape} in ONNX Runtime but "
                    f"{ref.shape} in Keras (batch {batch})"
                )
            if not (np.isfinite(ref).all() and np.isfinite(got).all()):
                raise ExportError(
                    f"parity: output {name!r} is not finite at batch {batch} "
                    "(row 0 is an all-absent example: does the model divide by a zero count?)"
                )
            max_diff = max(max_diff, float(np.max(np.abs(ref - got))))
            if name == (label_output or onnx_names[0]):
                agree += int(np.sum(np.argmax(ref, -1) == np.argmax(got, -1)))
                rows += int(np.prod(ref.shape[:-1]))
    return ParityResult(
        max_abs_diff=max_diff,
        argmax_agreement=agree / rows if rows else 1.0,
        batch_sizes=tuple(batch_sizes),
        tolerance=tolerance,
    )


def check_fp16(
    session32: Any,
    session16: Any,
    inputs: Sequence[SidecarInput],
    *,
    batch_sizes: Sequence[int],
    min_agreement: float,
    label_output: str | None,
    min_rows: int = FP16_MIN_ROWS,
) -> Fp16Result:
    """Run the FP32 and FP16 graphs on the same batches; compare every output.

    The batches are the parity batches (same seeds, so the same inputs), then
    batches of :data:`FP16_EXTRA_BATCH` from the same generator until ``min_rows``
    examples were compared. The max abs diff is over all outputs; the argmax
    agreement is on ``label_output`` (default: the first output). Non-finite FP16
    outputs (an overflow) fail the check.
    """
    dtypes = {i.name: _ORT_DTYPES.get(i.type, "") for i in session32.get_inputs()}
    names = [o.name for o in session32.get_outputs()]
    sizes = list(batch_sizes)
    extra = max(0, min_rows - sum(sizes))
    sizes += [FP16_EXTRA_BATCH] * -(-extra // FP16_EXTRA_BATCH)
    max_diff = 0.0
    agree = rows = 0
    for k, batch in enumerate(sizes):
        feed = parity_inputs(inputs, dtypes, batch, PARITY_SEED + k)
        ref_out = session32.run(names, feed)
        got_out = session16.run(names, feed)
        for name, ref32, got16 in zip(names, ref_out, got_out, strict=True):
            ref, got = np.asarray(ref32, np.float64), np.asarray(got16, np.float64)
            if ref.shape != got.shape:
                raise ExportError(
                    f"fp16 check: output {name!r} has shape {got.shape} in FP16 but "
                    f"{ref.shape} in FP32 (batch {batch})"
                )
            if not np.isfinite(got).all():
                raise ExportError(
                    f"fp16 check: output {name!r} of the FP16 model is not finite at batch "
                    f"{batch} (an FP16 overflow?); export without --fp16"
                )
            max_diff = max(max_diff, float(np.max(np.abs(ref - got))))
            if name == (label_output or names[0]):
                agree += int(np.sum(np.argmax(ref, -1) == np.argmax(got, -1)))
                rows += int(np.prod(ref.shape[:-1]))
    return Fp16Result(
        max_abs_diff=max_diff,
        argmax_agreement=agree / rows if rows else 1.0,
        batch_sizes=tuple(batch_sizes),
        min_agreement=min_agreement,
        rows=sum(sizes),
    )


# ---------------------------------------------------------------- export


def _check_args(opset: int, tolerance: float, batch_sizes: Sequence[int]) -> None:
    if opset > MAX_OPSET:
        raise ExportError(
            f"opset {opset} is not supported: tf2onnx converts to opset <= {MAX_OPSET} "
            f"(and the manifest schema allows at most {MAX_OPSET}); "
            f"use --opset {MAX_OPSET} or lower"
        )
    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset} is not supported; use {MIN_OPSET}..{MAX_OPSET}")
    if not tolerance > 0:
        raise ExportError(f"tolerance must be > 0, not {tolerance}")
    if not batch_sizes or any(b < 1 for b in batch_sizes):
        raise ExportError(f"parity batch sizes must be >= 1, got {list(batch_sizes)}")


def _check_out_dir(out: Path) -> None:
    """``out`` may be absent, empty or a previous export (manifest.json and model.onnx only)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ExportError(f"output {out} exists and is not a directory")
    extra = sorted(p.name for p in out.iterdir() if p.name not in (MANIFEST_FILE, MODEL_FILE))
    if extra:
        raise ExportError(
            f"refusing to replace {out}: it holds files other than an export ({extra[:5]}); "
            "choose an empty or new directory"
        )


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move ``tmp`` to ``out``, replacing a previous export there."""
    if not out.exists():
        tmp.rename(out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    old.rmdir()
    out.rename(old)
    try:
        tmp.rename(out)
    except OSError:
        old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _producer() -> dict[str, str]:
    import keras
    import onnx
    import onnxruntime
    import tensorflow as tf
    import tf2onnx

    return {
        "tensorflow": str(tf.__version__),
        "keras": str(keras.__version__),
        "tf2onnx": str(tf2onnx.__version__),
        "onnx": str(onnx.__version__),
        "onnxruntime": str(onnxruntime.__version__),
    }


def _load_keras(path: Path) -> Any:
    import keras

    import export.reference_model  # noqa: F401  (registers the reference model's layers)

    try:
        return keras.saving.load_model(path, compile=False)
    except Exception as exc:  # keras raises many types for a bad file
        raise ExportError(f"cannot load Keras model {path}: {type(exc).__name__}: {exc}") from exc


def _check_model_inputs(model: Any, side: Sidecar) -> dict[str, str]:
    """Model input name -> dtype; the names and shapes must be the sidecar's."""
    model_inputs = {str(t.name): t for t in model.inputs}
    wanted = [i.name for i in side.inputs]
    if set(model_inputs) != set(wanted):
        raise ExportError(
            f"the Keras model's inputs {sorted(model_inputs)} are not "
            f"the sidecar's {sorted(wanted)}"
        )
    for item in side.inputs:
        shape = tuple(model_inputs[item.name].shape[1:])
        if shape != item.spec.shape():
            raise ExportError(
                f"input {item.name!r}: the Keras model takes {list(shape)} per example but its "
                f"preprocessing gives {list(item.spec.shape())}"
            )
    return {name: str(np.dtype(t.dtype)) for name, t in model_inputs.items()}


def _convert(model: Any, dtypes: Mapping[str, str], side: Sidecar, opset: int, path: Path) -> None:
    import tensorflow as tf
    import tf2onnx

    signature = {
        item.name: tf.TensorSpec((None, *item.spec.shape()), dtypes[item.name], name=item.name)
        for item in side.inputs
    }
    try:
        tf2onnx.convert.from_keras(
            model, input_signature=[signature], opset=opset, output_path=str(path)
        )
    except Exception as exc:  # tf2onnx raises many types
        if isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS:
            raise  # a full disk writing model.onnx: export_model reports it
        raise ExportError(f"tf2onnx conversion failed: {type(exc).__name__}: {exc}") from exc


def _convert_fp16(src: Path, dst: Path) -> None:
    """Write ``src`` with FP16 weights and compute to ``dst``; graph inputs/outputs stay float32.

    Ops on the converter's default block list stay float32 (with Casts around them).
    No further block list is needed for CPU: where ONNX Runtime's CPU provider has
    no FP16 kernel, its graph optimiser wraps the node in float32 Casts (the export
    loads and checks the FP16 model on CPU, so a model that does not run fails here).
    """
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    try:
        model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
        onnx.save(model, str(dst))
    except Exception as exc:  # the converter raises many types (and asserts)
        if isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS:
            raise  # a full disk writing the FP16 model: export_model reports it
        raise ExportError(f"FP16 conversion failed: {type(exc).__name__}: {exc}") from exc


def _ort_session(path: Path, what: str) -> Any:
    """An ONNX Runtime (CPU) session on ``path``; a load failure is one ExportError line.

    ``what`` names the model in the message (e.g. "the converted model").
    """
    import onnxruntime as ort

    try:
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own untyped exceptions
        raise ExportError(
            one_line(f"{what} does not load in ONNX Runtime (CPU): {type(exc).__name__}: {exc}")
        ) from exc


def _ort_dtype(name: str, ort_type: str) -> str:
    dtype = _ORT_DTYPES.get(ort_type)
    if dtype is None:
        raise ExportError(f"ONNX tensor {name!r} has unsupported type {ort_type}")
    return dtype


def _manifest_io(
    session: Any, side: Sidecar, keras_out_shapes: Mapping[str, tuple[int, ...]]
) -> tuple[tuple[InputInfo, ...], tuple[OutputInfo, ...]]:
    onnx_inputs = {i.name: i for i in session.get_inputs()}
    wanted = [i.name for i in side.inputs]
    if set(onnx_inputs) != set(wanted):
        raise ExportError(f"ONNX inputs {sorted(onnx_inputs)} are not the sidecar's {wanted}")
    inputs = []
    for item in side.inputs:  # sidecar order; names are the ONNX names
        onnx_in = onnx_inputs[item.name]
        dims = tuple(onnx_in.shape[1:])
        if any(isinstance(d, int) for d in dims) and dims != item.spec.shape():
            raise ExportError(
                f"ONNX input {item.name!r} has shape {onnx_in.shape}, expected "
                f"[batch, {', '.join(map(str, item.spec.shape()))}]"
            )
        inputs.append(
            InputInfo(
                name=item.name,
                modality=item.modality,
                dtype=_ort_dtype(item.name, onnx_in.type),
                shape=item.spec.shape(),
                preprocessing=item.spec,
            )
        )
    outputs = []
    fallback = list(keras_out_shapes.values())
    for k, onnx_out in enumerate(session.get_outputs()):
        dims = tuple(onnx_out.shape[1:])
        if not all(isinstance(d, int) and d > 0 for d in dims):
            dims = keras_out_shapes.get(onnx_out.name, fallback[k] if k < len(fallback) else ())
        outputs.append(
            OutputInfo(onnx_out.name, _ort_dtype(onnx_out.name, onnx_out.type), tuple(dims))
        )
    names = [o.name for o in outputs]
    if side.label_output is not None:
        label_out = next((o for o in outputs if o.name == side.label_output), None)
        if label_out is None:
            raise ExportError(
                f"label_output {side.label_output!r} is not an ONNX output (outputs: {names})"
            )
        if side.labels and label_out.shape[-1:] != (len(side.labels),):
            raise ExportError(
                f"{len(side.labels)} labels but output {label_out.name!r} has shape "
                f"{[None, *label_out.shape]}"
            )
    return tuple(inputs), tuple(outputs)


def export_model(
    keras_model_path: str | Path,
    out_dir: str | Path,
    *,
    spec_path: str | Path | None = None,
    opset: int = 17,
    parity_batch_sizes: Sequence[int] = (1, 7, 32),
    tolerance: float = 1e-4,
    version: str | None = None,
    fp16: bool = False,
) -> Manifest:
    """Convert ``model.keras`` to ``out_dir/model.onnx`` + ``out_dir/manifest.json``.

    Args:
        keras_model_path: the ``.keras`` file, or a directory holding ``model.keras``.
        out_dir: the model directory to write; it may not exist yet, be empty or
            hold a previous export (which is replaced).
        spec_path: the sidecar; default ``mmstream-spec.json`` beside the model.
        opset: ONNX opset, at most 18.
        parity_batch_sizes, tolerance: Keras vs ONNX Runtime must agree within
            ``tolerance`` (max abs diff) on random valid batches of these sizes.
        version: overrides the sidecar's model version.
        fp16: serve FP16 weights and compute (float32 inputs and outputs); the FP16
            graph's argmax must agree with the FP32 graph's on at least
            :data:`FP16_MIN_AGREEMENT` of :data:`FP16_MIN_ROWS` examples (the parity
            batches, then more from the same generator).

    Raises:
        ExportError: bad arguments or sidecar, conversion failure, ONNX Runtime cannot
            load the converted model, parity not met, ``out_dir`` cannot be written.
        StorageError: a full disk, exceeded quota or I/O error while writing.
    """
    _check_args(opset, tolerance, parity_batch_sizes)
    model_path = Path(keras_model_path)
    if model_path.is_dir():
        model_path = model_path / KERAS_FILE
    if not model_path.is_file():
        raise ExportError(f"no Keras model at {model_path} (run `mmstream train-reference` first)")
    side = load_sidecar(Path(spec_path) if spec_path else model_path.parent / SIDECAR_FILE)
    version = side.version if version is None else version
    if not version:
        raise ExportError("the model version must not be empty")
    out = Path(out_dir).resolve()
    _check_out_dir(out)

    started = time.perf_counter()
    model = _load_keras(model_path)
    dtypes = _check_model_inputs(model, side)
    keras_out_shapes = {
        str(name): tuple(int(d) for d in t.shape[1:])
        for name, t in zip(model.output_names, model.outputs, strict=True)
    }

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    except OSError as exc:
        raise os_error(f"export to {str(out)!r}", exc, input_error=ExportError) from exc
    try:
        onnx_path = tmp / MODEL_FILE
        _convert(model, dtypes, side, opset, onnx_path)
        session = _ort_session(onnx_path, "the converted model")
        inputs, outputs = _manifest_io(session, side, keras_out_shapes)
        parity = check_parity(
            model,
            session,
            side.inputs,
            batch_sizes=parity_batch_sizes,
            tolerance=tolerance,
            label_output=side.label_output,
        )
        if not parity.passed:
            raise ExportError(
                f"parity failed: Keras vs ONNX Runtime max abs diff {parity.max_abs_diff:.3g} > "
                f"tolerance {tolerance:.3g} (argmax agreement {parity.argmax_agreement:.4f}, "
                f"batch sizes {list(parity_batch_sizes)}); nothing was written to {out}"
            )
        fp16_result = None
        if fp16:
            fp16_result = _make_fp16(
                onnx_path, session, side, keras_out_shapes, (inputs, outputs), parity_batch_sizes
            )
            if not fp16_result.passed:
                raise ExportError(
                    f"fp16 check failed: argmax agreement with the FP32 model "
                    f"{fp16_result.argmax_agreement:.4f} < {fp16_result.min_agreement:.4f} "
                    f"on {fp16_result.rows} examples (max abs diff "
                    f"{fp16_result.max_abs_diff:.3g}); export without --fp16; "
                    f"nothing was written to {out}"
                )
        manifest = Manifest(
            name=side.name,
            version=version,
            sha256=sha256_file(onnx_path),
            opset=opset,
            inputs=inputs,
            outputs=outputs,
            labels=side.labels,
            label_output=side.label_output,
            producer=_producer(),
            parity=parity.to_dict(),
            model_card=side.model_card,
            accepts_missing=side.accepts_missing,
            precision="fp16" if fp16 else "fp32",
            fp16_parity=fp16_result.to_dict() if fp16_result else {},
        )
        manifest.write(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        _replace_dir(tmp, out)
    except OSError as exc:  # writing the model, the manifest, or renaming into place
        shutil.rmtree(tmp, ignore_errors=True)
        raise os_error(f"export to {str(out)!r}", exc, input_error=ExportError) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info(
        "exported %s %s to %s in %.1f s (opset %d, %s, parity max abs diff %.3g, sha256 %s)",
        manifest.name,
        manifest.version,
        out,
        time.perf_counter() - started,
        opset,
        manifest.precision,
        parity.max_abs_diff,
        manifest.sha256[:12],
    )
    return manifest


def _make_fp16(
    onnx_path: Path,
    session32: Any,
    side: Sidecar,
    keras_out_shapes: Mapping[str, tuple[int, ...]],
    io: tuple[tuple[InputInfo, ...], tuple[OutputInfo, ...]],
    batch_sizes: Sequence[int],
) -> Fp16Result:
    """Replace the checked FP32 ``onnx_path`` by its FP16 conversion; return FP16 vs FP32."""
    fp16_path = onnx_path.with_name(f"fp16-{onnx_path.name}")
    _convert_fp16(onnx_path, fp16_path)
    session16 = _ort_session(fp16_path, "the FP16 model")
    if _manifest_io(session16, side, keras_out_shapes) != io:
        raise ExportError(
            "the FP16 model's inputs or outputs differ from the FP32 model's "
            "(they must stay float32, same names and shapes)"
        )
    result = check_fp16(
        session32,
        session16,
        side.inputs,
        batch_sizes=batch_sizes,
        min_agreement=FP16_MIN_AGREEMENT,
        label_output=side.label_output,
    )
    size32, size16 = onnx_path.stat().st_size, fp16_path.stat().st_size
    log.info(
        "fp16 vs fp32 on %d examples: argmax agreement %.4f (min %.4f), max abs diff %.3g; "
        "model.onnx %d -> %d bytes",
        result.rows,
        result.argmax_agreement,
        result.min_agreement,
        result.max_abs_diff,
        size32,
        size16,
    )
    os.replace(fp16_path, onnx_path)
    return result
