"""Decode stage: a raw Kafka record -> a :class:`Part` holding the model's tensors.

Pure: no broker, no clock. Every way a record can be unusable raises
:class:`RecordError` with a stable reason code, which the pipeline turns into
a dead-letter record; nothing here crashes the worker or drops silently.

A record's ``mm-modality`` names a part of the manifest; its ``content-type`` is one of:

* raw media the part's transform takes (:mod:`worker.contract.transforms`): images
  (PNG, JPEG, WebP, HEIC), ``text/plain`` (UTF-8), audio (WAV, FLAC, OGG/Vorbis,
  OGG/Opus, MP3);
* ``application/x-npy``: ``numpy.save`` of one example of the one input the part fills,
  already in the input's dtype and shape (no pickles);
* ``application/x-npz``: ``numpy.savez`` with one such array per input the part fills,
  each named as its input.
"""

from __future__ import annotations

import functools
import io
import math
import zipfile
from pathlib import Path
from tokenize import TokenError
from typing import Any

import numpy as np
from numpy.typing import NDArray

from worker.contract.errors import Reason, RecordError
from worker.contract.manifest import InputInfo, Manifest, PartInfo
from worker.contract.records import (
    CONTENT_NPY,
    CONTENT_NPZ,
    HEADER_CONTENT_TYPE,
    HEADER_EVENT_TIME,
    HEADER_MODALITY,
    Part,
    RawRecord,
)
from worker.contract.transforms.media import Limits, media_type

__all__ = ["Limits", "decode_media", "decode_npy", "decode_npz", "decode_record"]

_ARRAY_TYPES = (CONTENT_NPY, CONTENT_NPZ)
#: Room for an npy header inside an npz member (numpy writes 128 bytes; 64 KiB is generous).
_NPY_HEADER_MAX = 65536
#: How an npz member may be stored: as numpy.savez and numpy.savez_compressed write them.
_NPZ_COMPRESSIONS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)
#: Entries an npz may hold beyond one per input (none are read; a few are tolerated).
_NPZ_SPARE_ENTRIES = 4


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


def decode_npz(value: bytes, part: PartInfo) -> dict[str, NDArray[Any]]:
    """One example of every input ``part`` fills, saved with ``numpy.savez`` (or
    ``savez_compressed``): one array per input, named as the input, each checked as an
    npy part. The archive's entry count is read from its end record before it is
    parsed; a member must be stored or deflated, unencrypted, and no more than its
    input's size is ever inflated, whatever its header declares."""
    count = _zip_entries(value)
    if count is None or count > len(part.fills) + _NPZ_SPARE_ENTRIES:
        raise RecordError(
            Reason.DECODE_ERROR if count is None else Reason.SHAPE_MISMATCH,
            "not a valid .npz archive (no end record)"
            if count is None
            else f"npz holds {count} entries; part {part.name!r} fills {len(part.fills)}",
        )
    try:
        with zipfile.ZipFile(io.BytesIO(value)) as zf:
            members = {Path(i.filename).stem: i for i in zf.infolist()}
            wanted = set(part.input_names)
            if set(members) != wanted:
                raise RecordError(
                    Reason.SHAPE_MISMATCH,
                    f"npz holds arrays {sorted(members)} but part {part.name!r} fills "
                    f"{sorted(wanted)}",
                )
            out = {}
            for info, _ in part.fills:
                member = members[info.name]
                if member.flag_bits & 0x1 or member.compress_type not in _NPZ_COMPRESSIONS:
                    raise RecordError(
                        Reason.DECODE_ERROR,
                        f"npz array {info.name!r} is encrypted or compressed other than "
                        "with deflate (numpy.savez and savez_compressed write neither)",
                    )
                limit = _dtype(info.dtype).itemsize * math.prod(info.shape) + _NPY_HEADER_MAX
                with zf.open(member) as f:
                    data = f.read(limit + 1)
                if len(data) > limit:
                    raise RecordError(
                        Reason.PAYLOAD_TOO_LARGE,
                        f"npz array {info.name!r} holds more than the {limit} bytes "
                        f"{info.dtype}{list(info.shape)} needs",
                    )
                out[info.name] = decode_npy(data, info)
            return out
    except RecordError:
        raise
    except MemoryError as exc:
        raise RecordError(Reason.PAYLOAD_TOO_LARGE, "npz archive too large to read") from exc
    except Exception as exc:  # zipfile and zlib raise many types on a forged archive
        raise RecordError(
            Reason.DECODE_ERROR, f"not a valid .npz archive: {type(exc).__name__}: {exc}"
        ) from exc


def _zip_entries(value: bytes) -> int | None:
    """The entry count of a zip archive's end-of-central-directory record (None: none
    found), read before ``zipfile`` builds an object for every entry."""
    end = value.rfind(b"PK\x05\x06", max(0, len(value) - 65557))
    if end < 0 or end + 22 > len(value):
        return None
    return int.from_bytes(value[end + 10 : end + 12], "little")


def decode_media(
    part: PartInfo, media: str, params: dict[str, str], value: bytes, limits: Limits
) -> dict[str, NDArray[Any]]:
    """Raw media through the part's transform: the tensors of every input it fills."""
    transform = part.transform
    if media not in transform.content_types():
        accepted = sorted([*transform.content_types(), *_ARRAY_TYPES])
        raise RecordError(
            Reason.UNSUPPORTED_CONTENT_TYPE,
            f"part {part.name!r} ({transform.kind}) does not take {media!r}; accepted: {accepted}",
        )
    decoded = transform.decode(value, media, params, limits)
    try:
        outputs = transform.apply(decoded)
    except RecordError:
        raise
    except MemoryError as exc:
        raise RecordError(
            Reason.PAYLOAD_TOO_LARGE, f"part {part.name!r}: too large for {transform.kind}"
        ) from exc
    except Exception as exc:  # the libraries under a transform promise no exception types
        raise RecordError(
            Reason.DECODE_ERROR,
            f"part {part.name!r}: {transform.kind} cannot use it: {type(exc).__name__}: {exc}",
        ) from exc
    tensors = part.fill(outputs)
    for info, _ in part.fills:
        if tensors[info.name].shape != info.shape:  # a transform's promise, checked
            raise RecordError(
                Reason.DECODE_ERROR,
                f"part {part.name!r}: {transform.kind} made {info.name} of "
                f"{list(tensors[info.name].shape)}, not {list(info.shape)}",
            )
    return tensors


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
    part = manifest.part(modality) if modality is not None else None
    if part is None:
        raise RecordError(
            Reason.UNKNOWN_MODALITY,
            f"header {HEADER_MODALITY}={modality!r} names no part of the model; expected one "
            f"of {list(manifest.part_names)}",
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
    media, params = media_type(ctype_raw.decode("utf-8", "replace"))
    if media == CONTENT_NPY:
        info = part.only_input
        if info is None:
            raise RecordError(
                Reason.UNSUPPORTED_CONTENT_TYPE,
                f"part {part.name!r} fills {list(part.input_names)}: send them as one "
                f"{CONTENT_NPZ} (numpy.savez, one array per input), not {CONTENT_NPY}",
            )
        tensors = {info.name: decode_npy(value, info)}
    elif media == CONTENT_NPZ:
        tensors = decode_npz(value, part)
    else:
        tensors = decode_media(part, media, params, value, limits)
    return Part(
        event_id=event_id,
        name=part.name,
        tensors=tensors,
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
