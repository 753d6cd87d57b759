"""The reference model for "digits seen, read and heard" and how it is trained.

A small Keras functional model with one input per modality (named ``image``,
``text`` and ``audio``, like the modalities) and concatenation fusion:

* image ``[H, W, 3]`` float32: average-pool down to about 16x16, two small
  conv blocks, flatten, dense;
* text ``[16]`` int32 token ids: embedding, then a mean over the non-padding
  tokens computed explicitly (:class:`MaskedMean`), so an all-padding text gives
  zeros rather than NaN;
* audio ``[48, 40]`` float32 log-mel: per-frame 1-D convolution, mean over
  time, dense;
* concatenation, a hidden layer, dropout and the 10-way softmax ``probabilities``.

Features are made only with :mod:`worker.contract.transforms`, the code the worker
serves with. :func:`train_reference` writes ``model.keras`` and the sidecar
``mmstream-spec.json`` (parts and their transforms, labels, model card) that
:func:`export.convert.export_model` turns into the ONNX model directory.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import keras  # ``export/__init__`` has already set the TF environment variables
import numpy as np
from keras import layers, ops
from numpy.typing import NDArray
from PIL import Image as PILImage

from export import KERAS_FILE, SIDECAR_FILE
from worker.contract.errors import ConfigError, os_error
from worker.contract.reference_data import LABELS, MODALITIES, VOCABULARY, Sample, samples
from worker.contract.transforms import (
    ImageTransform,
    LogMelTransform,
    Transform,
    WordsTransform,
    log_mel,
    prepare_image,
    tokenize,
)

log = logging.getLogger(__name__)

MODEL_NAME = "digits-seen-read-heard"
LABEL_OUTPUT = "probabilities"
TEXT_MAX_LENGTH = 16
#: Held-out samples are drawn with this seed whatever the training seed is.
TEST_SEED = 20261128
_AUDIO_CHUNK = 256
_EVAL_CHUNK = 256
#: Training features bigger than this are made batch by batch instead of all at once.
MAX_IN_MEMORY_BYTES = 1 << 30


#: The transform output each reference input takes (part, input and modality share a name).
REFERENCE_OUTPUTS = {"image": "pixels", "text": "input_ids", "audio": "features"}


def reference_specs(image_size: int = 64) -> dict[str, Transform]:
    """Transforms of the reference model's parts, keyed by part name (= input = modality)."""
    if image_size < 1:
        raise ConfigError(f"image size must be a positive number of pixels, not {image_size}")
    return {
        "image": ImageTransform(image_size, image_size, 3),
        "text": WordsTransform(VOCABULARY, max_length=TEXT_MAX_LENGTH),
        "audio": LogMelTransform(),
    }


def _typed_specs(
    specs: Mapping[str, Transform],
) -> tuple[ImageTransform, WordsTransform, LogMelTransform]:
    image, text, audio = specs.get("image"), specs.get("text"), specs.get("audio")
    if (
        not isinstance(image, ImageTransform)
        or not isinstance(text, WordsTransform)
        or not isinstance(audio, LogMelTransform)
    ):
        got = ", ".join(f"{k}: {type(v).__name__}" for k, v in specs.items())
        raise ConfigError(
            "the reference model needs an ImageTransform 'image', a WordsTransform 'text' "
            f"and a LogMelTransform 'audio'; got {{{got}}}"
        )
    return image, text, audio


# ---------------------------------------------------------------- features


def featurize(samples: Sequence[Sample], specs: Mapping[str, Transform]) -> dict[str, NDArray[Any]]:
    """Batch tensors of ``samples``: image float32 ``[n, H, W, C]``, text int32
    ``[n, max_length]``, audio float32 ``[n, frames, n_mels]``.

    Uses only :mod:`worker.contract.transforms`, i.e. exactly what the worker does.
    """
    image_spec, text_spec, audio_spec = _typed_specs(specs)
    n = len(samples)
    images = np.empty((n, *image_spec.shape()), dtype=np.float32)
    texts = np.empty((n, *text_spec.shape()), dtype=np.int32)
    for i, s in enumerate(samples):
        images[i] = prepare_image(PILImage.fromarray(s.image), image_spec)
        texts[i] = tokenize(s.text, text_spec)
    audio = np.empty((n, *audio_spec.shape()), dtype=np.float32)
    for start in range(0, n, _AUDIO_CHUNK):  # bounded memory for the STFT frames
        chunk = samples[start : start + _AUDIO_CHUNK]
        waves = np.stack([np.asarray(s.audio, dtype=np.float32) for s in chunk])
        audio[start : start + len(chunk)] = log_mel(waves, audio_spec)
    return {"image": images, "text": texts, "audio": audio}


