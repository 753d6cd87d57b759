"""The manifest: parts that fill several inputs, constants, described outputs, every
refusal naming its input, format-1 manifests still loading, every file's sha256."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from worker.contract.errors import ModelError
from worker.contract.manifest import (
    ConstantInfo,
    InputInfo,
    Manifest,
    OutputInfo,
    PartInfo,
    load_manifest,
    sha256_file,
)
from worker.contract.records import Event, Part
from worker.contract.reference_data import VOCABULARY
from worker.contract.transforms import ImageTransform, TokenizerTransform, WordsTransform
from worker.inference.model import ModelRunner, SessionInfo

from factories import small_manifest, source, train_wordpiece

ROOT = Path(__file__).resolve().parents[1]
WORDS = WordsTransform(VOCABULARY, max_length=6)
IMAGE = ImageTransform(4, 4, 3, layout="CHW")


def text_model(**overrides: Any) -> Manifest:
    """A part "caption" filling input_ids and mask; a part "photo"; a constant "sr"."""
    ids, mask = InputInfo("ids", "int64", (6,)), InputInfo("mask", "int64", (6,))
    pixels, sr = InputInfo("pixels", "float32", (3, 4, 4)), InputInfo("sr", "int64", (), False)
    state = InputInfo("state", "float32", (2,))
    fields: dict[str, Any] = {
        "name": "m",
        "version": "1",
        "sha256": "0" * 64,
        "opset": 17,
        "inputs": (ids, mask, pixels, sr, state),
        "parts": (
            PartInfo("caption", WORDS, ((ids, "input_ids"), (mask, "attention_mask"))),
            PartInfo("photo", IMAGE, ((pixels, "pixels"),)),
        ),
        "constants": (ConstantInfo(sr, 16000), ConstantInfo(state, 0.0)),
        "outputs": (
            OutputInfo("logits", "float32", (3,), kind="logits"),
            OutputInfo(
                "tags", "float32", (3,), kind="multilabel", labels=("x", "y", "z"),
                thresholds=(0.5, 0.9, 0.5), from_logits=False,
            ),
            OutputInfo("embedding", "float32", (2, 2), kind="embedding"),
        ),
        "labels": ("a", "b", "c"),
        "label_output": "logits",
    }  # fmt: skip
    fields.update(overrides)
    return Manifest(**fields)


def test_a_manifest_round_trips_and_validates_against_the_schema() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    m = text_model()
    d = json.loads(json.dumps(m.to_dict()))
    schema = json.loads((ROOT / "schemas" / "manifest.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.Draft202012Validator(schema).validate(d)
    back = Manifest.from_dict(d)
    assert back.to_dict() == m.to_dict()
    assert back.part("caption") is not None and back.part("caption").input_names == ("ids", "mask")
    assert back.part_of("sr") is None and back.part_of("mask").name == "caption"  # type: ignore[union-attr]
    jsonschema.Draft202012Validator(schema).validate(small_manifest().to_dict())


def test_every_input_is_filled_exactly_once_with_its_shape_and_a_kind_its_dtype_takes() -> None:
    ids = InputInfo("ids", "int64", (6,))
    with pytest.raises(ModelError, match=r"inputs \['state'\] are filled by no part"):
        text_model(constants=(ConstantInfo(InputInfo("sr", "int64", (), False), 16000),))
    with pytest.raises(ModelError, match="'ids' is filled twice"):
        text_model(constants=(*text_model().constants, ConstantInfo(ids, 1)))
    with pytest.raises(ModelError, match=r"'ids' takes \[batch, 7\] but part 'caption' makes"):
        bad = InputInfo("ids", "int64", (7,))
        text_model(
            inputs=(bad, *text_model().inputs[1:]),
            parts=(PartInfo("caption", WORDS, ((bad, "input_ids"),)), text_model().parts[1]),
        )
    with pytest.raises(
        ModelError, match="'pixels' is int64 but part 'photo' makes pixels as float"
    ):
        px = InputInfo("pixels", "int64", (3, 4, 4))
        text_model(parts=(text_model().parts[0], PartInfo("photo", IMAGE, ((px, "pixels"),))))
    with pytest.raises(
        ModelError, match=r"makes \['attention_mask', 'input_ids'\], not 'token_type_ids'"
    ):
        text_model(parts=(PartInfo("caption", WORDS, ((ids, "token_type_ids"),)),))
    with pytest.raises(ModelError, match="only a constant can fill it"):
        sr = InputInfo("sr", "float32", (3, 4, 4), False)
        text_model(parts=(PartInfo("photo", IMAGE, ((sr, "pixels"),)),))
    with pytest.raises(ModelError, match="value does not fit"):
        text_model(constants=(ConstantInfo(InputInfo("sr", "int64", (), False), [1, 2]),))


def test_described_outputs_are_checked() -> None:
    with pytest.raises(ModelError, match="needs its labels"):
        OutputInfo("t", "float32", (3,), kind="multilabel")
    with pytest.raises(ModelError, match="one value or one per label"):
        OutputInfo(
            "t", "float32", (3,), kind="multilabel", labels=("a", "b", "c"), thresholds=(1, 2)
        )
    with pytest.raises(ModelError, match="kind 'score'"):
        OutputInfo("t", "float32", (3,), kind="score")
    with pytest.raises(ModelError, match="label_output 'nope'"):
        text_model(label_output="nope")


class FeedSession:
    def __init__(self) -> None:
        self.feeds: list[dict[str, Any]] = []

    def run(self, names: Sequence[str] | None, feed: dict[str, Any]) -> list[Any]:
        self.feeds.append(feed)
        n = len(feed["ids"])
        logits = np.tile(np.array([[1.0, 3.0, 2.0]], np.float32), (n, 1))
        tags = np.tile(np.array([[0.7, 0.8, 0.1]], np.float32), (n, 1))
        emb = np.arange(n * 4, dtype=np.float32).reshape(n, 2, 2)
        return [logits, tags, emb]


def test_the_runner_stacks_each_input_from_its_part_and_feeds_the_constants() -> None:
    m = text_model()
    session = FeedSession()
    runner = ModelRunner(m, session, SessionInfo("CPUExecutionProvider", ()))
    events = []
    for k in range(2):
        cap = Part(
            f"e{k}", "caption", m.part("caption").fill(WORDS.apply("the number seven")), source(k)
        )  # type: ignore[union-attr]
        photo = Part(f"e{k}", "photo", {"pixels": np.full((3, 4, 4), k, np.float32)}, source(k))
        events.append(Event(f"e{k}", 0, {"caption": cap, "photo": photo}, 0, 0))
    preds = runner.predict(events, clock=lambda: 5)
    feed = session.feeds[0]
    assert feed["ids"].dtype == np.int64 and feed["ids"].shape == (2, 6)
    assert feed["mask"][0].tolist() == [1, 1, 1, 0, 0, 0]
    assert feed["sr"].shape == () and int(feed["sr"]) == 16000
    assert feed["state"].shape == (2, 2) and not feed["state"].any()
    assert (feed["pixels"][1] == 1).all()
    p = preds[1]
    assert p.label == "b" and p.score == pytest.approx(np.exp(3) / (np.e + np.exp(3) + np.exp(2)))
    assert p.tags == {"tags": ["x"]}  # 0.8 is under y's threshold of 0.9
    assert p.outputs["embedding"] == [[4.0, 5.0], [6.0, 7.0]]
    assert p.to_json_dict(runner.model_ref)["tags"] == {"tags": ["x"]}


def test_an_absent_part_is_its_transform_of_blank_media() -> None:
    m = text_model(accepts_missing=True)
    blank = m.part("caption").blank()  # type: ignore[union-attr]
    assert blank["ids"].tolist() == [0] * 6 and blank["mask"].tolist() == [0] * 6
    assert blank["ids"].dtype == np.int64


def test_a_format_1_manifest_loads_as_one_part_per_input() -> None:
    v1 = {
        "format_version": 1,
        "name": "old",
        "version": "1",
        "model_file": "model.onnx",
        "sha256": "0" * 64,
        "opset": 17,
        "producer": {},
        "inputs": [
            {
                "name": "image", "modality": "image", "dtype": "float32", "shape": [None, 8, 8, 3],
                "preprocessing": {"kind": "image", "height": 8, "width": 8, "channels": 3,
                                  "scale": 1 / 255, "resample": "bilinear"},
            },
            {
                "name": "text", "modality": "text", "dtype": "int32", "shape": [None, 4],
                "preprocessing": {"kind": "text", "vocabulary": ["<pad>", "<oov>", "a"],
                                  "max_length": 4, "pad_id": 0, "oov_id": 1, "max_chars": 9,
                                  "lowercase": True, "token_pattern": "[a-z0-9']+"},
            },
        ],
        "outputs": [{"name": "probabilities", "dtype": "float32", "shape": [None, 2]}],
        "labels": ["x", "y"],
        "label_output": "probabilities",
        "parity": {}, "model_card": {},
    }  # fmt: skip
    m = Manifest.from_dict(v1)
    assert m.part_names == ("image", "text")
    assert m.part("text").fills[0][1] == "input_ids"  # type: ignore[union-attr]
    assert m.part("image").transform == ImageTransform(8, 8)  # type: ignore[union-attr]
    assert m.outputs[0].kind == "probabilities"
    assert Manifest.from_dict(m.to_dict()).to_dict() == m.to_dict()
    with pytest.raises(ModelError, match="format_version 3"):
        Manifest.from_dict({**v1, "format_version": 3})


def test_every_file_of_the_model_directory_is_hash_checked(tmp_path: Path) -> None:
    train_wordpiece(tmp_path / "tokenizer.json")
    (tmp_path / "model.onnx").write_bytes(b"graph")
    ids = InputInfo("ids", "int64", (8,))
    m = Manifest(
        name="t", version="1", sha256=sha256_file(tmp_path / "model.onnx"), opset=17,
        inputs=(ids,), outputs=(OutputInfo("o", "float32", (2,)),),
        parts=(PartInfo("text", TokenizerTransform(max_length=8), ((ids, "input_ids"),)),),
        files={"tokenizer.json": sha256_file(tmp_path / "tokenizer.json")},
    )  # fmt: skip
    m.write(tmp_path)
    loaded = load_manifest(tmp_path)
    assert loaded.part("text").transform.apply("seven")["input_ids"][0] == 2  # type: ignore[union-attr]
    with (tmp_path / "tokenizer.json").open("a") as f:
        f.write(" ")
    with pytest.raises(ModelError, match=r"tokenizer\.json sha256 .* does not match"):
        load_manifest(tmp_path)
    with pytest.raises(ModelError, match=r"files \['tokenizer.json'\] are read by a transform"):
        Manifest.from_dict({**m.to_dict(), "files": {}}, tmp_path)


def test_a_label_or_multilabel_output_has_one_axis_per_example_and_labels_are_optional() -> None:
    with pytest.raises(ModelError, match="multilabel output needs one axis per example"):
        OutputInfo("t", "float32", (2, 3), kind="multilabel", labels=("a", "b", "c"),
                   thresholds=(0.5,))  # fmt: skip
    with pytest.raises(ModelError, match="logits output needs one axis per example"):
        OutputInfo("t", "float32", (4, 3), kind="logits")
    m = text_model(labels=())  # a label output without names: the index is the label
    runner = ModelRunner(m, FeedSession(), SessionInfo("CPUExecutionProvider", ()))
    cap = Part("e", "caption", m.part("caption").fill(WORDS.apply("seven")), source(0))  # type: ignore[union-attr]
    photo = Part("e", "photo", {"pixels": np.zeros((3, 4, 4), np.float32)}, source(1))
    (pred,) = runner.predict([Event("e", 0, {"caption": cap, "photo": photo}, 0, 0)], lambda: 0)
    assert pred.label == "1" and pred.score is not None
