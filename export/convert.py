"""Keras -> ONNX export with a parity check: the model directory the worker serves.

:func:`export_model` reads ``model.keras`` and its spec sidecar ``mmstream-spec.json``
(:mod:`export.spec`: parts, transforms, constants, outputs, labels, model card),
fits the sidecar to the model's inputs, converts the model with tf2onnx, runs the
same batches (made by the transforms from generated media) through Keras and ONNX
Runtime (CPU), and only if they agree within ``tolerance`` writes ``model.onnx``,
the files the transforms read (a ``tokenizer.json``) and ``manifest.json``.
With ``fp16=True`` the checked FP32 graph is then converted to FP16 weights and
compute (inputs and outputs stay float32) and served only if its argmax agrees
with the FP32 graph's on at least :data:`FP16_MIN_AGREEMENT` of the parity
inputs and further batches from the same generator (:data:`FP16_MIN_ROWS` in all).
A model that is already ONNX goes through :mod:`export.onnx_import` instead.
Every failure is one :class:`~worker.contract.errors.ExportError` line (exit 2), except
a full disk, quota or I/O error while writing: a ``StorageError`` (exit 1).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from export import KERAS_FILE
from export.modeldir import (
    copy_files,
    graph_tensors,
    model_dir_writer,
    ort_session,
    versions,
)
from export.spec import GraphTensor, Spec, fit_inputs, model_and_spec, output_infos, sample_feed
from worker.contract.errors import STORAGE_ERRNOS, ExportError, ModelError
from worker.contract.manifest import (
    MODEL_FILE,
    ConstantInfo,
    InputInfo,
    Manifest,
    OutputInfo,
    PartInfo,
    sha256_file,
)

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
            "reference": "keras",
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


@dataclass(frozen=True)
class Fitted:
    """The sidecar fitted to the model: the manifest's inputs, parts and constants."""

    inputs: tuple[InputInfo, ...]
    parts: tuple[PartInfo, ...]
    constants: tuple[ConstantInfo, ...]

    def feed(self, batch_size: int, seed: int) -> dict[str, NDArray[Any]]:
        """A batch made by the transforms from generated media (row 0: blank media)."""
        return sample_feed(self.parts, self.constants, batch_size, seed)

    def feed_bytes(self, batch_size: int, seed: int) -> dict[str, NDArray[Any]]:
        """:meth:`feed`, with each medium encoded and decoded as a record's value is."""
        return sample_feed(self.parts, self.constants, batch_size, seed, through_bytes=True)


# ---------------------------------------------------------------- checks


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
    fitted: Fitted,
    *,
    batch_sizes: Sequence[int],
    tolerance: float,
    label_output: str | None,
) -> ParityResult:
    """Run Keras and ONNX Runtime on the same batches; compare every output.

    ORT is fed by input name. Keras outputs are matched to ONNX outputs by name, or by
    position when the names differ. Non-finite outputs fail the check.
    """
    onnx_names = [o.name for o in session.get_outputs()]
    max_diff = 0.0
    agree = rows = 0
    for k, batch in enumerate(batch_sizes):
        feed = fitted.feed(batch, PARITY_SEED + k)
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
                    "(row 0 is an all-blank example: does the model divide by a zero count?)"
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
    fitted: Fitted,
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
    names = [o.name for o in session32.get_outputs()]
    sizes = list(batch_sizes)
    extra = max(0, min_rows - sum(sizes))
    sizes += [FP16_EXTRA_BATCH] * -(-extra // FP16_EXTRA_BATCH)
    max_diff = 0.0
    agree = rows = 0
    for k, batch in enumerate(sizes):
        feed = fitted.feed(batch, PARITY_SEED + k)
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


def check_args(opset: int, tolerance: float, batch_sizes: Sequence[int], max_opset: int) -> None:
    if opset > max_opset:
        raise ExportError(
            f"opset {opset} is not supported: tf2onnx converts to opset <= {max_opset} "
            f"(and the manifest schema allows at most {max_opset} for Keras exports); "
            f"use --opset {max_opset} or lower"
        )
    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset} is not supported; use {MIN_OPSET}..{max_opset}")
    if not tolerance > 0:
        raise ExportError(f"tolerance must be > 0, not {tolerance}")
    if not batch_sizes or any(b < 1 for b in batch_sizes):
        raise ExportError(f"parity batch sizes must be >= 1, got {list(batch_sizes)}")


def _producer() -> dict[str, str]:
    return versions("tensorflow", "keras", "tf2onnx", "onnx", "onnxruntime")


