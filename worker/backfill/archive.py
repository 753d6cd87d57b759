"""Archives of input parts: keep a topic's history beyond Kafka retention, restore it later.

``mmstream archive`` copies exact per-partition offset ranges of a topic to a file
(:func:`archive_range`); ``mmstream replay --source-file`` re-produces such a file
(:func:`restore_file`).

File format (``schemas/archive-record.schema.json``): JSON Lines, UTF-8 (ASCII in
practice: non-ASCII is ``\\u`` escaped), one JSON object per line, gzip-compressed
when the file name ends with ``.gz``.

* Line 1 is a header record (optional when restoring; :func:`archive_range` always
  writes it)::

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

``--from``/``--to`` resolve per partition to offsets with Kafka's offsets-for-times
(:mod:`worker.backfill.ranges`): from the first record stamped at or after ``--from`` to the
first stamped at or after ``--to``. The cut is by offset, so consecutive windows
tile a partition exactly, and a record whose producer timestamp is out of order
may sit just inside or outside the window.

Records are written partition by partition in ascending partition number, and
within a partition in offset order. A range may hold fewer records than
``end - start``: compacted records and transaction markers occupy offsets too.
The file is written to a temporary name in the target directory and renamed
over ``out`` once complete (an existing ``out`` is replaced), so a reader never
sees half an archive. The reading consumer has no group id: it assigns the
partitions itself and never commits, so archiving leaves no trace on the cluster.
Reading is ``read_uncommitted``, like the worker's at-least-once input.

Restoring validates the whole file first (a malformed line is a :class:`ConfigError`
naming its line number, and nothing is sent), checks that the target topic has every
partition the file uses, then sends each record to the same partition number with
its key, value, headers in order and original timestamp, in file order. The producer
is idempotent with ``acks=all`` (so retries cannot reorder a partition); every send must
be acknowledged or :class:`BrokerError` is raised. Both directions go through the
``--kafka-client`` chosen (:mod:`worker.edge.client`'s range reader and plain
producer). Notes:

* A target topic with ``message.timestamp.type=LogAppendTime`` overrides the
  original timestamps; one with time retention deletes restored records whose
  timestamps are older than ``retention.ms`` soon after they arrive (give the
  target ``retention.ms=-1`` or a long enough retention).
* A header with a null value (sent so by some other client) is restored as empty bytes
  (kafka-python cannot send a null one; both clients do the same), logged, and counted
  in the summary (``null_header_values``).
* Restoring the same file twice produces every record twice: Kafka offsets of the
  target are new ones.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import gzip
import json
import logging
import os
import time
import uuid
import zlib
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from worker.backfill.ranges import (
    PartitionRange,
    RangeSettings,
    format_time,
    resolve_ranges,
)
from worker.config import (
    FrozenConfig,
    KafkaSecurity,
    add_config_args,
    config_from_args,
    setting,
    setting_from,
)
from worker.contract.errors import BrokerError, ConfigError, os_error
from worker.contract.records import LogRecord, OutRecord
from worker.core.pacing import Pacer
from worker.edge.client import Clients, Deliveries, RangeReader, clients_for

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
HEADER_KEY = "mmstream_archive"
RECORD_KEYS = ("topic", "partition", "offset", "timestamp", "timestamp_type", "key", "value")
RECORD_FIELDS = frozenset((*RECORD_KEYS, "headers"))
HEADER_FIELDS = frozenset((HEADER_KEY, "topic", "created", "ranges"))
TIMESTAMP_TYPES = ("create", "log_append")


# ------------------------------------------------------------------ records


#: One record line of an archive, decoded: a Kafka record exactly as the log held it.
ArchivedRecord = LogRecord


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


class _AtomicWriter:
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


# ------------------------------------------------------------------ archive


def archive_range(
    bootstrap_servers: str,
    topic: str,
    ranges: Sequence[PartitionRange],
    out: Path,
    *,
    client_id: str = "mmstream-archive",
    timeout_s: float = 30.0,
    security: KafkaSecurity | None = None,
) -> dict[str, Any]:
    """Write exactly the records of ``ranges`` (of ``topic``) to ``out``
    (``security``: the client (``--kafka-client``) and its security settings).

    Records go partition by partition (ascending), each in offset order, after a
    header line; ``.gz`` names are gzip-compressed; the file appears only when
    complete (temporary file + rename). ``timeout_s``: a partition that makes no
    progress this long is an error.

    Returns:
        ``{"topic", "out", "records", "partitions": [{"partition", "start", "end",
        "records"}, ...], "bytes" (file size), "seconds"}``.

    Raises:
        ConfigError: a partition is named twice, or ``topic`` lacks one; ``out``'s
            directory does not exist.
        BrokerError: Kafka is unreachable, a range start was deleted meanwhile, or
            reading stalls.
        StorageError: ``out`` cannot be written for a full disk, quota or I/O error.
    """
    out = Path(out)
    ordered = sorted(ranges, key=lambda r: r.partition)
    seen = [r.partition for r in ordered]
    if len(set(seen)) != len(seen):
        raise ConfigError(f"archive: a partition appears twice in the ranges {seen}")
    if not out.parent.is_dir():
        raise ConfigError(f"--out {str(out)!r}: directory {str(out.parent)!r} does not exist")
    started = time.monotonic()
    security = security or KafkaSecurity()
    clients = clients_for(security.kafka_client)
    found = set(_partitions(clients, bootstrap_servers, topic, security))
    reader = clients.range_reader(bootstrap_servers, security, client_id=client_id)
    writer: _AtomicWriter | None = None
    try:
        if not found:
            raise ConfigError(f"topic {topic!r} does not exist or has no partitions")
        missing = sorted(set(seen) - set(found))
        if missing:
            raise ConfigError(
                f"topic {topic!r} has no partition {missing} (it has {sorted(found)})"
            )
        writer = _AtomicWriter(out)
        header = {
            HEADER_KEY: FORMAT_VERSION,
            "topic": topic,
            "created": format_time(int(time.time() * 1000)),
            "ranges": [{"partition": r.partition, "start": r.start, "end": r.end} for r in ordered],
        }
        writer.write(_line(header))
        parts = []
        for r in ordered:
            n = _copy_partition(reader, topic, r, writer, timeout_s)
            parts.append({"partition": r.partition, "start": r.start, "end": r.end, "records": n})
            log.info(
                "archived %s/%d offsets [%d, %d): %d records", topic, r.partition, r.start, r.end, n
            )
        writer.commit()
    finally:
        if writer is not None:
            writer.discard()
        reader.close()
    seconds = time.monotonic() - started
    total = sum(int(p["records"]) for p in parts)
    size = out.stat().st_size
    log.info("archive %s: %d records, %d bytes in %.2f s", out, total, size, seconds)
    return {
        "topic": topic,
        "out": str(out),
        "records": total,
        "partitions": parts,
        "bytes": size,
        "seconds": round(seconds, 3),
    }


def _line(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj, separators=(",", ":")) + "\n").encode("ascii")


def _partitions(
    clients: Clients, bootstrap_servers: str, topic: str, security: KafkaSecurity
) -> list[int]:
    """The partitions of ``topic`` (empty if it does not exist); creates nothing."""
    inspector = clients.inspector(bootstrap_servers, security)
    try:
        return inspector.partitions(topic)
    finally:
        inspector.close()


def _copy_partition(
    reader: RangeReader, topic: str, r: PartitionRange, writer: _AtomicWriter, timeout_s: float
) -> int:
    """Copy offsets ``[r.start, r.end)`` of one partition to ``writer``; return records written."""
    written = 0
    for record in reader.read(topic, r.partition, r.start, r.end, timeout_s):
        writer.write(_line(record_json(record)))
        written += 1
    return written


# ------------------------------------------------------------------ restore


def restore_file(
    path: Path,
    bootstrap_servers: str,
    to_topic: str,
    rate: float = 0,
    *,
    client_id: str = "mmstream-restore",
    flush_timeout_s: float = 120.0,
    security: KafkaSecurity | None = None,
    compression_type: str | None = None,
) -> dict[str, Any]:
    """Re-produce every record of the archive ``path`` to ``to_topic``.

    Each record keeps its partition number, key, value, headers (order and repeats)
    and timestamp; records go in file order (so per-partition order is kept).
    ``rate``: records/s, 0 = as fast as possible. The file is validated completely
    before anything is sent. ``compression_type``: ``--compression-type`` of the
    restored batches (None = none; the archive does not record the source's codec).
    ``security``: the client (``--kafka-client``) and its security settings.

    Returns:
        ``{"file", "to_topic", "records", "partitions": [{"partition", "records"}, ...],
        "bytes" (keys + values + headers sent), "null_header_values", "seconds"}``.

    Raises:
        ConfigError: a malformed line (its number in the message), a missing file,
            ``rate < 0``, a target topic that does not exist or has fewer partitions
            than the file needs.
        BrokerError: Kafka is unreachable, or a record was not acknowledged.
    """
    path = Path(path)
    if rate < 0:
        raise ConfigError("--rate must be >= 0 (0 = as fast as possible)")
    if not to_topic:
        raise ConfigError("--to-topic is required")
    counts: dict[int, int] = {}
    for _, record in iter_archive(path):  # validate all before sending anything
        counts[record.partition] = counts.get(record.partition, 0) + 1
    total = sum(counts.values())
    needed = max(counts, default=-1) + 1
    security = security or KafkaSecurity()
    clients = clients_for(security.kafka_client)
    have = len(_partitions(clients, bootstrap_servers, to_topic, security))
    if have == 0:
        raise ConfigError(
            f"target topic {to_topic!r} does not exist: create it with at least "
            f"{max(needed, 1)} partition(s)"
        )
    if have < needed:
        raise ConfigError(
            f"target topic {to_topic!r} has {have} partition(s) but {path.name} has records "
            f"of partition {needed - 1}: it needs at least {needed}"
        )
    log.info(
        "restoring %d records of %s to %s at %s",
        total,
        path.name,
        to_topic,
        f"{rate:g} records/s" if rate > 0 else "full speed",
    )
    acks = Deliveries()
    producer = clients.plain_producer(
        bootstrap_servers, security, client_id=client_id, compression_type=compression_type
    )
    # Bursts of up to 100 ms of records only to catch up after a slow send.
    pacer = Pacer(rate, burst=max(1.0, rate / 10)) if rate > 0 else None
    started = time.monotonic()
    sent = sent_bytes = null_headers = 0
    try:
        with contextlib.closing(iter_archive(path)) as lines:
            for lineno, record in lines:
                if acks.failed:
                    break  # stop at the first failure: later records would land out of order
                if pacer is not None:
                    pacer.pace()
                headers = []
                for name, value in record.headers:
                    if value is None:
                        null_headers += 1
                        if null_headers == 1:
                            log.warning(
                                "%s line %d: header %r has a null value; it is restored as "
                                "empty bytes (counted in null_header_values)",
                                path.name,
                                lineno,
                                name,
                            )
                    headers.append((name, value if value is not None else b""))
                out = OutRecord(
                    to_topic,
                    record.key,
                    record.value,
                    tuple(headers),
                    partition=record.partition,
                    timestamp_ms=record.timestamp if record.timestamp >= 0 else None,
                )
                try:
                    producer.send(out, acks.ok, acks.error)
                except BrokerError as exc:
                    raise BrokerError(
                        f"{path.name} line {lineno}: {exc}", retriable=exc.retriable
                    ) from exc
                sent += 1
                sent_bytes += record.size
        try:
            producer.flush(flush_timeout_s)
        except BrokerError as exc:
            raise BrokerError(
                f"restore to {to_topic}: {sent - acks.acked} of {sent} records not "
                f"acknowledged after {flush_timeout_s:g} s: {exc}",
                retriable=exc.retriable,
            ) from exc
    finally:
        producer.close(5)
    if acks.failed or acks.acked != sent or sent != total:
        raise BrokerError(
            f"restore to {to_topic}: {acks.acked} of {total} records acknowledged "
            f"({acks.failed} failed: {acks.first_error!r}); the topic may hold a prefix of "
            "the archive, restoring again would duplicate it"
        )
    seconds = time.monotonic() - started
    log.info("restored %d records to %s in %.2f s", sent, to_topic, seconds)
    return {
        "file": str(path),
        "to_topic": to_topic,
        "records": sent,
        "partitions": [{"partition": p, "records": n} for p, n in sorted(counts.items())],
        "bytes": sent_bytes,
        "null_header_values": null_headers,
        "seconds": round(seconds, 3),
    }


# ------------------------------------------------------------------ CLI pieces


@dataclass(frozen=True)
class ArchiveConfig(KafkaSecurity, RangeSettings, FrozenConfig):
    """Settings of ``mmstream archive``; see ``mmstream archive --help``.

    ``from_time``/``to_time`` are the ``--from``/``--to`` flags (ISO-8601), ``ranges``
    the ``--range`` flags; with none of them, every partition from its log start
    to its current end.
    """

    bootstrap_servers: str = setting(help="Kafka bootstrap servers")
    source_topic: str = setting(help="topic to archive")
    from_time: str = setting_from(
        RangeSettings,
        "from_time",
        help="ISO-8601 start (inclusive), e.g. 2026-11-29T10:00:00Z (no zone = UTC): per "
        "partition, the first offset whose timestamp is at or after it; none of "
        "--from/--to/--range: every partition, whole log",
    )
    to_time: str = setting_from(
        RangeSettings,
        "to_time",
        help="ISO-8601 end (exclusive; default: the current end of each partition)",
    )
    out: Path | None = setting(
        None,
        help="archive file, JSON Lines (gzip if it ends with .gz); written atomically, "
        "an existing file is replaced",
    )
    dry_run: bool = setting(
        False,
        help="print each partition's offset range and record count (end - start: fewer on "
        "compacted or transactional topics) as one JSON line; read no records, write nothing",
    )
    client_id: str = setting("mmstream-archive", help="Kafka client id")
    timeout_s: float = setting(
        30.0, help="give up when a partition makes no progress for this long"
    )

    def __post_init__(self) -> None:
        super().__post_init__()  # every setting's choices
        for name in ("bootstrap_servers", "source_topic"):
            if not getattr(self, name):
                raise ConfigError(f"--{name.replace('_', '-')} is required")
        self._check_range()
        if self.out is not None and str(self.out):
            object.__setattr__(self, "out", Path(self.out))
        else:
            object.__setattr__(self, "out", None)
        if self.out is None and not self.dry_run:
            raise ConfigError("--out is required (or --dry-run)")
        if self.out is not None and not self.dry_run:
            if self.out.is_dir():
                raise ConfigError(f"--out {str(self.out)!r} is a directory")
            if not self.out.parent.is_dir():
                raise ConfigError(
                    f"--out {str(self.out)!r}: directory {str(self.out.parent)!r} does not exist"
                )
        if self.timeout_s <= 0:
            raise ConfigError("--timeout-s must be > 0")
        self._check_security()


def add_archive_args(p: argparse.ArgumentParser) -> None:
    """The flags of ``mmstream archive``: those of :class:`ArchiveConfig`."""
    add_config_args(p, ArchiveConfig)


#: Namespace entries that are not settings (set by the CLI's parser).


def archive_config(args: argparse.Namespace) -> ArchiveConfig:
    """Parsed ``mmstream archive`` flags -> :class:`ArchiveConfig` (unknown keys refused)."""
    return config_from_args(ArchiveConfig, args)


def run_archive(config: ArchiveConfig) -> dict[str, Any]:
    """Resolve the ranges of ``config`` and archive them (or, with ``dry_run``, report them)."""
    inspector = clients_for(config.kafka_client).inspector(config.bootstrap_servers, config)
    from_ms, to_ms = config.window()
    try:
        resolved = resolve_ranges(
            inspector,
            config.source_topic,
            from_ms=from_ms,
            to_ms=to_ms,
            offsets=config.offsets(),
        )
    finally:
        inspector.close()
    if config.dry_run:
        parts = [
            {
                "partition": r.partition,
                "start": r.start,
                "end": r.end,
                "records": r.count,
                "log_start": r.log_start,
                "log_end": r.log_end,
            }
            for r in resolved
        ]
        return {
            "dry_run": True,
            "topic": config.source_topic,
            "records": sum(r.count for r in resolved),
            "partitions": parts,
        }
    if config.out is None:  # __post_init__ refuses this; narrows the type
        raise ConfigError("--out is required (or --dry-run)")
    return archive_range(
        config.bootstrap_servers,
        config.source_topic,
        resolved,
        config.out,
        client_id=config.client_id,
        timeout_s=config.timeout_s,
        security=config,
    )


def cmd_archive(args: argparse.Namespace) -> int:
    """``mmstream archive``: prints a one-line JSON summary."""
    summary = run_archive(archive_config(args))
    print(json.dumps(summary, separators=(", ", ": ")))
    return 0
