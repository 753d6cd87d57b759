"""Keras -> ONNX export: manifest, sha256, parity, refusals, and TF kept out of the worker."""

from __future__ import annotations

import argparse
import errno
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytestmark = pytest.mark.slow

# find_spec, not importorskip: collecting this module must not import TensorFlow (~3 s).
if importlib.util.find_spec("tensorflow") is None or importlib.util.find_spec("tf2onnx") is None:
    pytest.skip("needs the export extra (tensorflow, tf2onnx)", allow_module_level=True)

import onnxruntime as ort  # noqa: E402

from export import KERAS_FILE, SIDECAR_FILE  # noqa: E402
from worker.contract.errors import (  # noqa: E402
    ConfigError,
    ExportError,
    ModelError,
    StorageError,
)
from worker.contract.manifest import (  # noqa: E402
    MANIFEST_FILE,
    MODEL_FILE,
    Manifest,
    load_manifest,
    sha256_file,
)
from worker.contract.reference_data import samples  # noqa: E402

try:
    from tests.model_fixture import build_tiny_model_dir
except ImportError:  # tests/ is on sys.path (no tests/__init__.py)
    from model_fixture import build_tiny_model_dir  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "schemas" / "manifest.schema.json"
IMAGE_SIZE = 16


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model, trained and exported once for the module; returns the model dir."""
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny"), image_size=IMAGE_SIZE)


@pytest.fixture(scope="module")
def keras_file(exported: Path) -> Path:
    return exported.parent / "keras" / KERAS_FILE


@pytest.fixture(scope="module")
def keras_model(keras_file: Path) -> Any:
    import keras

    import export.reference_model  # noqa: F401  (registers MaskedMean)

    return keras.saving.load_model(keras_file, compile=False)


@pytest.fixture(scope="module")
def exported_fp16(keras_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same Keras model exported with ``fp16=True``; returns the model dir."""
    from export.convert import export_model

    out = tmp_path_factory.mktemp("tiny-fp16") / "model"
    export_model(keras_file, out, parity_batch_sizes=(1, 5), fp16=True)
    return out


def _validate(manifest: dict[str, Any]) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.Draft202012Validator(schema).validate(manifest)


def _session(model_dir: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(model_dir / MODEL_FILE), providers=["CPUExecutionProvider"])


def _run(session: ort.InferenceSession, feed: dict[str, np.ndarray]) -> np.ndarray:
    names = [o.name for o in session.get_outputs()]
    return np.asarray(session.run(names, {i.name: feed[i.name] for i in session.get_inputs()})[0])


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# ---------------------------------------------------------------- the exported directory


def test_manifest_validates_against_schema(exported: Path) -> None:
    _validate(json.loads((exported / MANIFEST_FILE).read_text()))
    assert sorted(p.name for p in exported.iterdir()) == [MANIFEST_FILE, MODEL_FILE]


def test_manifest_facts(exported: Path) -> None:
    manifest = load_manifest(exported)  # verifies the sha256 too
    assert manifest.sha256 == sha256_file(exported / MODEL_FILE)
    assert manifest.name == "digits-seen-read-heard"
    assert manifest.version == "0.0.1-test"
    assert manifest.opset == 17
    assert set(manifest.producer) == {"tensorflow", "keras", "tf2onnx", "onnx", "onnxruntime"}
    assert sorted((i.name, i.dtype) for i in manifest.inputs) == [
        ("audio", "float32"),
        ("image", "float32"),
        ("text", "int32"),
    ]
    assert [(p.name, p.transform.kind, p.input_names) for p in manifest.parts] == [
        ("image", "image", ("image",)),
        ("text", "words", ("text",)),
        ("audio", "log_mel", ("audio",)),
    ]
    assert manifest.input("image").shape == (IMAGE_SIZE, IMAGE_SIZE, 3)  # type: ignore[union-attr]
    assert [(o.name, o.dtype, o.shape, o.kind) for o in manifest.outputs] == [
        ("probabilities", "float32", (10,), "probabilities")
    ]
    assert manifest.labels == tuple(str(d) for d in range(10))
    assert manifest.label_output == "probabilities"
    assert manifest.parity["passed"] is True
    assert 0 <= manifest.parity["max_abs_diff"] <= 1e-4
    assert manifest.parity["argmax_agreement"] == 1.0
    assert manifest.model_card["training"]["image_size"] == IMAGE_SIZE
    assert (manifest.precision, manifest.fp16_parity) == ("fp32", {})


