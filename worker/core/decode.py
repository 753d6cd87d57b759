"""Decode stage: a raw Kafka record -> a :class:`Part` holding the model's tensor.

Pure: no broker, no clock. Every way a record can be unusable raises
:class:`RecordError` with a stable reason code, which the pipeline turns into
a dead-letter record; nothing here crashes the worker or drops silently.

Supported ``content-type`` per modality:

* any input: ``application/x-npy`` -- ``numpy.save`` of one example, already in
  the input's dtype and per-example shape (no pickles);
* image: ``image/png``, ``image/jpeg`` (any size, grayscale or RGB);
* text: ``text/plain`` (``charset=utf-8``, the default);
* audio: ``audio/wav`` (``audio/x-wav``, ``audio/wave``): PCM16 mono or stereo, any rate.
"""

from __future__ import annotations

import functools
import io
import math
import wave
from collections.abc import Callable
from dataclasses import dataclass
from tokenize import TokenError
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image, UnidentifiedImageError

from worker.contract.errors import Reason, RecordError
from worker.contract.manifest import InputInfo, Manifest
from worker.contract.preprocess import (
    AudioSpec,
    ImageSpec,
    TextSpec,
    log_mel,
    prepare_image,
    resample,
    tokenize,
)
from worker.contract.records import (
    CONTENT_NPY,
    HEADER_CONTENT_TYPE,
    HEADER_EVENT_TIME,
    HEADER_MODALITY,
    Part,
    RawRecord,
)


@dataclass(frozen=True)
class Limits:
    """Refusal thresholds for input records.

    Attributes:
        max_part_bytes: largest record value accepted.
        max_image_pixels: largest declared width*height accepted, checked from the
            image header before the pixels are decoded (decompression bombs).
    """

    max_part_bytes: int = 16 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096


def _media_type(content_type: str) -> tuple[str, dict[str, str]]:
    main, *params = [p.strip() for p in content_type.split(";")]
    parsed = {}
    for p in params:
        if "=" in p:
            k, v = p.split("=", 1)
            parsed[k.strip().lower()] = v.strip().strip('"').lower()
    return main.lower(), parsed


#: Parsed .npy headers by their exact bytes: producers send the same few headers
#: over and over, and numpy parses each one with ``ast.literal_eval`` (~0.1 ms).
_NPY_HEADERS: dict[bytes, tuple[tuple[int, ...], bool, np.dtype[Any]]] = {}
_NPY_HEADER_CACHE_MAX = 256


def _npy_header(value: bytes) -> tuple[tuple[int, ...], bool, np.dtype[Any], int]:
    """(shape, fortran order, dtype, data offset) of a .npy payload, cached by header bytes."""
    if value[:6] == b"\x93NUMPY" and len(value) >= 12:
        major = value[6]
        size = int.from_bytes(value[8:10] if major == 1 else value[8:12], "little")
        end = (10 if major == 1 else 12) + size
        cached = _NPY_HEADERS.get(value[:end])
        if cached is not None:
            return (*cached, end)
    fmt = np.lib.format
    buf = io.BytesIO(value)
    version = fmt.read_magic(buf)
    if version == (1, 0):
        shape, fortran, dtype = fmt.read_array_header_1_0(buf)
    else:
        shape, fortran, dtype = fmt.read_array_header_2_0(buf)
    end = buf.tell()
    if len(_NPY_HEADERS) < _NPY_HEADER_CACHE_MAX:
        _NPY_HEADERS[value[:end]] = (tuple(shape), bool(fortran), dtype)
    return tuple(shape), bool(fortran), dtype, end


