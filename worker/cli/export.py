"""``mmstream train-reference`` and ``mmstream export`` (the ``[export]`` extra).

Their flags come from :mod:`export.commands` (which depends only on ``worker.contract``,
so it has no config dataclasses of :mod:`worker.config`); its command bodies import
TensorFlow only when they run.
"""

from __future__ import annotations

from export.commands import (
    add_export_args,
    add_train_reference_args,
    export_main,
    train_reference_main,
)
from worker.cli.common import Command

TRAIN_REFERENCE = Command(
    "train-reference",
    "train the reference model (needs the [export] extra)",
    add_train_reference_args,
    train_reference_main,
)
EXPORT = Command(
    "export",
    "convert a Keras model to model.onnx + manifest.json (needs [export])",
    add_export_args,
    export_main,
)