def test_manifest_names_are_the_onnx_names(exported: Path) -> None:
    manifest = load_manifest(exported)
    session = _session(exported)
    assert {i.name for i in manifest.inputs} == {i.name for i in session.get_inputs()}
    assert [o.name for o in manifest.outputs] == [o.name for o in session.get_outputs()]


def test_ort_equals_keras_on_real_features(
    exported: Path, keras_model: Any, tmp_path: Path
) -> None:
    from export.reference_model import featurize

    manifest = load_manifest(exported)
    specs = {p.name: p.transform for p in manifest.parts}
    batch = samples(12, np.random.default_rng(5), split="test", corrupt_p=0.3)
    features = featurize(batch, specs)
    for name, arr in features.items():  # through .npy files, as a client would send them
        np.save(tmp_path / f"{name}.npy", arr)
    loaded = {name: np.load(tmp_path / f"{name}.npy") for name in features}
    for info in manifest.inputs:
        assert loaded[info.name].dtype == np.dtype(info.dtype)
        assert loaded[info.name].shape[1:] == info.shape

    got = _run(_session(exported), loaded)
    want = np.asarray(keras_model.predict_on_batch(loaded))
    assert got.shape == want.shape == (12, 10)
    assert np.max(np.abs(got - want)) <= 1e-4
    assert (got.argmax(-1) == want.argmax(-1)).all()
    np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)


def test_all_padding_text_is_finite(exported: Path, keras_model: Any) -> None:
    from export.reference_model import blank_features

    manifest = load_manifest(exported)
    specs = {p.name: p.transform for p in manifest.parts}
    feed = blank_features(3, specs)
    assert (feed["text"] == 0).all()
    got = _run(_session(exported), feed)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)
    assert np.isfinite(np.asarray(keras_model.predict_on_batch(feed))).all()


# ---------------------------------------------------------------- fp16


def test_fp16_manifest(exported_fp16: Path, exported: Path) -> None:
    raw = json.loads((exported_fp16 / MANIFEST_FILE).read_text())
    _validate(raw)
    assert sorted(p.name for p in exported_fp16.iterdir()) == [MANIFEST_FILE, MODEL_FILE]
    manifest, fp32 = load_manifest(exported_fp16), load_manifest(exported)
    assert manifest.precision == raw["precision"] == "fp16"
    fp16 = manifest.fp16_parity
    assert fp16["passed"] is True and fp16["batch_sizes"] == [1, 5]
    assert fp16["rows"] >= 1000  # the parity batches and more: 99.5% must allow a near-tie
    assert 0.995 <= fp16["min_agreement"] <= fp16["argmax_agreement"] <= 1.0
    assert 0 <= fp16["max_abs_diff"] < 1e-2
    assert manifest.parity["passed"] is True  # Keras vs the FP32 graph, before conversion
    assert (manifest.inputs, manifest.outputs) == (fp32.inputs, fp32.outputs)  # float32 I/O
    size16, size32 = ((d / MODEL_FILE).stat().st_size for d in (exported_fp16, exported))
    assert size16 < 0.75 * size32


def test_fp16_graph_has_fp16_weights_and_float32_io(exported_fp16: Path) -> None:
    import onnx

    model = onnx.load(str(exported_fp16 / MODEL_FILE))
    types = {t.data_type for t in model.graph.initializer}
    assert onnx.TensorProto.FLOAT16 in types
    session = _session(exported_fp16)
    assert {i.name: i.type for i in session.get_inputs()} == {
        "image": "tensor(float)",
        "text": "tensor(int32)",
        "audio": "tensor(float)",
    }
    assert [o.type for o in session.get_outputs()] == ["tensor(float)"]


