"""Training of the reference model and Keras -> ONNX export (needs the ``export`` extra).

Nothing here is imported by ``worker``: TensorFlow stays out of the serving
process. Importing this package itself is cheap; TensorFlow is loaded by
:mod:`export.reference_model` and :mod:`export.convert`, and
:mod:`export.commands` imports them only when a command runs.
"""

from __future__ import annotations

import os

# Before anything imports TensorFlow: disable oneDNN (silences its start-up line and
# keeps Keras vs ONNX Runtime numerics comparable) and quieten the C++ logs.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SIDECAR_FILE = "mmstream-spec.json"
KERAS_FILE = "model.keras"

__all__ = ["KERAS_FILE", "SIDECAR_FILE"]
