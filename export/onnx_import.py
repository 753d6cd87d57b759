"""An existing ONNX model (from PyTorch, Hugging Face, anywhere) -> a served model directory.

:func:`import_onnx` needs no TensorFlow: ONNX Runtime and the ``onnx`` package. It
reads the graph and the spec sidecar (:mod:`export.spec`), fits the sidecar to the
graph's inputs (every input filled by exactly one transform output or constant,
dtypes and shapes matching, dynamic dimensions fixed by the transforms; a refusal
names the input and the mismatch), then runs a smoke check: batches made by the
transforms from generated media, each medium encoded and decoded as a record would
be, must give finite outputs, with the batch first, equal (within ``tolerance``) to
the same examples run one at a time (the worker batches events: a graph whose rows
depend on each other would give other answers in production). Only then are
``model.onnx``, the files the transforms read and ``manifest.json`` written.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from export.convert import MIN_OPSET, PARITY_SEED, Fitted, build_manifest, check_args
from export.modeldir import (
    copy_files,
    graph_tensors,
    model_dir_writer,
    ort_session,
    run_session,
    versions,
)
from export.spec import fit_inputs, model_and_spec, output_infos
from worker.contract.errors import ConfigError, ExportError
from worker.contract.manifest import MODEL_FILE, Manifest, sha256_file

log = logging.getLogger(__name__)

#: ONNX Runtime 1.2x runs these opsets of the default domain (the manifest allows them).
MAX_ONNX_OPSET = 23
SMOKE_BATCH_SIZES = (1, 4)


def graph_opset(path: Path) -> int:
    """The default-domain opset of the graph at ``path``; a graph whose weights live in
    external data files is refused (only ``model.onnx`` is copied and hashed)."""
    try:
        import onnx
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ConfigError(
            "importing an ONNX model needs onnx: pip install 'mmstream[onnx]'"
        ) from exc
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and others
        raise ExportError(f"{path} is not an ONNX model: {type(exc).__name__}: {exc}") from exc
    external = [
        t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
    ]
    if external:
        raise ExportError(
            f"{path} keeps weights in external data files ({external[:3]}...): save it as one "
            "file (onnx.save_model(..., save_as_external_data=False); under 2 GB)"
        )
    opsets = {o.domain: o.version for o in model.opset_import}
    return int(opsets.get("", opsets.get("ai.onnx", 0)))


def smoke_check(
    session: Any, fitted: Fitted, batch_sizes: Sequence[int], tolerance: float
) -> tuple[dict[str, Any], dict[str, tuple[int, ...]]]:
    """Run generated batches, batched and one example at a time; return the check's
    record (for the manifest's ``parity``) and each output's per-example shape."""
    run = run_session(session)
    max_diff = 0.0
    shapes: dict[str, tuple[int, ...]] = {}
    for k, batch in enumerate(batch_sizes):
        feed = fitted.feed_bytes(batch, PARITY_SEED + k)
        got = run(feed)
        for name, arr in got.items():
            arr = np.asarray(arr)
            if arr.ndim == 0 or arr.shape[0] != batch:
                raise ExportError(
                    f"output {name!r} has shape {list(arr.shape)} for a batch of {batch}: the "
                    "worker needs the batch as every output's first dimension"
                )
            if arr.dtype.kind in "fc" and not np.isfinite(arr).all():
                raise ExportError(
                    f"output {name!r} is not finite on the smoke batch of {batch} (row 0 is "
                    "blank media: does the model divide by a zero count?)"
                )
            if shapes.setdefault(name, arr.shape[1:]) != arr.shape[1:]:
                raise ExportError(
                    f"output {name!r} changes shape with the batch ({list(shapes[name])} vs "
                    f"{list(arr.shape[1:])})"
                )
        for row in range(batch if batch > 1 else 0):
            one = {
                name: value[row : row + 1] if _batched(fitted, name) else value
                for name, value in feed.items()
            }
            for name, arr in run(one).items():
                diff = np.abs(
                    np.asarray(arr, np.float64) - np.asarray(got[name][row : row + 1], np.float64)
                )
                max_diff = max(max_diff, float(diff.max(initial=0.0)))
    record = {
        "reference": "onnxruntime, one example at a time",
        "max_abs_diff": max_diff,
        "tolerance": tolerance,
        "batch_sizes": list(batch_sizes),
        "passed": max_diff <= tolerance,
    }
    return record, shapes


def _batched(fitted: Fitted, name: str) -> bool:
    return next(i.batched for i in fitted.inputs if i.name == name)


def import_onnx(
    onnx_path: str | Path,
    out_dir: str | Path,
    *,
    spec_path: str | Path | None = None,
    batch_sizes: Sequence[int] = SMOKE_BATCH_SIZES,
    tolerance: float = 1e-4,
    version: str | None = None,
) -> Manifest:
    """Write the model directory of the ONNX graph at ``onnx_path`` (see the module doc).

    Raises:
        ExportError: a bad sidecar, a graph the sidecar does not fit, a graph ONNX
            Runtime cannot load or run, a failed smoke check, ``out_dir`` cannot be written.
        StorageError: a full disk, exceeded quota or I/O error while writing.
    """
    src, spec, version = model_and_spec(
        onnx_path, MODEL_FILE, spec_path, version, "no ONNX model at {path}"
    )
    opset = graph_opset(src)
    check_args(max(opset, MIN_OPSET), tolerance, batch_sizes, MAX_ONNX_OPSET)
    out = Path(out_dir).resolve()
    started = time.perf_counter()
    session = ort_session(src, src.name)
    fitted = Fitted(*fit_inputs(spec, graph_tensors(session.get_inputs())))
    graph_outputs = graph_tensors(session.get_outputs())  # refuses types it cannot publish
    parity, shapes = smoke_check(session, fitted, batch_sizes, tolerance)
    if not parity["passed"]:
        raise ExportError(
            f"smoke check failed: batched outputs differ from one-at-a-time runs by "
            f"{parity['max_abs_diff']:.3g} > tolerance {tolerance:.3g}; the worker batches "
            "events, so the model must treat each row alone (batch statistics? a fixed "
            f"batch inside?); nothing was written to {out}"
        )
    outputs = output_infos(spec, graph_outputs, shapes)
    with model_dir_writer(out) as tmp:
        shutil.copyfile(src, tmp / MODEL_FILE)
        manifest = build_manifest(
            spec,
            fitted,
            outputs,
            version=version,
            sha256=sha256_file(tmp / MODEL_FILE),
            files=copy_files(spec.files(), tmp),
            opset=opset,
            producer={"source": src.name, **versions("onnx", "onnxruntime")},
            parity=parity,
        )
        manifest.write(tmp)
    log.info(
        "imported %s %s from %s to %s in %.1f s (opset %d, batched vs one-by-one max abs "
        "diff %.3g, sha256 %s)",
        manifest.name,
        manifest.version,
        src,
        out,
        time.perf_counter() - started,
        opset,
        parity["max_abs_diff"],
        manifest.sha256[:12],
    )
    return manifest