def blank_features(n: int, specs: Mapping[str, Transform]) -> dict[str, NDArray[Any]]:
    """What ``n`` absent modalities look like: zero image, empty text, silent audio.

    The same blank media through the same transform as the worker uses to fill a
    missing part (:meth:`worker.contract.manifest.PartInfo.blank`).
    """
    out = {}
    for name, spec in specs.items():
        blank = spec.apply(spec.blank_media())[REFERENCE_OUTPUTS[name]]
        out[name] = np.broadcast_to(blank, (n, *blank.shape)).copy()
    return out


def only(
    features: Mapping[str, NDArray[Any]], keep: str, specs: Mapping[str, Transform]
) -> dict[str, NDArray[Any]]:
    """``features`` with every modality but ``keep`` blanked."""
    n = len(features[keep])
    out = blank_features(n, specs)
    out[keep] = features[keep]
    return out


# ---------------------------------------------------------------- model


@keras.saving.register_keras_serializable(package="mmstream")
class MaskedMean(layers.Layer):  # type: ignore[misc]
    """Mean of ``embeddings [n, T, D]`` over the positions where ``ids [n, T] != pad_id``.

    ``sum(emb * mask) / maximum(count, 1)``: an all-padding row gives zeros, not NaN.
    """

    def __init__(self, pad_id: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.pad_id = int(pad_id)

    def call(self, inputs: Sequence[Any]) -> Any:
        embeddings, ids = inputs
        mask = ops.expand_dims(ops.cast(ops.not_equal(ids, self.pad_id), embeddings.dtype), -1)
        total = ops.sum(embeddings * mask, axis=1)
        count = ops.sum(mask, axis=1)
        return total / ops.maximum(count, 1.0)

    def compute_output_shape(self, input_shape: Sequence[tuple[int | None, ...]]) -> Any:
        emb_shape = input_shape[0]
        return (emb_shape[0], emb_shape[-1])

    def get_config(self) -> dict[str, Any]:
        config: dict[str, Any] = super().get_config()
        config["pad_id"] = self.pad_id
        return config


def build_model(specs: Mapping[str, Transform], num_classes: int = 10, *, width: int = 1) -> Any:
    """The fused model (a ``keras.Model``) with dict inputs ``image``, ``text``, ``audio``.

    ``width`` multiplies the number of filters and units of every branch.
    """
    image_spec, text_spec, audio_spec = _typed_specs(specs)
    if width < 1:
        raise ConfigError(f"width must be >= 1, not {width}")
    if num_classes < 2:
        raise ConfigError(f"num_classes must be >= 2, not {num_classes}")

    image_in = keras.Input(shape=image_spec.shape(), dtype="float32", name="image")
    text_in = keras.Input(shape=text_spec.shape(), dtype="int32", name="text")
    audio_in = keras.Input(shape=audio_spec.shape(), dtype="float32", name="audio")

    # image: pool to ~16x16 first, so a 256x256 input costs little more than a 64x64 one
    x = image_in
    pool = (max(1, image_spec.height // 16), max(1, image_spec.width // 16))
    if pool != (1, 1):
        x = layers.AveragePooling2D(pool_size=pool, name="image_downsample")(x)
    x = layers.Conv2D(16 * width, 3, padding="same", activation="relu", name="image_conv1")(x)
    x = layers.MaxPooling2D(2, name="image_pool1")(x)
    x = layers.Conv2D(32 * width, 3, padding="same", activation="relu", name="image_conv2")(x)
    if min(x.shape[1], x.shape[2]) >= 2:
        x = layers.MaxPooling2D(2, name="image_pool2")(x)
    x = layers.Flatten(name="image_flatten")(x)
    image_vec = layers.Dense(32 * width, activation="relu", name="image_dense")(x)

    # text: embedding + explicit masked mean (no mask_zero: all-padding must stay finite)
    emb = layers.Embedding(len(text_spec.vocabulary), 16 * width, name="text_embedding")(text_in)
    text_vec = MaskedMean(pad_id=text_spec.pad_id, name="text_masked_mean")([emb, text_in])

    # audio: log-mel is roughly in [-14, 10]; scale it, convolve per frame, average over time
    a = layers.Rescaling(0.1, name="audio_scale")(audio_in)
    a = layers.Conv1D(32 * width, 3, padding="same", activation="relu", name="audio_conv")(a)
    a = layers.GlobalAveragePooling1D(name="audio_time_mean")(a)
    audio_vec = layers.Dense(32 * width, activation="relu", name="audio_dense")(a)

    h = layers.Concatenate(name="fusion")([image_vec, text_vec, audio_vec])
    h = layers.Dense(64 * width, activation="relu", name="fusion_dense")(h)
    h = layers.Dropout(0.2, name="fusion_dropout")(h)
    out = layers.Dense(num_classes, activation="softmax", name=LABEL_OUTPUT)(h)
    return keras.Model(
        inputs={"image": image_in, "text": text_in, "audio": audio_in},
        outputs=out,
        name="mmstream_reference",
    )


def compile_model(model: Any, *, learning_rate: float = 3e-3) -> None:
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )


def accuracy(model: Any, features: Mapping[str, NDArray[Any]], labels: NDArray[Any]) -> float:
    """Top-1 accuracy of ``model`` on ``features`` (inference mode)."""
    probs = model.predict(dict(features), batch_size=256, verbose=0)
    return float(np.mean(np.argmax(probs, axis=-1) == labels))


def evaluate(
    model: Any, sample_list: Sequence[Sample], specs: Mapping[str, Transform]
) -> dict[str, float]:
    """Accuracy of the fused model and of each modality alone (the others blanked).

    Works through ``sample_list`` in chunks, so big images need bounded memory.
    """
    correct = dict.fromkeys(("fused", *(f"{m}_only" for m in MODALITIES)), 0.0)
    for start in range(0, len(sample_list), _EVAL_CHUNK):
        chunk = sample_list[start : start + _EVAL_CHUNK]
        features = featurize(chunk, specs)
        labels = np.array([s.label for s in chunk], dtype=np.int64)
        correct["fused"] += accuracy(model, features, labels) * len(chunk)
        for modality in MODALITIES:
            blanked = only(features, modality, specs)
            correct[f"{modality}_only"] += accuracy(model, blanked, labels) * len(chunk)
    return {k: round(v / max(len(sample_list), 1), 4) for k, v in correct.items()}


class SampleBatches(keras.utils.PyDataset):  # type: ignore[misc]
    """Training batches featurized on the fly, reshuffled every epoch.

    Used when the whole image tensor would be too big to hold (e.g. 256x256).
    """

    def __init__(
        self,
        sample_list: Sequence[Sample],
        specs: Mapping[str, Transform],
        batch_size: int,
        seed: int,
    ) -> None:
        super().__init__()
        self.samples = list(sample_list)
        self.specs = dict(specs)
        self.batch_size = batch_size
        self.rng = np.random.default_rng(seed)
        self.order = self.rng.permutation(len(self.samples))

    def __len__(self) -> int:
        return -(-len(self.samples) // self.batch_size)

    def __getitem__(self, idx: int) -> tuple[dict[str, NDArray[Any]], NDArray[np.int64]]:
        picked = self.order[idx * self.batch_size : (idx + 1) * self.batch_size]
        batch = [self.samples[i] for i in picked]
        labels = np.array([s.label for s in batch], dtype=np.int64)
        return featurize(batch, self.specs), labels

    def on_epoch_end(self) -> None:
        self.order = self.rng.permutation(len(self.samples))


def sidecar(
    specs: Mapping[str, Transform], *, version: str, model_card: Mapping[str, Any]
) -> dict[str, Any]:
    """The ``mmstream-spec.json`` content that :func:`export.convert.export_model` reads."""
    return {
        "name": MODEL_NAME,
        "version": version,
        "parts": {
            name: {"transform": spec.to_dict(), "inputs": {name: REFERENCE_OUTPUTS[name]}}
            for name, spec in specs.items()
        },
        "outputs": {LABEL_OUTPUT: {"kind": "probabilities"}},
        "labels": list(LABELS),
        "label_output": LABEL_OUTPUT,
        "model_card": dict(model_card),
        # Trained with modalities dropped (blank image, empty text, silence), so an
        # event missing a modality can be scored with that input blanked.
        "accepts_missing": True,
    }


def write_sidecar(out_dir: Path, content: Mapping[str, Any]) -> Path:
    path = Path(out_dir) / SIDECAR_FILE
    path.write_text(json.dumps(content, indent=2) + "\n")
    return path


def train_reference(
    out_dir: str | Path,
    *,
    image_size: int = 64,
    n_train: int = 4000,
    epochs: int = 10,
    seed: int = 0,
    corrupt_p: float = 0.35,
    n_test: int = 2000,
    batch_size: int = 64,
    width: int = 1,
    version: str = "1.0.0",
) -> dict[str, Any]:
    """Train the reference model; write ``out_dir/model.keras`` and ``out_dir/mmstream-spec.json``.

    Training samples come from ``samples(split="train", corrupt_p=corrupt_p)``.
    The model card reports held-out accuracy (``split="test"``, same corruption
    and on clean samples) of the fused model and of each modality alone.

    Returns:
        ``{"out_dir", "model_file", "sidecar_file", "model_card"}``.

    Raises:
        ConfigError: a bad argument, or ``out_dir`` cannot be created or written.
        StorageError: a full disk, exceeded quota or I/O error while writing.
    """
    _check_training_args(n_train=n_train, epochs=epochs, n_test=n_test, corrupt_p=corrupt_p)
    out = _make_out_dir(Path(out_dir))
    specs = reference_specs(image_size)
    keras.utils.set_random_seed(seed)
    model, training = _fit_reference(
        specs,
        n_train=n_train,
        epochs=epochs,
        batch_size=batch_size,
        corrupt_p=corrupt_p,
        seed=seed,
        image_size=image_size,
        width=width,
    )
    evaluation = _evaluate_held_out(model, specs, n_test=n_test, corrupt_p=corrupt_p)
    card = _model_card(evaluation, training)
    return _write_reference(out, model, specs, version, card)


def _check_training_args(*, n_train: int, epochs: int, n_test: int, corrupt_p: float) -> None:
    if n_train < 1 or epochs < 1 or n_test < 1:
        raise ConfigError(
            f"n_train, epochs and n_test must be >= 1 (got {n_train}, {epochs}, {n_test})"
        )
    if not 0.0 <= corrupt_p < 1.0:
        raise ConfigError(f"corrupt_p must be in [0, 1), not {corrupt_p}")


def _make_out_dir(out: Path) -> Path:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise os_error(f"--out {str(out)!r}", exc) from exc
    return out


def _fit_reference(
    specs: Mapping[str, Transform],
    *,
    n_train: int,
    epochs: int,
    batch_size: int,
    corrupt_p: float,
    seed: int,
    image_size: int,
    width: int,
) -> tuple[Any, dict[str, Any]]:
    """A new model fitted on ``n_train`` training samples, and the model card's
    ``training`` section (these settings, final loss and accuracy, seconds)."""
    t0 = time.perf_counter()
    train = samples(n_train, np.random.default_rng(seed), split="train", corrupt_p=corrupt_p)
    x_train, y_train, fit_args = _training_data(train, specs, batch_size, seed)
    featurize_s = time.perf_counter() - t0

    model = build_model(specs, len(LABELS), width=width)
    compile_model(model)
    t1 = time.perf_counter()
    history = model.fit(x_train, y_train, epochs=epochs, verbose=0, **fit_args)
    fit_s = time.perf_counter() - t1
    log.info("trained %d epochs on %d samples in %.1f s", epochs, n_train, fit_s)
    return model, {
        "n_train": n_train,
        "epochs": epochs,
        "batch_size": batch_size,
        "corrupt_p": corrupt_p,
        "seed": seed,
        "image_size": image_size,
        "width": width,
        "final_loss": round(float(history.history["loss"][-1]), 4),
        "final_train_accuracy": round(float(history.history["accuracy"][-1]), 4),
        "seconds": round(featurize_s + fit_s, 1),
        "fit_seconds": round(fit_s, 1),
    }


def _training_data(
    train: Sequence[Sample], specs: Mapping[str, Transform], batch_size: int, seed: int
) -> tuple[Any, Any, dict[str, Any]]:
    """``model.fit``'s ``x``, ``y`` and further arguments: whole tensors when the images
    fit in :data:`MAX_IN_MEMORY_BYTES`, else a :class:`SampleBatches`."""
    image_bytes = len(train) * int(np.prod(_typed_specs(specs)[0].shape())) * 4
    if image_bytes <= MAX_IN_MEMORY_BYTES:
        x_train = featurize(train, specs)
        y_train = np.array([s.label for s in train], dtype=np.int64)
        return x_train, y_train, {"batch_size": batch_size, "shuffle": True}
    # e.g. 256x256 images: featurize batch by batch
    log.info("images need %.1f GB: featurizing batch by batch", image_bytes / 1e9)
    return SampleBatches(train, specs, batch_size, seed), None, {}


def _evaluate_held_out(
    model: Any, specs: Mapping[str, Transform], *, n_test: int, corrupt_p: float
) -> dict[str, Any]:
    """The model card's ``evaluation``: held-out accuracy (corrupted and clean) and the
    quality checks, a failed one logged as a warning."""
    test_rng = np.random.default_rng(TEST_SEED)
    held_out = evaluate(model, samples(n_test, test_rng, split="test", corrupt_p=corrupt_p), specs)
    clean = evaluate(model, samples(n_test, test_rng, split="test", corrupt_p=0.0), specs)
    singles = [v for k, v in held_out.items() if k != "fused"]
    checks = {
        "fused_beats_every_single_modality": held_out["fused"] > max(singles),
        "clean_fused_at_least_0.97": clean["fused"] >= 0.97,
    }
    for name, ok in checks.items():
        if not ok:
            log.warning(
                "reference model quality check failed: %s (%s, clean %s)", name, held_out, clean
            )
    return {
        "split": "test",
        "n": n_test,
        "seed": TEST_SEED,
        "corrupt_p": corrupt_p,
        "accuracy": held_out,
        "clean_accuracy": clean,
        "single_modality": "the fused model with the other modalities blanked "
        "(zero image, empty text, silent audio)",
        "checks": checks,
    }


def _model_card(evaluation: dict[str, Any], training: dict[str, Any]) -> dict[str, Any]:
    return {
        "task": "classify a digit 0-9 shown as an image, named in text and heard as DTMF audio",
        "data": "worker.contract.reference_data: scikit-learn load_digits images, template "
        "phrases, "
        "synthetic DTMF tones; each modality corrupted independently with probability corrupt_p",
        "evaluation": evaluation,
        "training": training,
        "limitations": "synthetic reference task; not a general digit, text or speech model",
    }


def _write_reference(
    out: Path, model: Any, specs: Mapping[str, Transform], version: str, card: dict[str, Any]
) -> dict[str, Any]:
    """Save ``model.keras`` and the sidecar into ``out``; :func:`train_reference`'s result."""
    model_path = out / KERAS_FILE
    try:
        model.save(model_path)
        sidecar_path = write_sidecar(out, sidecar(specs, version=version, model_card=card))
    except OSError as exc:
        raise os_error(f"--out {str(out)!r}", exc) from exc
    log.info("wrote %s and %s", model_path, sidecar_path)
    return {
        "out_dir": str(out),
        "model_file": str(model_path),
        "sidecar_file": str(sidecar_path),
        "model_card": card,
    }
