"""What every transform is: raw media of one part -> the named tensors it makes.

A transform belongs to a media family (image, text or audio), which says how its
part's bytes are decoded (:mod:`worker.contract.transforms.media`). It makes one or
more named tensors per example (:meth:`Transform.outputs`): a tokenizer makes
``input_ids``, ``attention_mask`` and ``token_type_ids`` from one text. The manifest
says which model input each of them fills.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, Self, TypeVar

import numpy as np
from numpy.typing import NDArray

from worker.contract.errors import ModelError
from worker.contract.transforms.media import Limits

#: The kinds of tensor a transform output may be, and the dtypes each may be cast to.
DTYPES_OF_KIND: dict[str, tuple[str, ...]] = {
    "float": ("float32", "float16", "float64"),
    # Ids and masks: many graphs take an attention mask as float or bool.
    "int": ("int64", "int32", "float32", "float16", "bool"),
    "uint8": ("uint8",),
}


@dataclass(frozen=True)
class TensorOut:
    """One tensor a transform makes per example.

    Attributes:
        shape: per-example shape (no batch dimension).
        kind: ``float``, ``int`` or ``uint8``: which graph dtypes it can feed
            (:data:`DTYPES_OF_KIND`); the value is cast to the graph's dtype.
    """

    shape: tuple[int, ...]
    kind: str


class Transform(Protocol):
    """Raw media of one part -> named per-example tensors.

    ``decode`` turns the part's bytes into media (a PIL image, a str, a
    :class:`~worker.contract.transforms.media.Waveform`), checking every limit;
    ``apply`` makes the tensors of one example and ``apply_batch`` of several
    (stacked; batched where the library pays for it). ``blank_media`` is what an
    absent part looks like (black image, empty text, silence) and ``sample_media`` a
    random valid example (export's smoke run, the producer, the tests;
    :func:`worker.contract.transforms.media.encode_media` encodes media as a producer
    sends them). ``files`` names the files it reads from the model directory (covered
    by the manifest's hashes) and ``load`` reads them.
    """

    kind: ClassVar[str]
    family: ClassVar[str]

    def outputs(self) -> dict[str, TensorOut]: ...

    def content_types(self) -> tuple[str, ...]: ...

    def decode(self, value: bytes, media: str, params: dict[str, str], limits: Limits) -> Any: ...

    def apply(self, media: Any) -> dict[str, NDArray[Any]]: ...

    def apply_batch(self, media: Sequence[Any]) -> dict[str, NDArray[Any]]: ...

    def blank_media(self) -> Any: ...

    def sample_media(self, rng: np.random.Generator) -> Any: ...

    def files(self) -> tuple[str, ...]: ...

    def load(self) -> None: ...

    def to_dict(self) -> dict[str, Any]: ...


class Parameters:
    """What a transform that is only its parameters shares: no files to read, its
    dataclass fields as its manifest entry, a batch as its examples stacked."""

    def apply(self, media: Any) -> dict[str, NDArray[Any]]:
        raise NotImplementedError  # each transform's own

    def apply_batch(self, media: Sequence[Any]) -> dict[str, NDArray[Any]]:
        return stack_outputs([self.apply(m) for m in media])

    def files(self) -> tuple[str, ...]:
        return ()

    def load(self) -> None:
        """Nothing to load: the transform is its parameters."""

    def to_dict(self) -> dict[str, Any]:
        return fields_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        return from_dict(cls, data)


def stack_outputs(rows: Sequence[dict[str, NDArray[Any]]]) -> dict[str, NDArray[Any]]:
    """Per-example tensors -> one stacked array per output name."""
    if not rows:
        raise ModelError("an empty batch of media")
    return {name: np.stack([r[name] for r in rows]) for name in rows[0]}


T = TypeVar("T")


def from_dict(cls: type[T], data: dict[str, Any], **extra: Any) -> T:
    """``cls(**data)`` for a frozen dataclass: unknown keys refused, fields without a default
    required, lists turned into the tuples the fields declare, a wrong type named."""
    if not isinstance(data, dict):
        raise ModelError(f"{cls.__name__}: expected an object, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = set(data) - set(fields) - {"kind"}
    if unknown:
        raise ModelError(f"{_kind(cls)}: unknown keys {sorted(unknown)}; known: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        if name in extra:
            kwargs[name] = extra[name]
            continue
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ModelError(f"{_kind(cls)}: missing key {name!r}")
            continue
        kwargs[name] = _coerce(cls, name, data[name], hints[name])
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ModelError(f"{_kind(cls)}: {exc}") from exc


def _kind(cls: type[Any]) -> str:
    return f"transform {getattr(cls, 'kind', cls.__name__)!r}"


def _coerce(cls: type[Any], name: str, value: Any, hint: Any) -> Any:
    """``value`` checked against ``hint`` (int, float, str, bool, tuples of them, Optional)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _coerce(cls, name, value, options[0])
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ModelError(f"{_kind(cls)}: {name} must be a list, not {value!r}")
        (item,) = {a for a in typing.get_args(hint) if a is not Ellipsis}
        return tuple(_coerce(cls, name, v, item) for v in value)
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if hint is Path:
        return value
    if hint in (int, str, bool) and type(value) is hint:
        return value
    expected = getattr(hint, "__name__", str(hint))
    raise ModelError(f"{_kind(cls)}: {name} must be {expected}, not {value!r}")


def check(ok: bool, cls: type[Any], message: str) -> None:
    """Raise :class:`ModelError` naming the transform unless ``ok``."""
    if not ok:
        raise ModelError(f"{_kind(cls)}: {message}")


def one_of(cls: type[Any], name: str, value: str, choices: Sequence[str]) -> None:
    check(value in choices, cls, f"{name} must be one of {list(choices)}, not {value!r}")


def fields_dict(obj: Any) -> dict[str, Any]:
    """The init fields of a dataclass instance as JSON values (tuples as lists)."""
    out: dict[str, Any] = {"kind": type(obj).kind}
    for f in dataclasses.fields(obj):
        if not f.init or not f.metadata.get("manifest", True):
            continue
        value = getattr(obj, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out