def test_fp16_model_runs_in_the_worker(exported_fp16: Path, exported: Path) -> None:
    from export.reference_model import featurize
    from worker.inference.model import ModelRunner

    runner = ModelRunner.load(exported_fp16, device="cpu")
    assert runner.manifest.precision == "fp16"
    specs = {p.name: p.transform for p in runner.manifest.parts}
    features = featurize(samples(24, np.random.default_rng(7), split="test"), specs)
    feed = {i.name: features[i.name].astype(i.dtype) for i in runner.manifest.inputs}
    (got,) = runner.run(feed)
    want = _run(_session(exported), feed)
    assert got.dtype == np.float32 and got.shape == want.shape == (24, 10)
    assert np.isfinite(got).all()
    assert np.max(np.abs(got - want)) < 1e-2
    assert np.mean(got.argmax(-1) == want.argmax(-1)) >= 0.95
    np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-2)


def test_fp16_disagreement_is_refused(
    keras_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import export.convert as convert

    real = convert.check_fp16

    def flips_labels(*args: Any, **kwargs: Any) -> convert.Fp16Result:
        result = real(*args, **kwargs)
        return convert.Fp16Result(0.3, 0.9, result.batch_sizes, result.min_agreement, result.rows)

    monkeypatch.setattr(convert, "check_fp16", flips_labels)
    out = tmp_path / "out"
    with pytest.raises(
        ExportError, match=r"fp16 check failed: argmax agreement .* 0\.9000 < 0\.9950"
    ) as info:
        convert.export_model(keras_file, out, parity_batch_sizes=(2,), fp16=True)
    assert "\n" not in str(info.value)
    assert not out.exists()
    assert _leftovers(tmp_path) == []


def test_fp16_threshold_is_enforced(
    keras_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import export.convert as convert

    # No agreement can reach 1.01 (a share is at most 1.0): refused by construction,
    # whatever this run's FP16 agreement happens to be.
    monkeypatch.setattr(convert, "FP16_MIN_AGREEMENT", 1.01)
    out = tmp_path / "out"
    with pytest.raises(ExportError, match=r"fp16 check failed: .* [01]\.\d{4} < 1\.0100") as info:
        convert.export_model(keras_file, out, parity_batch_sizes=(2,), fp16=True)
    assert "\n" not in str(info.value)
    assert not out.exists()
    assert _leftovers(tmp_path) == []


def test_manifest_without_precision_is_fp32(exported: Path) -> None:
    raw = json.loads((exported / MANIFEST_FILE).read_text())
    del raw["precision"]  # a manifest written before --fp16 existed
    _validate(raw)
    manifest = Manifest.from_dict(raw)
    assert (manifest.precision, manifest.fp16_parity) == ("fp32", {})
    assert "fp16_parity" not in manifest.to_dict()
    with pytest.raises(ModelError, match="precision 'int8' is not supported"):
        Manifest.from_dict({**raw, "precision": "int8"})


def test_schema_wants_fp16_parity_for_fp16(exported: Path) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    raw = json.loads((exported / MANIFEST_FILE).read_text())
    with pytest.raises(jsonschema.ValidationError, match="fp16_parity"):
        _validate({**raw, "precision": "fp16"})


# ---------------------------------------------------------------- refusals


def test_opset_19_is_refused(keras_file: Path, tmp_path: Path) -> None:
    from export.convert import export_model

    out = tmp_path / "out"
    with pytest.raises(ExportError, match=r"opset 19 is not supported.*<= 18"):
        export_model(keras_file, out, opset=19)
    assert not out.exists()


def test_missing_sidecar_is_refused(keras_file: Path, tmp_path: Path) -> None:
    from export.convert import export_model

    lonely = tmp_path / "lonely"
    lonely.mkdir()
    shutil.copy(keras_file, lonely / KERAS_FILE)
    out = tmp_path / "out"
    with pytest.raises(ExportError, match=rf"no sidecar .*{SIDECAR_FILE}.*labels"):
        export_model(lonely / KERAS_FILE, out)
    assert not out.exists()


def test_foreign_out_dir_is_not_replaced(keras_file: Path, tmp_path: Path) -> None:
    from export.convert import export_model

    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="refusing to replace"):
        export_model(keras_file, out)
    assert (out / "notes.txt").read_text() == "mine"


def test_failed_parity_leaves_nothing(
    keras_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import export.convert as convert

    real = convert.check_parity

    def off_by_a_lot(*args: Any, **kwargs: Any) -> convert.ParityResult:
        result = real(*args, **kwargs)
        return convert.ParityResult(0.5, result.argmax_agreement, result.batch_sizes, 1e-4)

    monkeypatch.setattr(convert, "check_parity", off_by_a_lot)
    out = tmp_path / "out"
    with pytest.raises(
        ExportError, match=r"parity failed: .*max abs diff 0\.5 > tolerance 0\.0001"
    ):
        convert.export_model(keras_file, out, parity_batch_sizes=(2,))
    assert not out.exists()
    assert _leftovers(tmp_path) == []


def test_an_ort_load_failure_is_one_export_error_line_and_leaves_nothing(
    keras_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real conversion, then ONNX Runtime refuses the converted model."""
    from onnxruntime.capi.onnxruntime_pybind11_state import InvalidGraph

    from export.convert import export_model

    def refuse(*_args: Any, **_kwargs: Any) -> Any:
        raise InvalidGraph("[ONNXRuntimeError] : 10 : INVALID_GRAPH : Load model failed:\n bad")

    monkeypatch.setattr(ort, "InferenceSession", refuse)
    out = tmp_path / "out"
    with pytest.raises(ExportError) as info:
        export_model(keras_file, out, parity_batch_sizes=(2,))
    assert str(info.value) == (
        "the converted model does not load in ONNX Runtime (CPU): InvalidGraph: "
        "[ONNXRuntimeError] : 10 : INVALID_GRAPH : Load model failed: bad"
    )
    assert info.value.exit_code == 2
    assert not out.exists()
    assert _leftovers(tmp_path) == []


# ---------------------------------------------------------------- commands


def test_parsers_defaults() -> None:
    from export.commands import add_export_args, add_train_reference_args

    train = argparse.ArgumentParser()
    add_train_reference_args(train)
    t = train.parse_args([])
    assert (t.out, t.image_size, t.seed) == (Path(".cache/reference-model"), 64, 0)
    assert t.epochs >= 1 and t.n_train >= 1
    assert train.parse_args(["--image-size", "256"]).image_size == 256

    exp = argparse.ArgumentParser()
    add_export_args(exp)
    e = exp.parse_args(["--out", "m"])
    assert (e.out, e.opset, e.tolerance, e.spec, e.version) == (Path("m"), 17, 1e-4, None, None)
    assert e.model == Path(".cache/reference-model")
    assert e.fp16 is False
    assert exp.parse_args(["--out", "m", "--fp16"]).fp16 is True


def test_fp16_flag_env(capsys: pytest.CaptureFixture[str]) -> None:
    from export.convert import FP16_MIN_AGREEMENT
    from worker.cli.main import build_parser

    args = build_parser({"MMSTREAM_FP16": "1"}).parse_args(["export", "--out", "m"])
    assert args.fp16 is True
    assert build_parser({}).parse_args(["export", "--out", "m"]).fp16 is False
    with pytest.raises(SystemExit):
        build_parser({}).parse_args(["export", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--fp16" in help_text and "[env: MMSTREAM_FP16]" in help_text
    assert f"{FP16_MIN_AGREEMENT:.1%}" in help_text


def test_export_main_replaces_a_previous_export(
    keras_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from export.commands import add_export_args, export_main

    parser = argparse.ArgumentParser()
    add_export_args(parser)
    out = tmp_path / "served"
    out.mkdir()
    (out / MODEL_FILE).write_bytes(b"stale")
    args = parser.parse_args(
        ["--model", str(keras_file.parent), "--out", str(out), "--version", "9.9.9"]
    )
    assert export_main(args) == 0
    printed = capsys.readouterr().out
    manifest = load_manifest(out)
    assert manifest.version == "9.9.9"
    assert manifest.sha256[:12] in printed and "max abs diff" in printed
    assert _leftovers(tmp_path) == []

    with pytest.raises(ConfigError, match="--out"):
        export_main(parser.parse_args([]))


# ---------------------------------------------------------------- the model family


@pytest.mark.parametrize("batched", [False, True], ids=["in-memory", "batch-by-batch"])
def test_train_reference_writes_model_and_sidecar(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, batched: bool
) -> None:
    import export.reference_model
    from export.reference_model import train_reference

    if batched:  # the path big (e.g. 256x256) images take
        monkeypatch.setattr(export.reference_model, "MAX_IN_MEMORY_BYTES", 0)

    result = train_reference(
        tmp_path / "ref", image_size=IMAGE_SIZE, n_train=200, epochs=1, n_test=100
    )
    assert (tmp_path / "ref" / KERAS_FILE).is_file()
    side = json.loads((tmp_path / "ref" / SIDECAR_FILE).read_text())
    assert list(side["parts"]) == ["image", "text", "audio"]
    assert side["parts"]["text"]["transform"]["kind"] == "words"
    assert side["label_output"] == "probabilities"
    card = side["model_card"]
    assert card == result["model_card"]
    assert set(card["evaluation"]["accuracy"]) == {
        "fused",
        "image_only",
        "text_only",
        "audio_only",
    }
    assert {"n_train", "epochs", "corrupt_p", "seed", "seconds"} <= set(card["training"])


@pytest.mark.parametrize(
    ("code", "exit_code"), [(errno.ENOSPC, 1), (errno.EACCES, 2)], ids=["ENOSPC", "EACCES"]
)
def test_train_reference_out_that_cannot_be_made_is_one_error_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, exit_code: int
) -> None:
    from export.reference_model import train_reference

    def refuse(self: Path, *_args: Any, **_kwargs: Any) -> None:
        raise OSError(code, os.strerror(code), str(self))

    monkeypatch.setattr(Path, "mkdir", refuse)
    out = tmp_path / "ref"
    with pytest.raises(ConfigError if exit_code == 2 else StorageError) as info:
        train_reference(out, n_train=1, epochs=1, n_test=1)
    assert str(info.value) == f"--out {str(out)!r}: {os.strerror(code)}"
    assert info.value.exit_code == exit_code


def test_featurize_and_256_model_shapes() -> None:
    from export.reference_model import build_model, featurize, reference_specs

    specs = reference_specs(256)
    x = featurize(samples(3, np.random.default_rng(0)), specs)
    assert x["image"].dtype == np.float32 and x["image"].shape == (3, 256, 256, 3)
    assert x["text"].dtype == np.int32 and x["text"].shape == (3, 16)
    assert x["audio"].dtype == np.float32 and x["audio"].shape == (3, 48, 40)
    model = build_model(specs)
    out = np.asarray(model.predict_on_batch(x))
    assert out.shape == (3, 10) and np.isfinite(out).all()
    assert model.count_params() < 200_000


# ---------------------------------------------------------------- TF stays out of the worker


@pytest.mark.parametrize(
    "modules",
    [
        "worker.contract.manifest, worker.contract.transforms, worker.contract.reference_data",
        "export.commands, export.onnx_import, export.spec",
    ],
)
def test_no_tensorflow_import(modules: str) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    code = f"import {modules}, sys; print('tensorflow' in sys.modules)"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    assert proc.stdout.strip() == "False"
