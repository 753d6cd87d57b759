"""The archive file format: reading, validating and atomically writing archive files.

No Kafka here: :mod:`worker.backfill.archive_copy` moves records between a topic and
such a file.

File format (``schemas/archive-record.schema.json``): JSON Lines, UTF-8 (ASCII in
practice: non-ASCII is ``\\u`` escaped), one JSON object per line, gzip-compressed
when the file name ends with ``.gz``.

* Line 1 is a header record (optional when restoring;
  :func:`~worker.backfill.archive_copy.archive_range` always writes it)::

    {"mmstream_archive": 1, "topic": "parts", "created": "2026-11-29T10:00:00.000+00:00",
     "ranges": [{"partition": 0, "start": 100, "end": 200}, ...]}

  ``mmstream_archive`` is the format version; ``ranges`` are the offset ranges that
  were read (``end`` exclusive), every partition of the archive, empty ones included.
* Every other line is one Kafka record::

    {"topic": "parts", "partition": 0, "offset": 100, "timestamp": 1764410400000,
     "timestamp_type": "create", "key": "ZXYtMQ==", "value": "iVBORw0K...",
     "headers": [["mm-modality", "aW1hZ2U="], ["content-type", "aW1hZ2UvcG5n"]]}

  ``timestamp`` is ms since the epoch (-1 if the record has none: restored with the
  current time), ``timestamp_type``
  ``create`` (the producer's) or ``log_append`` (the broker's); ``key`` and ``value``
  are standard base64 (with padding) or ``null`` (no key; tombstone); ``headers`` keeps
  Kafka's order and repeated names, each ``[name, base64 value]`` (a ``null`` value
  is a header sent with a null value by some other client).

:class:`AtomicWriter` writes to a temporary name in the target directory and renames
it over ``out`` once complete (an existing ``out`` is replaced), so a reader never
sees half an archive.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import gzip
import json
import os
import uuid
import zlib
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import IO, Any

from worker.contract.errors import ConfigError, os_error
from worker.contract.records import LogRecord

FORMAT_VERSION = 1
HEADER_KEY = "mmstream_archive"
RECORD_KEYS = ("topic", "partition", "offset", "timestamp", "timestamp_type", "key", "value")
RECORD_FIELDS = frozenset((*RECORD_KEYS, "headers"))
HEADER_FIELDS = frozenset((HEADER_KEY, "topic", "created", "ranges"))
TIMESTAMP_TYPES = ("create", "log_append")


# ------------------------------------------------------------------ records


#: One record line of an archive, decoded: a Kafka record exactly as the log held it.
ArchivedRecord = LogRecord


def header_json(topic: str, created: str, ranges: list[dict[str, int]]) -> dict[str, Any]:
    """The header line (before JSON encoding): ``ranges`` of ``{"partition", "start", "end"}``."""
    return {HEADER_KEY: FORMAT_VERSION, "topic": topic, "created": created, "ranges": ranges}


def record_json(record: LogRecord) -> dict[str, Any]:
    """The archive line of ``record`` (before JSON encoding)."""
    return {
        "topic": record.topic,
        "partition": record.partition,
        "offset": record.offset,
        "timestamp": record.timestamp,
        "timestamp_type": record.timestamp_type,
        "key": _b64(record.key),
        "value": _b64(record.value),
        "headers": [[name, _b64(value)] for name, value in record.headers],
    }


def encode_line(obj: dict[str, Any]) -> bytes:
    """One line of the file: compact JSON, ASCII, newline-terminated."""
    return (json.dumps(obj, separators=(",", ":")) + "\n").encode("ascii")


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode("ascii")


def _unb64(text: Any, what: str, where: str) -> bytes | None:
    if text is None:
        return None
    if not isinstance(text, str):
        raise ConfigError(f"{where}: {what} must be a base64 string or null")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ConfigError(f"{where}: {what} is not valid base64 ({exc})") from exc


def _int(obj: dict[str, Any], name: str, where: str, minimum: int) -> int:
    value = obj[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{where}: {name!r} must be an integer >= {minimum}, not {value!r}")
    return value


def parse_line(text: str, where: str) -> ArchivedRecord | dict[str, Any]:
    """One line -> an :class:`ArchivedRecord`, or the header record as a dict.

    ``where`` prefixes error messages (``"archive.jsonl line 7"``).
    """
    if not text.strip():
        raise ConfigError(f"{where}: empty line")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{where}: not JSON ({exc.msg} at column {exc.colno})") from exc
    if not isinstance(obj, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if HEADER_KEY in obj:
        return _check_header(obj, where)
    return _parse_record(obj, where)


def _parse_record(obj: dict[str, Any], where: str) -> ArchivedRecord:
    keys = set(obj)
    if keys != RECORD_FIELDS:
        missing, extra = sorted(RECORD_FIELDS - keys), sorted(keys - RECORD_FIELDS)
        raise ConfigError(
            f"{where}: not an archive record"
            + (f"; missing {missing}" if missing else "")
            + (f"; unknown {extra}" if extra else "")
        )
    topic = obj["topic"]
    if not isinstance(topic, str) or not topic:
        raise ConfigError(f"{where}: 'topic' must be a non-empty string")
    if obj["timestamp_type"] not in TIMESTAMP_TYPES:
        raise ConfigError(f"{where}: 'timestamp_type' must be one of {list(TIMESTAMP_TYPES)}")
    raw_headers = obj["headers"]
    if not isinstance(raw_headers, list):
        raise ConfigError(f"{where}: 'headers' must be a list of [name, base64 value]")
    headers = []
    for i, pair in enumerate(raw_headers):
        if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str)):
            raise ConfigError(f"{where}: headers[{i}] must be [name, base64 value or null]")
        headers.append((pair[0], _unb64(pair[1], f"headers[{i}] value", where)))
    return ArchivedRecord(
        topic=topic,
        partition=_int(obj, "partition", where, 0),
        offset=_int(obj, "offset", where, 0),
        timestamp=_int(obj, "timestamp", where, -1),
        timestamp_type=obj["timestamp_type"],
        key=_unb64(obj["key"], "'key'", where),
        value=_unb64(obj["value"], "'value'", where),
        headers=tuple(headers),
    )


def _check_header(obj: dict[str, Any], where: str) -> dict[str, Any]:
    version = obj[HEADER_KEY]
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise ConfigError(
            f"{where}: archive format version {version!r} is not supported "
            f"(this mmstream reads version {FORMAT_VERSION})"
        )
    missing, unknown = sorted(HEADER_FIELDS - set(obj)), sorted(set(obj) - HEADER_FIELDS)
    if missing or unknown:
        raise ConfigError(
            f"{where}: not an archive header"
            + (f"; missing {missing}" if missing else "")
            + (f"; unknown {unknown}" if unknown else "")
        )
    return obj


# ------------------------------------------------------------------ files


def _is_gzip(path: Path) -> bool:
    return path.name.endswith(".gz")


def _open_text(path: Path) -> IO[str]:
    if _is_gzip(path):
        return gzip.open(path, "rt", encoding="utf-8")
    return path.open(encoding="utf-8")


def iter_archive(path: Path) -> Generator[tuple[int, ArchivedRecord], None, None]:
    """(line number, record) for every record of an archive, validating as it goes.

    Raises:
        ConfigError: the file cannot be read, or a line (named by number) is malformed.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"archive {str(path)!r}: no such file")
    lineno = 0
    try:
        with _open_text(path) as stream:
            for lineno, text in enumerate(stream, start=1):
                parsed = parse_line(text, f"{path.name} line {lineno}")
                if isinstance(parsed, dict):
                    if lineno != 1:
                        raise ConfigError(
                            f"{path.name} line {lineno}: a header record may only be line 1"
                        )
                    continue
                yield lineno, parsed
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path.name} line {lineno + 1}: not UTF-8 ({exc.reason})") from exc
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise ConfigError(
            f"{path.name}: broken gzip data after line {lineno} ({exc or type(exc).__name__})"
        ) from exc
    except OSError as exc:
        raise ConfigError(f"archive {str(path)!r}: {exc.strerror or exc}") from exc


