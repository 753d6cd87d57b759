"""`mmstream export` of an existing ONNX model: the manifest it writes, its smoke check,
and every refusal as one line naming the input and the mismatch (exit 2). No TensorFlow."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from worker import cli
from worker.contract.errors import ExportError
from worker.contract.manifest import MANIFEST_FILE, load_manifest

from byom_models import onnx_multimodal, onnx_spec

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return onnx_multimodal(tmp_path_factory.mktemp("byom-src") / "src")


def _with_spec(source: Path, tmp: Path, **changes: Any) -> Path:
    """A copy of the source directory whose sidecar has ``changes`` applied."""
    d = tmp / "variant"
    shutil.copytree(source.parent, d)
    spec = onnx_spec()
    for key, value in changes.items():
        if value is None:
            spec.pop(key, None)
        else:
            spec[key] = value
    (d / "mmstream-spec.json").write_text(json.dumps(spec))
    return d / "model.onnx"


def _refusal(model: Path, out: Path, capsys: pytest.CaptureFixture[str]) -> str:
    code = cli.main(["export", "--model", str(model), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.count("\n") == 0 and err.startswith("mmstream: error: "), err
    assert not out.exists()
    return err


def test_an_onnx_model_is_imported_with_its_parts_constants_and_outputs(
    source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    out = tmp_path / "served"
    assert cli.main(["export", "--model", str(source), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "part caption (tokenizer) -> input_ids int64[16], attention_mask int64[16]" in printed
    assert "constant sample_rate = 16000" in printed
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST_FILE, "model.onnx", "tokenizer.json"]
    raw = json.loads((out / MANIFEST_FILE).read_text())
    schema = json.loads((ROOT / "schemas" / "manifest.schema.json").read_text())
    jsonschema.Draft202012Validator(schema).validate(raw)
    m = load_manifest(out)
    assert m.opset == 18 and m.producer["source"] == "model.onnx"
    assert [(i.name, i.dtype, i.shape, i.batched) for i in m.inputs] == [
        ("pixel_values", "float32", (3, 32, 32), True),
        ("input_ids", "int64", (16,), True),
        ("attention_mask", "int64", (16,), True),
        ("audio", "float32", (16000,), True),
        ("sample_rate", "int64", (), False),
    ]
    assert [(o.name, o.kind, o.shape) for o in m.outputs] == [
        ("logits", "logits", (3,)),
        ("embedding", "embedding", (8,)),
        ("tags", "multilabel", (4,)),
    ]
    assert m.parity["passed"] and m.parity["batch_sizes"] == [1, 4]
    assert m.parity["max_abs_diff"] <= 1e-4
    assert set(m.files) == {"tokenizer.json"}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"constants": None},
            "model input 'sample_rate' (int64[]) is filled by no part and no constant",
        ),
        (
            {"constants": {"sample_rate": 16000, "pixel_values": 0}},
            "input 'pixel_values' is filled twice: by part 'photo' and a constant",
        ),
        (
            {"parts": {**onnx_spec()["parts"], "photo": {
                "transform": {**onnx_spec()["parts"]["photo"]["transform"], "height": 30},
                "inputs": {"pixel_values": "pixels"}}}},
            "input 'pixel_values' (float32[batch, 3, 32, 32]), filled by part 'photo' pixels: "
            "dimension 2 is 32 in the graph but the transform makes 30",
        ),
        (
            {"parts": {**onnx_spec()["parts"], "photo": {
                "transform": onnx_spec()["parts"]["photo"]["transform"],
                "inputs": {"input_ids": "pixels"}}}},
            "input 'input_ids' is filled twice: by part 'photo' and part 'caption'",
        ),
        (
            {"parts": {**onnx_spec()["parts"], "voice": {
                "transform": {"kind": "log_mel"}, "inputs": ["audio"]}}},
            "input 'audio' (float32[batch, samples]), filled by part 'voice' features: the "
            "graph has 2 dimensions but the transform makes [batch, 48, 40]",
        ),
        (
            {"parts": {**onnx_spec()["parts"], "extra": {
                "transform": {"kind": "words", "vocabulary": ["a", "b"]}, "inputs": ["nope"]}}},
            "part 'extra' fills 'nope', which is not a model input",
        ),
        (
            {"outputs": {"probs": {"kind": "probabilities"}}},
            "outputs ['probs'] in the sidecar are not model outputs",
        ),
        (
            {"label_output": "embedding"},
            "label_output 'embedding' is described as embedding",
        ),
        (
            {"labels": ["a", "b"]},
            "2 labels but output 'logits' has shape [None, 3]",
        ),
        (
            {"parts": {**onnx_spec()["parts"], "photo": {
                "transform": {"kind": "image", "height": 32, "width": 32, "colour": 1},
                "inputs": ["pixel_values"]}}},
            "part 'photo': transform 'image': unknown keys ['colour']",
        ),
    ],
    ids=[
        "unfilled", "twice", "shape", "twice-by-parts", "rank", "unknown-input",
        "unknown-output", "label-kind", "labels", "bad-transform",
    ],
)  # fmt: skip
def test_a_spec_that_does_not_fit_the_graph_is_one_line_naming_the_input(
    source: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    changes: dict[str, Any],
    message: str,
) -> None:
    err = _refusal(_with_spec(source, tmp_path, **changes), tmp_path / "out", capsys)
    assert message in err, err


def test_a_graph_ort_cannot_load_and_a_fixed_batch_are_refused(
    source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import onnx

    from export.onnx_import import import_onnx

    model = onnx.load(str(source))
    model.graph.input[3].type.tensor_type.elem_type = onnx.TensorProto.INT64  # audio * float
    d = tmp_path / "dtype"
    shutil.copytree(source.parent, d)
    onnx.save(model, str(d / "model.onnx"))
    with pytest.raises(ExportError) as info:
        import_onnx(d / "model.onnx", tmp_path / "o1")
    assert str(info.value).startswith("model.onnx does not load in ONNX Runtime (CPU): Fail:")
    assert "\n" not in str(info.value)
    model = onnx.load(str(source))
    model.graph.input[2].type.tensor_type.shape.dim[0].dim_value = 1
    d2 = tmp_path / "fixed"
    shutil.copytree(source.parent, d2)
    onnx.save(model, str(d2 / "model.onnx"))
    err = _refusal(d2 / "model.onnx", tmp_path / "o2", capsys)
    assert "input 'attention_mask'" in err and "the batch dimension is fixed at 1" in err, err


def test_text_for_an_image_graph_input_is_refused_by_kind(
    source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parts = {
        **onnx_spec()["parts"],
        "caption": {
            "transform": {"kind": "tokenizer", "file": "tokenizer.json", "max_length": 16},
            "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask"},
        },
        "photo": {"transform": {"kind": "image", "height": 32, "width": 32, "dtype": "uint8",
                                "layout": "CHW"}, "inputs": ["pixel_values"]},
    }  # fmt: skip
    err = _refusal(_with_spec(source, tmp_path, parts=parts), tmp_path / "out", capsys)
    assert "input 'pixel_values'" in err and "the graph wants float32" in err, err
    assert "uint8 values" in err


def test_a_graph_whose_rows_depend_on_each_other_fails_the_smoke_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = onnx_multimodal(tmp_path / "src", batch_mean=True)
    err = _refusal(model, tmp_path / "out", capsys)
    assert "smoke check failed: batched outputs differ from one-at-a-time runs" in err, err


def test_a_missing_tokenizer_file_and_external_data_are_refused(
    source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = _with_spec(source, tmp_path)
    (model.parent / "tokenizer.json").unlink()
    err = _refusal(model, tmp_path / "out", capsys)
    assert "tokenizer.json" in err, err
    import onnx

    m = onnx.load(str(source))
    d = tmp_path / "ext"
    shutil.copytree(source.parent, d)
    onnx.save(m, str(d / "model.onnx"), save_as_external_data=True, size_threshold=0)
    err = _refusal(d / "model.onnx", tmp_path / "out2", capsys)
    assert "external data" in err, err


def test_the_smoke_feed_is_what_the_worker_would_feed(source: Path, tmp_path: Path) -> None:
    """Generated media, encoded and decoded as records are, through the transforms."""
    from export.onnx_import import import_onnx

    m = import_onnx(source, tmp_path / "m")
    from export.convert import Fitted

    fitted = Fitted(m.inputs, m.parts, m.constants)
    feed = fitted.feed_bytes(3, 7)
    assert feed["input_ids"].dtype == np.int64 and feed["input_ids"].shape == (3, 16)
    assert feed["input_ids"][0].tolist()[:2] == [2, 3]  # row 0: the blank (empty) text
    assert feed["pixel_values"].shape == (3, 3, 32, 32) and feed["sample_rate"].shape == ()
    assert not feed["audio"][0].any() and feed["audio"][1].any()


def test_fit_takes_a_float_mask_and_refuses_a_constant_shape_that_is_not_ints(
    source: Path,
) -> None:
    from export.spec import GraphTensor, fit_inputs, parse_spec

    graph = [
        GraphTensor("pixel_values", "float32", (None, 3, 32, 32)),
        GraphTensor("input_ids", "int64", ("batch", "seq")),
        GraphTensor("attention_mask", "float32", ("batch", "seq")),  # as many exports take it
        GraphTensor("audio", "float32", ("batch", "samples")),
        GraphTensor("sample_rate", "int64", ()),
    ]
    spec = parse_spec(onnx_spec(), source.parent)
    inputs, parts, _ = fit_inputs(spec, graph)
    assert {i.name: i.dtype for i in inputs}["attention_mask"] == "float32"
    caption = next(p for p in parts if p.name == "caption")
    assert caption.fill(caption.transform.apply("seven"))["attention_mask"].dtype == np.float32
    bad = parse_spec(
        {**onnx_spec(), "constants": {"sample_rate": {"value": 1, "shape": [None]}}}, source.parent
    )
    with pytest.raises(ExportError, match=r"shape \[None\] is not positive ints"):
        fit_inputs(bad, graph)
