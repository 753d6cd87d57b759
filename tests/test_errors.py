"""Errors and exit codes, one source of truth: the error says its exit code, the CLI obeys.

Unit tests except the last (``mmstream archive`` against a real broker). The export
tests need neither TensorFlow nor tf2onnx: they replace the Keras model and the
converter by fakes and run the rest of ``export_model`` for real (ONNX Runtime,
parity, the atomic write).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import json
import logging
import os
import subprocess
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from kafka import KafkaProducer
from kafka import errors as kafka_errors

from worker.backfill import archive_format
from worker.contract.errors import (
    EXIT_INPUT,
    EXIT_INTERRUPTED,
    EXIT_RUNTIME,
    BrokerError,
    ConfigError,
    ExportError,
    InferenceError,
    MMStreamError,
    ModelError,
    Reason,
    RecordError,
    StorageError,
    os_error,
)

# worker.cli re-exports main(), which hides the module of the same name.
cli = importlib.import_module("worker.cli.main")
ROOT = Path(__file__).resolve().parents[1]
NO_SPACE = os.strerror(errno.ENOSPC)  # "No space left on device"


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """main() points the root logger at this test's stderr; put the handlers back after."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def _oserror(code: int, filename: str = "/data/x") -> OSError:
    return OSError(code, os.strerror(code), filename)


# ------------------------------------------------------------------ the rule


@pytest.mark.parametrize(
    ("error", "retriable", "exit_code"),
    [
        (ConfigError("x"), False, EXIT_INPUT),
        (ModelError("x"), False, EXIT_INPUT),
        (ExportError("x"), False, EXIT_INPUT),
        (RecordError(Reason.DECODE_ERROR, "x"), False, EXIT_INPUT),
        (InferenceError("x"), False, EXIT_RUNTIME),
        (BrokerError("x"), True, EXIT_RUNTIME),
        (BrokerError("x", retriable=False), False, EXIT_RUNTIME),
        (StorageError("x"), True, EXIT_RUNTIME),
        (MMStreamError("x"), False, EXIT_INPUT),
        (MMStreamError("x", retriable=True), True, EXIT_RUNTIME),
        (ConfigError("x", exit_code=3), False, 3),
        (BrokerError("x", exit_code=EXIT_INPUT), True, EXIT_INPUT),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, Exception) else str(v),
)
def test_each_error_carries_its_exit_code(
    error: MMStreamError, retriable: bool, exit_code: int
) -> None:
    assert error.retriable is retriable
    assert error.exit_code == exit_code


@pytest.mark.parametrize("bad", [0, -1, 126, 255])
def test_an_exit_code_that_reads_as_success_or_a_signal_is_refused(bad: int) -> None:
    with pytest.raises(ValueError, match=r"exit_code must be in 1\.\.125"):
        ConfigError("x", exit_code=bad)


