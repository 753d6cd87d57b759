"""Models shaped like the ones teams bring, built here without any network.

* :func:`onnx_multimodal`: an ONNX graph written with the ``onnx`` helpers (no framework)
  that takes a mean/std-normalised NCHW center crop (``pixel_values``), ``input_ids`` and
  ``attention_mask`` from a WordPiece tokenizer (int64, dynamic sequence length), a raw
  16 kHz waveform (``audio``, dynamic length) and a ``sample_rate`` scalar, and returns
  ``logits`` over three labels, an ``embedding`` and four multi-label ``tags``.
* :func:`keras_wordpiece`: a small Keras fused model whose text side takes ``input_ids``
  and ``attention_mask`` (int32) from a WordPiece tokenizer trained here, beside an image
  and a log-mel input, trained for an epoch on the reference task.

Both write the spec sidecar (``mmstream-spec.json``) and ``tokenizer.json`` beside the
model, as a team would before ``mmstream export``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from factories import train_wordpiece

#: (b)'s preprocessing, as its sidecar says: the torchvision recipe at 32 pixels.
IMAGE = {
    "kind": "image",
    "height": 32,
    "width": 32,
    "resize": "shorter_side_crop",
    "shorter_side": 36,
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
    "layout": "CHW",
}
TEXT_LENGTH = 16
AUDIO_SAMPLES = 16000
TAGS = ["loud", "bright", "wordy", "dark"]
LABELS = ["cat", "dog", "bird"]


def onnx_spec() -> dict[str, Any]:
    return {
        "name": "byom-onnx",
        "version": "2026.12",
        "parts": {
            "photo": {"transform": IMAGE, "inputs": {"pixel_values": "pixels"}},
            "caption": {
                "transform": {"kind": "tokenizer", "file": "tokenizer.json",
                              "max_length": TEXT_LENGTH},
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask"},
            },
            "voice": {
                "transform": {"kind": "waveform", "sample_rate": 16000,
                              "num_samples": AUDIO_SAMPLES, "normalize": "zero_mean_unit_var"},
                "inputs": ["audio"],
            },
        },
        "constants": {"sample_rate": 16000},
        "outputs": {
            "logits": {"kind": "logits", "description": "three made-up classes"},
            "embedding": {"kind": "embedding"},
            "tags": {"kind": "multilabel", "labels": TAGS, "thresholds": [0.5]},
        },
        "labels": LABELS,
        "label_output": "logits",
        "model_card": {"note": "random weights, written with onnx.helper"},
    }  # fmt: skip


def onnx_multimodal(out: Path, *, seed: int = 0, batch_mean: bool = False) -> Path:
    """Write (b) into ``out`` (model.onnx, tokenizer.json, mmstream-spec.json); return
    ``out/model.onnx``. ``batch_mean``: the audio features are centred on the batch's mean
    (a graph whose rows depend on each other, which the smoke check refuses)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    out.mkdir(parents=True, exist_ok=True)
    tok = train_wordpiece(out / "tokenizer.json")
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(tok)).get_vocab_size()
    rng = np.random.default_rng(seed)
    w = {
        "emb": rng.normal(0, 1, (vocab, 4)),
        "w1": rng.normal(0, 0.5, (9, 8)),
        "w2": rng.normal(0, 0.5, (8, 3)),
        "w3": rng.normal(0, 0.5, (8, 4)),
        "one": np.array([1.0]),
        "rate": np.array(16000.0),
    }
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in w.items()]
    inits += [
        numpy_helper.from_array(np.array([2, 3], np.int64), "hw_axes"),
        numpy_helper.from_array(np.array([1], np.int64), "axis1"),
        numpy_helper.from_array(np.array([-1], np.int64), "axis_last"),
    ]
    if batch_mean:
        inits.append(numpy_helper.from_array(np.array([0], np.int64), "axis0"))
    n = helper.make_node
    nodes = [
        # image: the per-channel mean over H and W -> [b, 3]
        n("ReduceMean", ["pixel_values", "hw_axes"], ["img"], keepdims=0),
        # text: masked mean of embeddings -> [b, 4]
        n("Gather", ["emb", "input_ids"], ["tok_emb"]),
        n("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
        n("Unsqueeze", ["maskf", "axis_last"], ["mask3"]),
        n("Mul", ["tok_emb", "mask3"], ["masked"]),
        n("ReduceSum", ["masked", "axis1"], ["tsum"], keepdims=0),
        n("ReduceSum", ["maskf", "axis1"], ["tcount"], keepdims=1),
        n("Max", ["tcount", "one"], ["tcount1"]),
        n("Div", ["tsum", "tcount1"], ["txt"]),
        # audio: scaled by sample_rate / 16000, then mean |x| and mean x^2 -> [b, 2]
        n("Cast", ["sample_rate"], ["srf"], to=TensorProto.FLOAT),
        n("Div", ["srf", "rate"], ["srs"]),
        n("Mul", ["audio", "srs"], ["aud"]),
        n("Abs", ["aud"], ["aabs"]),
        n("ReduceMean", ["aabs", "axis1"], ["a1"], keepdims=1),
        n("Mul", ["aud", "aud"], ["asq"]),
        n("ReduceMean", ["asq", "axis1"], ["a2"], keepdims=1),
        n("Concat", ["a1", "a2"], ["afeat"], axis=1),
    ]
    if batch_mean:
        nodes += [
            n("ReduceMean", ["afeat", "axis0"], ["amean"], keepdims=1),
            n("Sub", ["afeat", "amean"], ["afeat2"]),
        ]
    nodes += [
        n("Concat", ["img", "txt", "afeat2" if batch_mean else "afeat"], ["feat"], axis=1),
        n("MatMul", ["feat", "w1"], ["h"]),
        n("Tanh", ["h"], ["embedding"]),
        n("MatMul", ["embedding", "w2"], ["logits"]),
        n("MatMul", ["embedding", "w3"], ["tag_logits"]),
        n("Sigmoid", ["tag_logits"], ["tags"]),
    ]
    f, i64 = TensorProto.FLOAT, TensorProto.INT64
    graph = helper.make_graph(
        nodes,
        "byom",
        [
            helper.make_tensor_value_info("pixel_values", f, ["batch", 3, 32, 32]),
            helper.make_tensor_value_info("input_ids", i64, ["batch", "sequence"]),
            helper.make_tensor_value_info("attention_mask", i64, ["batch", "sequence"]),
            helper.make_tensor_value_info("audio", f, ["batch", "samples"]),
            helper.make_tensor_value_info("sample_rate", i64, []),
        ],
        [
            helper.make_tensor_value_info("logits", f, ["batch", 3]),
            helper.make_tensor_value_info("embedding", f, ["batch", 8]),
            helper.make_tensor_value_info("tags", f, ["batch", 4]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    path = out / "model.onnx"
    onnx.save(model, str(path))
    (out / "mmstream-spec.json").write_text(json.dumps(onnx_spec(), indent=2))
    return path


_LAYERS: dict[str, Any] = {}


def _mask_mean() -> Any:
    """A Keras layer: the mean of ``embeddings [n, T, D]`` where ``mask [n, T]`` is 1
    (registered once, so that the export can load the saved model)."""
    if "MaskMean" not in _LAYERS:
        import keras
        from keras import ops

        @keras.saving.register_keras_serializable(package="byom_test")
        class MaskMean(keras.layers.Layer):  # type: ignore[misc]
            def call(self, inputs: Any) -> Any:
                emb, mask = inputs
                m = ops.expand_dims(ops.cast(mask, emb.dtype), -1)
                return ops.sum(emb * m, axis=1) / ops.maximum(ops.sum(m, axis=1), 1.0)

            def compute_output_shape(self, shapes: Any) -> Any:
                return (shapes[0][0], shapes[0][-1])

        _LAYERS["MaskMean"] = MaskMean
    return _LAYERS["MaskMean"]


def keras_wordpiece(out: Path, *, seed: int = 0, epochs: int = 1) -> Path:
    """Write (a) into ``out`` (model.keras, tokenizer.json, mmstream-spec.json); return
    ``out/model.keras``. Needs TensorFlow (the export extra)."""
    import keras
    from keras import layers

    from worker.contract.reference_data import LABELS as DIGITS
    from worker.contract.reference_data import sample_media, samples
    from worker.contract.transforms import ImageTransform, LogMelTransform, TokenizerTransform

    out.mkdir(parents=True, exist_ok=True)
    train_wordpiece(out / "tokenizer.json")
    image = ImageTransform(16, 16, 3)
    text = TokenizerTransform(max_length=TEXT_LENGTH, base_dir=out)
    audio = LogMelTransform()
    keras.utils.set_random_seed(seed)

    ids_in = keras.Input(shape=(TEXT_LENGTH,), dtype="int32", name="input_ids")
    mask_in = keras.Input(shape=(TEXT_LENGTH,), dtype="int32", name="attention_mask")
    image_in = keras.Input(shape=image.shape(), dtype="float32", name="image")
    audio_in = keras.Input(shape=audio.shape(), dtype="float32", name="audio")
    vocab = text.tokenizer.get_vocab_size()
    emb = layers.Embedding(vocab, 16, name="text_embedding")(ids_in)
    text_vec = _mask_mean()(name="text_mean")([emb, mask_in])
    img_vec = layers.Dense(16, activation="relu")(layers.GlobalAveragePooling2D()(image_in))
    aud = layers.Rescaling(0.1)(audio_in)
    aud_vec = layers.Dense(16, activation="relu")(layers.GlobalAveragePooling1D()(aud))
    fused = layers.Concatenate()([img_vec, text_vec, aud_vec])
    probs = layers.Dense(len(DIGITS), activation="softmax", name="probabilities")(fused)
    model = keras.Model(
        inputs={
            "input_ids": ids_in,
            "attention_mask": mask_in,
            "image": image_in,
            "audio": audio_in,
        },
        outputs=probs,
    )
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    train = samples(300, np.random.default_rng(seed), split="train", corrupt_p=0.2)
    enc = text.apply_batch([s.text for s in train])
    x = {
        "input_ids": enc["input_ids"].astype(np.int32),
        "attention_mask": enc["attention_mask"].astype(np.int32),
        "image": image.apply_batch([sample_media(s, "image") for s in train])["pixels"],
        "audio": audio.apply_batch([sample_media(s, "audio") for s in train])["features"],
    }
    y = np.array([s.label for s in train], dtype=np.int64)
    model.fit(x, y, batch_size=50, epochs=epochs, verbose=0)
    path = out / "model.keras"
    model.save(path, zipped=True)
    spec = {
        "name": "byom-keras-wordpiece",
        "version": "1",
        "parts": {
            "image": {"transform": image.to_dict(), "inputs": ["image"]},
            "text": {
                "transform": text.to_dict(),
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask"},
            },
            "audio": {"transform": audio.to_dict(), "inputs": ["audio"]},
        },
        "outputs": {"probabilities": {"kind": "probabilities"}},
        "labels": list(DIGITS),
        "label_output": "probabilities",
        "model_card": {"note": "one epoch on the reference task; a test model"},
    }
    (out / "mmstream-spec.json").write_text(json.dumps(spec, indent=2))
    return path


def main(argv: list[str] | None = None) -> int:
    """``python tests/byom_models.py OUT``: build (a) and (b) and export them to
    ``OUT/byom-keras`` and ``OUT/byom-onnx`` (their sources beside, ``*-src``)."""
    import argparse

    from export.onnx_import import import_onnx

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    import_onnx(onnx_multimodal(args.out / "byom-onnx-src"), args.out / "byom-onnx")
    from export.convert import export_model

    export_model(keras_wordpiece(args.out / "byom-keras-src"), args.out / "byom-keras")
    print(f"wrote {args.out / 'byom-onnx'} and {args.out / 'byom-keras'}")
    return 0


if __name__ == "__main__":  # run as a script, tests/ is first on sys.path
    raise SystemExit(main())
