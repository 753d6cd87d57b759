"""A tiny model of the reference family, trained briefly and exported: for tests.

``build_tiny_model_dir(tmp)`` writes ``tmp/keras/{model.keras, mmstream-spec.json}``
and the served model directory ``tmp/model/{model.onnx, manifest.json}``, and
returns the latter. It needs the ``export`` extra (TensorFlow) and takes a few
seconds on two cores; the model is small but does learn the (easy) task.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

TINY_VERSION = "0.0.1-test"


def build_tiny_model_dir(
    tmp_dir: Path,
    *,
    image_size: int = 16,
    n_train: int = 1000,
    epochs: int = 4,
    seed: int = 0,
) -> Path:
    """Build, briefly train and export a reference-family model; return its model dir."""
    import keras

    from export import KERAS_FILE
    from export.convert import export_model
    from export.reference_model import (
        TEST_SEED,
        build_model,
        compile_model,
        evaluate,
        featurize,
        reference_specs,
        sidecar,
        write_sidecar,
    )
    from worker.contract.reference_data import LABELS, samples

    keras_dir = Path(tmp_dir) / "keras"
    model_dir = Path(tmp_dir) / "model"
    keras_dir.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(seed)
    specs = reference_specs(image_size)

    started = time.perf_counter()
    train = samples(n_train, np.random.default_rng(seed), split="train", corrupt_p=0.3)
    labels = np.array([s.label for s in train], dtype=np.int64)
    model = build_model(specs, len(LABELS))
    compile_model(model, learning_rate=5e-3)
    model.fit(featurize(train, specs), labels, batch_size=50, epochs=epochs, verbose=0)
    clean = evaluate(model, samples(200, np.random.default_rng(TEST_SEED), split="test"), specs)
    card = {
        "task": "tiny test model of the reference family (not for serving)",
        "evaluation": {"split": "test", "n": 200, "corrupt_p": 0.0, "clean_accuracy": clean},
        "training": {
            "n_train": n_train,
            "epochs": epochs,
            "corrupt_p": 0.3,
            "seed": seed,
            "image_size": image_size,
            "seconds": round(time.perf_counter() - started, 1),
        },
    }
    model.save(keras_dir / KERAS_FILE)
    write_sidecar(keras_dir, sidecar(specs, version=TINY_VERSION, model_card=card))
    export_model(keras_dir / KERAS_FILE, model_dir, parity_batch_sizes=(1, 5))
    return model_dir