class _Custom(MMStreamError):
    """A class the CLI has never heard of."""

    default_exit_code = 7


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (ConfigError("bad flag"), 2),
        (ModelError("bad model"), 2),
        (InferenceError("ORT failed"), 1),
        (BrokerError("unreachable", retriable=False), 1),
        (StorageError("disk full"), 1),
        (MMStreamError("retry me", retriable=True), 1),
        (_Custom("custom"), 7),
        (ConfigError("explicit", exit_code=4), 4),
        (ModelError("line one\n  line two\n"), 2),
    ],
    ids=lambda v: str(v).split()[0] if isinstance(v, Exception) else str(v),
)
def test_main_exits_with_the_errors_own_code_and_one_line(
    error: MMStreamError,
    code: int,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def handler(_args: argparse.Namespace) -> int:
        raise error

    monkeypatch.setattr(cli, "_cmd_produce", handler)
    assert cli.main(["produce", "--bootstrap-servers", "b", "--topic", "t"]) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mmstream: error: "), err
    assert " ".join(str(error).split()) in err


def test_main_maps_ctrl_c_to_130_and_a_full_disk_anywhere_to_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    raised: list[BaseException] = []

    def handler(_args: argparse.Namespace) -> int:
        raise raised[-1]

    monkeypatch.setattr(cli, "_cmd_produce", handler)
    argv = ["produce", "--bootstrap-servers", "b", "--topic", "t"]
    raised.append(KeyboardInterrupt())
    assert cli.main(argv) == EXIT_INTERRUPTED == 130
    raised.append(_oserror(errno.ENOSPC, "/data/labels.jsonl"))
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err == f"mmstream: error: '/data/labels.jsonl': {NO_SPACE}\n"
    raised.append(_oserror(errno.ENOENT))  # not disguised: a bug where it is raised
    with pytest.raises(FileNotFoundError):
        cli.main(argv)


def test_main_lists_no_error_class() -> None:
    import inspect

    source = inspect.getsource(cli.main)
    for name in ("BrokerError", "InferenceError", "ConfigError", "ModelError", "StorageError"):
        assert name not in source


# ------------------------------------------------------------------ Kafka's flag


@pytest.mark.parametrize(
    "exc",
    [
        kafka_errors.KafkaTimeoutError("Failed to update metadata after 60.0 secs."),
        kafka_errors.KafkaConnectionError("connection refused"),
        kafka_errors.KafkaError("generic"),
        kafka_errors.TopicAuthorizationFailedError(),
        kafka_errors.UnknownTopicOrPartitionError(),
    ],
    ids=lambda e: type(e).__name__,
)
def test_broker_error_wrap_keeps_kafkas_retriable_flag(exc: kafka_errors.KafkaError) -> None:
    err = BrokerError.wrap("cannot reach Kafka at b:9092", exc)
    assert type(err) is BrokerError
    assert err.retriable is type(exc).retriable
    assert err.exit_code == EXIT_RUNTIME  # a run-time failure either way
    assert err.__cause__ is exc
    assert str(err).startswith("cannot reach Kafka at b:9092: ")
    assert type(exc).__name__ in str(err)  # kafka-python's str names its class


def test_broker_error_wrap_without_a_flag_is_retriable() -> None:
    err = BrokerError.wrap("send failed", TimeoutError())
    assert err.retriable and str(err) == "send failed: TimeoutError"
    assert not BrokerError.wrap("x", kafka_errors.KafkaError()).retriable


def test_errors_module_imports_no_kafka_client() -> None:
    code = "import sys, worker.contract.errors; print('kafka' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    ).stdout
    assert out.strip() == "False"


# ------------------------------------------------------------------ OSError


@pytest.mark.parametrize(
    ("code", "cls", "exit_code"),
    [
        (errno.ENOSPC, StorageError, 1),
        (errno.EDQUOT, StorageError, 1),
        (errno.EIO, StorageError, 1),
        (errno.ENOENT, ConfigError, 2),
        (errno.EACCES, ConfigError, 2),
        (errno.EROFS, ConfigError, 2),
        (errno.EISDIR, ConfigError, 2),
    ],
    ids=["ENOSPC", "EDQUOT", "EIO", "ENOENT", "EACCES", "EROFS", "EISDIR"],
)
def test_os_error_full_disk_is_runtime_missing_or_forbidden_is_config(
    code: int, cls: type[MMStreamError], exit_code: int
) -> None:
    exc = _oserror(code)
    err = os_error("--out '/data/a.gz'", exc)
    assert type(err) is cls and err.exit_code == exit_code and err.__cause__ is exc
    assert str(err) == f"--out '/data/a.gz': {os.strerror(code)}"
    assert type(os_error("x", exc, input_error=ExportError)) is (
        StorageError if cls is StorageError else ExportError
    )


# ------------------------------------------------------------------ archive --out


def _fail_on(monkeypatch: pytest.MonkeyPatch, name: str, code: int) -> None:
    """Make ``os.<name>`` raise ``OSError(code)`` for the rest of the test."""

    def fail(*_args: Any, **_kwargs: Any) -> Any:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, name, fail)  # the os module archive_format.py calls


@pytest.mark.parametrize("suffix", ["jsonl", "jsonl.gz"])
@pytest.mark.parametrize(
    ("step", "code", "cls"),
    [
        ("fsync", errno.ENOSPC, StorageError),
        ("fsync", errno.EDQUOT, StorageError),
        ("fsync", errno.EIO, StorageError),
        ("replace", errno.ENOSPC, StorageError),
        ("replace", errno.EACCES, ConfigError),
        ("open", errno.EACCES, ConfigError),
        ("open", errno.ENOENT, ConfigError),
    ],
)
def test_archive_writer_full_disk_is_a_storage_error_and_leaves_nothing(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    step: str,
    code: int,
    cls: type[MMStreamError],
    suffix: str,
) -> None:
    out = tmp_path / f"parts.{suffix}"
    _fail_on(monkeypatch, step, code)
    writer = None
    with pytest.raises(cls) as info:
        writer = archive_format.AtomicWriter(out)
        writer.write(b'{"mmstream_archive":1}\n')
        writer.commit()
    if writer is not None:
        writer.discard()
    assert str(info.value) == f"--out {str(out)!r}: {os.strerror(code)}"
    assert info.value.exit_code == (1 if cls is StorageError else 2)
    assert list(tmp_path.iterdir()) == []


