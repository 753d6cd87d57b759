"""Transforms: how a part's raw media becomes the model's input tensors.

There is exactly one implementation of each transform, here, shared by export's
checks, the worker, the producer and the tests, so the tensors a model was trained
on and the tensors the worker feeds it cannot drift apart.

=============  ======  ============================================  =================
kind           family  makes                                         module
=============  ======  ============================================  =================
``image``      image   ``pixels``                                    :mod:`.image`
``tokenizer``  text    ``input_ids``, ``attention_mask``,            :mod:`.text`
                       ``token_type_ids``
``words``      text    ``input_ids``, ``attention_mask``             :mod:`.text`
``log_mel``    audio   ``features``                                  :mod:`.audio`
``waveform``   audio   ``waveform``, ``attention_mask``              :mod:`.audio`
=============  ======  ============================================  =================

Manifests of format 1 named the kinds ``image``, ``text`` (now ``words``) and ``audio``
(now ``log_mel``); :func:`transform_from_dict` with ``legacy=True`` reads them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from worker.contract.errors import ModelError
from worker.contract.transforms.audio import LogMelTransform, WaveformTransform, log_mel, resample
from worker.contract.transforms.base import DTYPES_OF_KIND, TensorOut, Transform
from worker.contract.transforms.image import ImageTransform, prepare_image
from worker.contract.transforms.media import Limits, Waveform
from worker.contract.transforms.text import TokenizerTransform, WordsTransform, tokenize

__all__ = [
    "DTYPES_OF_KIND",
    "KINDS",
    "ImageTransform",
    "Limits",
    "LogMelTransform",
    "TensorOut",
    "TokenizerTransform",
    "Transform",
    "Waveform",
    "WaveformTransform",
    "WordsTransform",
    "log_mel",
    "prepare_image",
    "resample",
    "tokenize",
    "transform_from_dict",
]

KINDS: dict[str, Any] = {
    "image": ImageTransform,
    "tokenizer": TokenizerTransform,
    "words": WordsTransform,
    "log_mel": LogMelTransform,
    "waveform": WaveformTransform,
}
#: Format-1 kinds -> (today's kind, keys that format wrote and today's kind does not have).
_LEGACY: dict[str, tuple[str, dict[str, str]]] = {
    "image": ("image", {"resample": "interpolation"}),
    "text": ("words", {"lowercase": "", "token_pattern": ""}),
    "audio": ("log_mel", {}),
}


def transform_from_dict(
    data: Any, base_dir: Path | None = None, *, legacy: bool = False
) -> Transform:
    """The transform ``data["kind"]`` names; ``base_dir``: where its files are (the model
    directory); ``legacy``: ``data`` is a format-1 ``preprocessing`` object."""
    if not isinstance(data, dict):
        raise ModelError(f"a transform must be an object, not {data!r}")
    kind = data.get("kind")
    if not isinstance(kind, str):
        raise ModelError(f"a transform's kind must be a string, not {kind!r}")
    if legacy:
        if kind not in _LEGACY:
            raise ModelError(
                f"unknown preprocessing kind {kind!r}; expected one of {sorted(_LEGACY)}"
            )
        kind, renames = _LEGACY[str(kind)]
        data = {renames.get(k, k): v for k, v in data.items() if renames.get(k, k) != ""}
    if kind not in KINDS:
        raise ModelError(f"unknown transform kind {kind!r}; expected one of {sorted(KINDS)}")
    cls = KINDS[str(kind)]
    if cls is TokenizerTransform:
        return TokenizerTransform.from_dict(data, base_dir)
    transform: Transform = cls.from_dict(data)
    return transform
