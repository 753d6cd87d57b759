"""Writing a model directory, the same way for every export path.

Everything is written into a temporary directory beside ``out_dir`` and renamed
into place at the end, so a failed export never leaves a half-written directory; a
previous export there is replaced, anything else is refused. ONNX Runtime (CPU)
loads every graph before it is written, a failure as one line.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from worker.contract.errors import ExportError, one_line, os_error
from worker.contract.manifest import MANIFEST_FILE, MODEL_FILE, sha256_file

#: ONNX Runtime's tensor types -> numpy dtype names.
ORT_DTYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}


def check_out_dir(out: Path) -> None:
    """``out`` may be absent, empty or a previous export (its manifest, its model and the
    files its manifest lists)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ExportError(f"output {out} exists and is not a directory")
    ours = {MANIFEST_FILE, MODEL_FILE}
    with contextlib.suppress(OSError, ValueError, AttributeError):
        ours |= set(json.loads((out / MANIFEST_FILE).read_text()).get("files", {}))
    extra = sorted(p.name for p in out.iterdir() if p.name not in ours)
    if extra:
        raise ExportError(
            f"refusing to replace {out}: it holds files other than an export ({extra[:5]}); "
            "choose an empty or new directory"
        )


@contextmanager
def model_dir_writer(out: Path) -> Iterator[Path]:
    """A temporary directory beside ``out`` to write the export into; moved to ``out``
    (replacing a previous export) when the block ends without an error, removed if not.
    ``OSError`` while writing becomes a one-line error (a full disk: ``StorageError``)."""
    check_out_dir(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    except OSError as exc:
        raise os_error(f"export to {str(out)!r}", exc, input_error=ExportError) from exc
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        _replace_dir(tmp, out)
    except OSError as exc:  # writing the model, the manifest, or renaming into place
        shutil.rmtree(tmp, ignore_errors=True)
        raise os_error(f"export to {str(out)!r}", exc, input_error=ExportError) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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


def copy_files(files: dict[str, Path], into: Path) -> dict[str, str]:
    """Copy each file a transform reads into the model directory; name -> sha256."""
    hashes = {}
    for name, src in sorted(files.items()):
        if not src.is_file():
            raise ExportError(
                f"{name}: no file {src} (files a transform reads sit beside the sidecar)"
            )
        shutil.copyfile(src, into / name)
        hashes[name] = sha256_file(into / name)
    return hashes


def ort_session(path: Path, what: str) -> Any:
    """An ONNX Runtime (CPU) session on ``path``; a load failure is one ExportError line.

    ``what`` names the model in the message (e.g. "the converted model").
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only: warnings are not the user's to act on
    try:
        return ort.InferenceSession(
            str(path), sess_options=opts, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:  # ORT raises its own untyped exceptions
        raise ExportError(
            one_line(f"{what} does not load in ONNX Runtime (CPU): {type(exc).__name__}: {exc}")
        ) from exc


def ort_dtype(name: str, ort_type: str) -> str:
    dtype = ORT_DTYPES.get(ort_type)
    if dtype is None:
        raise ExportError(f"ONNX tensor {name!r} has unsupported type {ort_type}")
    return dtype


def graph_tensors(nodes: Any) -> list[Any]:
    """ORT's ``get_inputs()``/``get_outputs()`` as :class:`export.spec.GraphTensor` (dims:
    ints, or the dimension's name/None when dynamic)."""
    from export.spec import GraphTensor

    return [
        GraphTensor(n.name, ort_dtype(n.name, n.type), tuple(_dim(d) for d in n.shape))
        for n in nodes
    ]


def _dim(d: Any) -> int | str | None:
    return d if isinstance(d, int) and d > 0 else (None if isinstance(d, int) else d)


def versions(*modules: str) -> dict[str, str]:
    """``{module: __version__}`` of the tools an export used."""
    import importlib

    out = {}
    for name in modules:
        module = importlib.import_module(name)
        out[name] = str(getattr(module, "__version__", "?"))
    return out


def run_session(session: Any) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """``feed -> {output name: array}`` on ``session``; an ORT failure is one ExportError."""
    names = [o.name for o in session.get_outputs()]

    def run(feed: dict[str, Any]) -> dict[str, Any]:
        try:
            return dict(zip(names, session.run(names, feed), strict=True))
        except Exception as exc:  # ORT raises its own untyped exceptions
            raise ExportError(one_line(f"ONNX Runtime failed on the smoke batch: {exc}")) from exc

    return run