def test_archive_writer_still_commits_when_nothing_fails(tmp_path: Path) -> None:
    out = tmp_path / "parts.jsonl"
    writer = archive_format.AtomicWriter(out)
    writer.write(b"line\n")
    writer.commit()
    assert out.read_bytes() == b"line\n" and list(tmp_path.iterdir()) == [out]


@pytest.mark.integration
def test_mmstream_archive_on_a_full_disk_exits_1_with_one_line(
    kafka_bootstrap: str,
    topic_factory: Callable[..., str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    topic = topic_factory(1)
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    try:
        for i in range(3):
            producer.send(topic, key=b"k", value=b"v%d" % i, partition=0).get(timeout=30)
    finally:
        producer.close()
    out = tmp_path / "parts.jsonl.gz"
    _fail_on(monkeypatch, "fsync", errno.ENOSPC)
    argv = ["archive", "--bootstrap-servers", kafka_bootstrap, "--source-topic", topic]
    assert cli.main([*argv, "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"mmstream: error: --out {str(out)!r}: {NO_SPACE}", err
    assert list(tmp_path.iterdir()) == []  # no archive, no temporary file


# ------------------------------------------------------------------ export, without TF


class _Tensor:
    def __init__(self, name: str, shape: tuple[int | None, ...]) -> None:
        self.name, self.shape, self.dtype = name, shape, "float32"


class _FakeKeras:
    """Stands in for the Keras model: ``probs = softmax(flatten(image) @ W)``, like the ONNX."""

    def __init__(self, weights: np.ndarray) -> None:
        self.weights = weights
        self.inputs = [_Tensor("image", (None, 4, 4, 1))]
        self.outputs = [_Tensor("probs", (None, 2))]
        self.output_names = ["probs"]

    def predict_on_batch(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        logits = feed["image"].reshape(len(feed["image"]), -1).astype(np.float64) @ self.weights
        e = np.exp(logits - logits.max(-1, keepdims=True))
        probs: np.ndarray = e / e.sum(-1, keepdims=True)
        return probs


def _onnx_bytes(weights: np.ndarray) -> bytes:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["image"], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "w"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
        ],
        "fake",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 4, 4, 1])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", 2])],
        [numpy_helper.from_array(weights.astype(np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    data: bytes = model.SerializeToString()
    return data


@pytest.fixture
def fake_export(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A model.keras + sidecar whose 'conversion' writes ``state["onnx"]`` (a real ONNX)."""
    from export import convert
    from worker.contract.transforms import ImageTransform

    weights = np.random.default_rng(0).standard_normal((16, 2))
    state: dict[str, Any] = {"onnx": _onnx_bytes(weights)}
    src = tmp_path / "src"
    src.mkdir()
    (src / "model.keras").write_bytes(b"not read: _load_keras is replaced")
    sidecar = {
        "name": "fake",
        "version": "0.1",
        "parts": {"image": {"transform": ImageTransform(4, 4, 1).to_dict(), "inputs": ["image"]}},
        "labels": ["a", "b"],
        "label_output": "probs",
        "model_card": {},
    }
    (src / "mmstream-spec.json").write_text(json.dumps(sidecar))

    def from_keras(_model: Any, *, output_path: str, **_kwargs: Any) -> None:
        if "convert_error" in state:
            raise state["convert_error"]
        Path(output_path).write_bytes(state["onnx"])

    # The real convert._convert runs, on stand-ins for tensorflow and tf2onnx.
    fake_tf = types.SimpleNamespace(TensorSpec=lambda *a, **k: (a, k))
    fake_tf2onnx = types.SimpleNamespace(convert=types.SimpleNamespace(from_keras=from_keras))
    monkeypatch.setitem(sys.modules, "tensorflow", fake_tf)
    monkeypatch.setitem(sys.modules, "tf2onnx", fake_tf2onnx)
    monkeypatch.setattr(convert, "_load_keras", lambda _path: _FakeKeras(weights))
    monkeypatch.setattr(convert, "_producer", lambda: {"onnxruntime": "test"})
    state["keras"] = src / "model.keras"
    state["parent"] = tmp_path / "models"
    state["out"] = state["parent"] / "fake"
    return state


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir()) if parent.exists() else []


def _export_cli(state: dict[str, Any]) -> int:
    code: int = cli.main(["export", "--model", str(state["keras"]), "--out", str(state["out"])])
    return code


def test_fake_export_reaches_the_end(fake_export: dict[str, Any]) -> None:
    """The fakes run the whole export (so the failures below happen where they say)."""
    from export.convert import export_model
    from worker.contract.manifest import load_manifest

    manifest = export_model(fake_export["keras"], fake_export["out"])
    assert manifest.parity["passed"] and manifest.parity["max_abs_diff"] < 1e-5
    assert load_manifest(fake_export["out"]).sha256 == manifest.sha256
    assert _leftovers(fake_export["parent"]) == ["fake"]


def test_a_converted_model_ort_cannot_load_is_one_export_error_line(
    fake_export: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    from export.convert import export_model

    fake_export["onnx"] = b"\x08\x07 not a protobuf"
    with pytest.raises(ExportError) as info:
        export_model(fake_export["keras"], fake_export["out"])
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("the converted model does not load in ONNX Runtime")
    assert "INVALID_PROTOBUF" in msg, msg
    assert info.value.exit_code == 2
    assert _leftovers(fake_export["parent"]) == []
    assert _export_cli(fake_export) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not load in ONNX Runtime" in err, err
    assert "Traceback" not in err


def test_an_ort_exception_with_a_multiline_message_is_still_one_line(
    fake_export: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    import onnxruntime as ort
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail

    from export.convert import export_model

    def refuse(*_args: Any, **_kwargs: Any) -> Any:
        raise Fail("[ONNXRuntimeError] : 1 : FAIL : Load model failed:\nnode 3\n  bad attr")

    monkeypatch.setattr(ort, "InferenceSession", refuse)
    with pytest.raises(ExportError) as info:
        export_model(fake_export["keras"], fake_export["out"])
    assert str(info.value) == (
        "the converted model does not load in ONNX Runtime (CPU): Fail: "
        "[ONNXRuntimeError] : 1 : FAIL : Load model failed: node 3 bad attr"
    )


@pytest.mark.parametrize(
    ("code", "cls"), [(errno.ENOSPC, StorageError), (errno.EACCES, ExportError)]
)
def test_export_manifest_write_on_a_full_disk_is_runtime_and_keeps_the_old_export(
    fake_export: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    code: int,
    cls: type[MMStreamError],
) -> None:
    from export.convert import export_model
    from worker.contract.manifest import Manifest

    export_model(fake_export["keras"], fake_export["out"])
    before = {p.name: p.read_bytes() for p in fake_export["out"].iterdir()}

    def full(self: Manifest, model_dir: Path) -> Path:
        raise OSError(code, os.strerror(code), str(model_dir / "manifest.json"))

    monkeypatch.setattr(Manifest, "write", full)
    out = fake_export["out"].resolve()
    with pytest.raises(cls) as info:
        export_model(fake_export["keras"], fake_export["out"], version="0.2")
    assert type(info.value) is cls
    assert str(info.value) == f"export to {str(out)!r}: {os.strerror(code)}"
    assert _export_cli(fake_export) == (1 if cls is StorageError else 2)
    err = capsys.readouterr().err
    assert err == f"mmstream: error: export to {str(out)!r}: {os.strerror(code)}\n"
    after = {p.name: p.read_bytes() for p in fake_export["out"].iterdir()}
    assert after == before  # the previous export is untouched
    assert _leftovers(fake_export["parent"]) == ["fake"]


@pytest.mark.parametrize(
    ("code", "exit_code", "message"),
    [
        (errno.ENOSPC, 1, "export to {out!r}: No space left on device"),
        (errno.EDQUOT, 1, "export to {out!r}: Disk quota exceeded"),
        (
            errno.EACCES,
            2,
            "tf2onnx conversion failed: PermissionError: [Errno 13] Permission "
            "denied: '/x/model.onnx'",
        ),
    ],
    ids=["ENOSPC", "EDQUOT", "EACCES"],
)
def test_tf2onnx_writing_the_model_on_a_full_disk_is_a_storage_error(
    fake_export: dict[str, Any],
    capsys: pytest.CaptureFixture[str],
    code: int,
    exit_code: int,
    message: str,
) -> None:
    """tf2onnx's own write of model.onnx fails: a full disk is exit 1, anything else 2."""
    fake_export["convert_error"] = OSError(code, os.strerror(code), "/x/model.onnx")
    assert _export_cli(fake_export) == exit_code
    out = str(fake_export["out"].resolve())
    assert capsys.readouterr().err == f"mmstream: error: {message.format(out=out)}\n"
    assert _leftovers(fake_export["parent"]) == []