def decode_npy(value: bytes, info: InputInfo) -> NDArray[Any]:
    """One example saved with ``numpy.save``: dtype and shape are checked from the
    header before any data is read (a forged header cannot make us allocate)."""
    try:
        shape, fortran, dtype, offset = _npy_header(value)
    except (ValueError, OSError, EOFError, SyntaxError, TokenError, UnicodeDecodeError) as exc:
        raise RecordError(Reason.DECODE_ERROR, f"not a valid .npy array: {exc}") from exc
    if dtype != _dtype(info.dtype):
        raise RecordError(
            Reason.SHAPE_MISMATCH,
            f"{info.name}: dtype {dtype} but the model takes {info.dtype}",
        )
    if shape != info.shape:
        raise RecordError(
            Reason.SHAPE_MISMATCH,
            f"{info.name}: shape {list(shape)} but the model takes {list(info.shape)}",
        )
    size = math.prod(shape)
    expected = dtype.itemsize * size
    if len(value) - offset != expected:
        raise RecordError(
            Reason.DECODE_ERROR,
            f"{info.name}: npy data holds {len(value) - offset} bytes, the header says {expected}",
        )
    flat = np.frombuffer(value, dtype=dtype, offset=offset)
    if dtype.kind == "f" and not np.isfinite(flat).all():
        raise RecordError(Reason.DECODE_ERROR, f"{info.name}: array holds NaN or infinity")
    return flat.reshape(shape, order="F" if fortran else "C")


@functools.cache
def _dtype(name: str) -> np.dtype[Any]:
    return np.dtype(name)


def decode_image(value: bytes, spec: ImageSpec, limits: Limits) -> NDArray[np.float32]:
    try:
        img = Image.open(io.BytesIO(value))
        width, height = img.size
        if width * height > limits.max_image_pixels:
            raise RecordError(
                Reason.PAYLOAD_TOO_LARGE,
                f"image declares {width}x{height} pixels, over the limit of "
                f"{limits.max_image_pixels}",
            )
        if img.format not in ("PNG", "JPEG"):
            raise RecordError(
                Reason.UNSUPPORTED_CONTENT_TYPE,
                f"image bytes are {img.format or 'unknown'}, not PNG or JPEG",
            )
        img.load()
        return prepare_image(img, spec)
    except RecordError:
        raise
    except Image.DecompressionBombError as exc:
        raise RecordError(Reason.PAYLOAD_TOO_LARGE, f"image too large: {exc}") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, TypeError) as exc:
        raise RecordError(Reason.DECODE_ERROR, f"cannot decode image: {exc}") from exc


def decode_text(value: bytes, charset: str, spec: TextSpec) -> NDArray[np.int32]:
    if charset not in ("utf-8", "utf8", "us-ascii", "ascii"):
        raise RecordError(Reason.UNSUPPORTED_CONTENT_TYPE, f"text charset {charset!r}: use utf-8")
    if len(value) > 4 * spec.max_chars:
        raise RecordError(
            Reason.PAYLOAD_TOO_LARGE, f"text of {len(value)} bytes, over {spec.max_chars} chars"
        )
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecordError(Reason.DECODE_ERROR, f"text is not valid UTF-8: {exc}") from exc
    if len(text) > spec.max_chars:
        raise RecordError(
            Reason.PAYLOAD_TOO_LARGE, f"text of {len(text)} chars, over the limit {spec.max_chars}"
        )
    return tokenize(text, spec)


def decode_wav(value: bytes, spec: AudioSpec) -> NDArray[np.float32]:
    try:
        with wave.open(io.BytesIO(value), "rb") as w:
            channels, width, rate, frames = (
                w.getnchannels(),
                w.getsampwidth(),
                w.getframerate(),
                w.getnframes(),
            )
            if width != 2:
                raise RecordError(
                    Reason.UNSUPPORTED_CONTENT_TYPE,
                    f"WAV sample width {8 * width} bits: only PCM16 is supported",
                )
            if channels not in (1, 2) or rate <= 0:
                raise RecordError(Reason.DECODE_ERROR, f"WAV with {channels} channels at {rate} Hz")
            if frames > spec.max_seconds * rate:
                raise RecordError(
                    Reason.PAYLOAD_TOO_LARGE,
                    f"audio of {frames / rate:.1f} s, over the limit {spec.max_seconds} s",
                )
            raw = w.readframes(frames)
    except RecordError:
        raise
    except (wave.Error, EOFError, ValueError) as exc:
        raise RecordError(Reason.DECODE_ERROR, f"cannot decode WAV: {exc}") from exc
    usable = len(raw) - len(raw) % (2 * channels)
    if usable == 0:
        raise RecordError(Reason.DECODE_ERROR, "WAV holds no audio frames")
    pcm = np.frombuffer(raw[:usable], dtype="<i2").astype(np.float32) / 32768.0
    mono = pcm.reshape(-1, channels).mean(axis=1)
    try:
        return log_mel(resample(mono, rate, spec.sample_rate), spec)
    except (ValueError, MemoryError) as exc:
        raise RecordError(Reason.DECODE_ERROR, f"cannot resample WAV at {rate} Hz: {exc}") from exc