class AtomicWriter:
    """Writes to a temporary file beside ``out``; :meth:`commit` renames it over ``out``.

    File system errors name ``out``: a full disk, quota or I/O error is a
    :class:`~worker.contract.errors.StorageError` (exit 1), anything else (permissions,
    a vanished directory) a :class:`ConfigError` (exit 2); see ``os_error``.
    """

    def __init__(self, out: Path) -> None:
        self.out = out
        self.tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:12]}.tmp")
        self._done = False
        with self._errors():
            fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            self._raw = os.fdopen(fd, "wb")
            self._gz = (
                gzip.GzipFile(filename="", mode="wb", fileobj=self._raw) if _is_gzip(out) else None
            )

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except OSError as exc:
            raise os_error(f"--out {str(self.out)!r}", exc) from exc

    def write(self, line: bytes) -> None:
        with self._errors():
            (self._gz or self._raw).write(line)

    def commit(self) -> None:
        with self._errors():
            if self._gz is not None:
                self._gz.close()
            self._raw.flush()
            os.fsync(self._raw.fileno())
            self._raw.close()
            os.replace(self.tmp, self.out)
        self._done = True
        with contextlib.suppress(OSError):  # make the rename durable where the OS allows
            dir_fd = os.open(self.out.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    def discard(self) -> None:
        """Remove the temporary file unless committed (closing quietly: already failing)."""
        if self._done:
            return
        for stream in (getattr(self, "_gz", None), getattr(self, "_raw", None)):
            if stream is not None:
                with contextlib.suppress(Exception):
                    stream.close()
        with contextlib.suppress(OSError):
            self.tmp.unlink()