def _load_keras(path: Path) -> Any:
    import keras

    import export.reference_model  # noqa: F401  (registers the reference model's layers)

    try:
        return keras.saving.load_model(path, compile=False)
    except Exception as exc:  # keras raises many types for a bad file
        raise ExportError(f"cannot load Keras model {path}: {type(exc).__name__}: {exc}") from exc


def _keras_inputs(model: Any) -> list[GraphTensor]:
    return [GraphTensor(str(t.name), str(np.dtype(t.dtype)), tuple(t.shape)) for t in model.inputs]


def _convert(model: Any, fitted: Fitted, opset: int, path: Path) -> None:
    import tensorflow as tf
    import tf2onnx

    signature = {
        i.name: tf.TensorSpec((None, *i.shape) if i.batched else i.shape, i.dtype, name=i.name)
        for i in fitted.inputs
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


def _onnx_io(session: Any, fitted: Fitted) -> tuple[list[GraphTensor], list[GraphTensor]]:
    """The converted graph's inputs (which must be the fitted ones, same dtypes) and outputs."""
    ins, outs = graph_tensors(session.get_inputs()), graph_tensors(session.get_outputs())
    got = {g.name: g.dtype for g in ins}
    want = {i.name: i.dtype for i in fitted.inputs}
    if got != want:
        raise ExportError(f"the converted model's inputs {got} are not the Keras model's {want}")
    return ins, outs


_NO_KERAS_MODEL = "no Keras model at {path} (run `mmstream train-reference` first)"


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
            ``tolerance`` (max abs diff) on batches of these sizes made by the
            transforms from generated media.
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
    check_args(opset, tolerance, parity_batch_sizes, MAX_OPSET)
    model_path, spec, version = model_and_spec(
        keras_model_path, KERAS_FILE, spec_path, version, _NO_KERAS_MODEL
    )
    out = Path(out_dir).resolve()

    started = time.perf_counter()
    model = _load_keras(model_path)
    fitted = Fitted(*fit_inputs(spec, _keras_inputs(model)))
    keras_out_shapes = _keras_output_shapes(model)
    with model_dir_writer(out) as tmp:
        onnx_path = tmp / MODEL_FILE
        session, outputs = _convert_to_onnx(model, fitted, spec, opset, onnx_path, keras_out_shapes)
        parity = _passing_parity(model, session, fitted, spec, parity_batch_sizes, tolerance, out)
        fp16_result = None
        if fp16:
            fp16_result = _passing_fp16(onnx_path, session, fitted, spec, parity_batch_sizes, out)
        manifest = _manifest(tmp, spec, fitted, outputs, version, opset, parity, fp16_result)
        manifest.write(tmp)
    _log_exported(manifest, out, time.perf_counter() - started, opset, parity)
    return manifest


def _keras_output_shapes(model: Any) -> dict[str, tuple[int, ...]]:
    """Per-example shapes of the Keras model's outputs, by output name."""
    return {
        str(name): tuple(int(d) for d in t.shape[1:])
        for name, t in zip(model.output_names, model.outputs, strict=True)
    }


def _convert_to_onnx(
    model: Any,
    fitted: Fitted,
    spec: Spec,
    opset: int,
    onnx_path: Path,
    keras_out_shapes: Mapping[str, tuple[int, ...]],
) -> tuple[Any, tuple[OutputInfo, ...]]:
    """Write ``model`` as ONNX to ``onnx_path``; its ONNX Runtime session and the
    manifest's outputs."""
    _convert(model, fitted, opset, onnx_path)
    session = ort_session(onnx_path, "the converted model")
    _, graph_outs = _onnx_io(session, fitted)
    outputs = output_infos(spec, graph_outs, _output_shapes(graph_outs, keras_out_shapes))
    return session, outputs


def _passing_parity(
    model: Any,
    session: Any,
    fitted: Fitted,
    spec: Spec,
    batch_sizes: Sequence[int],
    tolerance: float,
    out: Path,
) -> ParityResult:
    """:func:`check_parity`'s result, or an ExportError if Keras and ONNX Runtime differ."""
    parity = check_parity(
        model,
        session,
        fitted,
        batch_sizes=batch_sizes,
        tolerance=tolerance,
        label_output=spec.label_output,
    )
    if not parity.passed:
        raise ExportError(
            f"parity failed: Keras vs ONNX Runtime max abs diff {parity.max_abs_diff:.3g} > "
            f"tolerance {tolerance:.3g} (argmax agreement {parity.argmax_agreement:.4f}, "
            f"batch sizes {list(batch_sizes)}); nothing was written to {out}"
        )
    return parity


def _passing_fp16(
    onnx_path: Path,
    session32: Any,
    fitted: Fitted,
    spec: Spec,
    batch_sizes: Sequence[int],
    out: Path,
) -> Fp16Result:
    """:func:`_make_fp16`'s result, or an ExportError if the FP16 graph's argmax agrees
    too rarely with the FP32 graph's."""
    fp16_result = _make_fp16(onnx_path, session32, fitted, spec, batch_sizes)
    if not fp16_result.passed:
        raise ExportError(
            f"fp16 check failed: argmax agreement with the FP32 model "
            f"{fp16_result.argmax_agreement:.4f} < {fp16_result.min_agreement:.4f} "
            f"on {fp16_result.rows} examples (max abs diff "
            f"{fp16_result.max_abs_diff:.3g}); export without --fp16; "
            f"nothing was written to {out}"
        )
    return fp16_result


def _manifest(
    tmp: Path,
    spec: Spec,
    fitted: Fitted,
    outputs: tuple[OutputInfo, ...],
    version: str,
    opset: int,
    parity: ParityResult,
    fp16_result: Fp16Result | None,
) -> Manifest:
    """The manifest of the checked ``model.onnx`` in ``tmp``, after copying the files
    the transforms read there."""
    return build_manifest(
        spec,
        fitted,
        outputs,
        version=version,
        sha256=sha256_file(tmp / MODEL_FILE),
        files=copy_files(spec.files(), tmp),
        opset=opset,
        producer=_producer(),
        parity=parity.to_dict(),
        precision="fp16" if fp16_result is not None else "fp32",
        fp16_parity=fp16_result.to_dict() if fp16_result else {},
    )


def _log_exported(
    manifest: Manifest, out: Path, seconds: float, opset: int, parity: ParityResult
) -> None:
    log.info(
        "exported %s %s to %s in %.1f s (opset %d, %s, parity max abs diff %.3g, sha256 %s)",
        manifest.name,
        manifest.version,
        out,
        seconds,
        opset,
        manifest.precision,
        parity.max_abs_diff,
        manifest.sha256[:12],
    )


def build_manifest(
    spec: Spec,
    fitted: Fitted,
    outputs: tuple[OutputInfo, ...],
    **fields: Any,
) -> Manifest:
    """The manifest of ``spec`` fitted to a graph (a refusal is one ExportError line)."""
    try:
        return Manifest(
            name=spec.name,
            inputs=fitted.inputs,
            outputs=outputs,
            parts=fitted.parts,
            constants=fitted.constants,
            labels=spec.labels,
            label_output=spec.label_output,
            model_card=spec.model_card,
            accepts_missing=spec.accepts_missing,
            **fields,
        )
    except ExportError:
        raise
    except ModelError as exc:
        raise ExportError(str(exc)) from exc


def _output_shapes(
    graph_outs: Sequence[GraphTensor], keras_shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, tuple[int, ...]]:
    """Per-example output shapes: the graph's where fixed, else Keras's (by name, else by
    position)."""
    fallback = list(keras_shapes.values())
    shapes = {}
    for k, g in enumerate(graph_outs):
        dims = g.dims[1:]
        if all(isinstance(d, int) for d in dims):
            shapes[g.name] = tuple(int(d) for d in dims)  # type: ignore[arg-type]
        else:
            shapes[g.name] = keras_shapes.get(g.name, fallback[k] if k < len(fallback) else ())
    return shapes


def _make_fp16(
    onnx_path: Path,
    session32: Any,
    fitted: Fitted,
    spec: Spec,
    batch_sizes: Sequence[int],
) -> Fp16Result:
    """Replace the checked FP32 ``onnx_path`` by its FP16 conversion; return FP16 vs FP32."""
    fp16_path = onnx_path.with_name(f"fp16-{onnx_path.name}")
    _convert_fp16(onnx_path, fp16_path)
    session16 = ort_session(fp16_path, "the FP16 model")
    io32 = graph_tensors(session32.get_inputs()), graph_tensors(session32.get_outputs())
    io16 = graph_tensors(session16.get_inputs()), graph_tensors(session16.get_outputs())
    if io16 != io32:
        raise ExportError(
            "the FP16 model's inputs or outputs differ from the FP32 model's "
            "(they must stay float32, same names and shapes)"
        )
    result = check_fp16(
        session32,
        session16,
        fitted,
        batch_sizes=batch_sizes,
        min_agreement=FP16_MIN_AGREEMENT,
        label_output=spec.label_output,
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