def _decode_raw(
    media: str, params: dict[str, str], value: bytes, info: InputInfo, limits: Limits
) -> NDArray[Any]:
    spec = info.preprocessing
    handlers: dict[str, Callable[[], NDArray[Any]]] = {}
    if isinstance(spec, ImageSpec):
        handlers = dict.fromkeys(
            ("image/png", "image/jpeg", "image/jpg"), lambda: decode_image(value, spec, limits)
        )
    elif isinstance(spec, TextSpec):
        handlers = {"text/plain": lambda: decode_text(value, params.get("charset", "utf-8"), spec)}
    elif isinstance(spec, AudioSpec):
        handlers = dict.fromkeys(
            ("audio/wav", "audio/x-wav", "audio/wave", "audio/vnd.wave"),
            lambda: decode_wav(value, spec),
        )
    handler = handlers.get(media)
    if handler is None:
        accepted = sorted([*handlers, CONTENT_NPY])
        raise RecordError(
            Reason.UNSUPPORTED_CONTENT_TYPE,
            f"{info.name} ({info.modality}) does not take {media!r}; accepted: {accepted}",
        )
    tensor = handler()
    return tensor.astype(info.dtype, copy=False)


def decode_record(record: RawRecord, manifest: Manifest, limits: Limits) -> Part:
    """Turn one input record into a :class:`Part`, or raise :class:`RecordError`."""
    if not record.key:
        raise RecordError(Reason.MISSING_KEY, "record has no key (the key is the event id)")
    try:
        event_id = record.key.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecordError(Reason.MISSING_KEY, f"key is not UTF-8: {exc}") from exc
    modality_raw = record.header(HEADER_MODALITY)
    modality = modality_raw.decode("utf-8", "replace") if modality_raw is not None else None
    info = manifest.input(modality) if modality is not None else None
    if info is None:
        names = [i.name for i in manifest.inputs]
        raise RecordError(
            Reason.UNKNOWN_MODALITY,
            f"header {HEADER_MODALITY}={modality!r} names no model input; expected one of {names}",
        )
    value = record.value
    if value is None or len(value) == 0:
        raise RecordError(Reason.DECODE_ERROR, "record has an empty value")
    if len(value) > limits.max_part_bytes:
        raise RecordError(
            Reason.PAYLOAD_TOO_LARGE,
            f"value of {len(value)} bytes, over --max-part-bytes {limits.max_part_bytes}",
        )
    ctype_raw = record.header(HEADER_CONTENT_TYPE)
    if ctype_raw is None:
        raise RecordError(Reason.UNSUPPORTED_CONTENT_TYPE, f"no {HEADER_CONTENT_TYPE} header")
    media, params = _media_type(ctype_raw.decode("utf-8", "replace"))
    if media == CONTENT_NPY:
        tensor = decode_npy(value, info)
    else:
        tensor = _decode_raw(media, params, value, info, limits)
    return Part(
        event_id=event_id,
        input_name=info.name,
        tensor=tensor,
        source=record.source,
        event_time_ms=_event_time(record),
        raw=record,
    )


def _event_time(record: RawRecord) -> int | None:
    raw = record.header(HEADER_EVENT_TIME)
    if raw is None:
        return None
    try:
        return int(raw.decode("ascii"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise RecordError(
            Reason.DECODE_ERROR, f"{HEADER_EVENT_TIME} must be integer ms, got {raw[:40]!r}"
        ) from exc
