"""Archives of input parts: keep a topic's history beyond Kafka retention, restore it later.

``mmstream archive`` copies exact per-partition offset ranges of a topic to a file
(:func:`archive_range`); ``mmstream replay --source-file`` re-produces such a file
(:func:`restore_file`). The file format is :mod:`worker.backfill.archive_format`.

``--from``/``--to`` resolve per partition to offsets with Kafka's offsets-for-times
(:mod:`worker.backfill.ranges`): from the first record stamped at or after ``--from`` to the
first stamped at or after ``--to``. The cut is by offset, so consecutive windows
tile a partition exactly, and a record whose producer timestamp is out of order
may sit just inside or outside the window.

Records are written partition by partition in ascending partition number, and
within a partition in offset order. A range may hold fewer records than
``end - start``: compacted records and transaction markers occupy offsets too.
The file appears only once complete (temporary file + rename). The reading consumer
has no group id: it assigns the partitions itself and never commits, so archiving
leaves no trace on the cluster. Reading is ``read_uncommitted``, like the worker's
at-least-once input.

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

import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker.backfill.archive_format import (
    ArchivedRecord,
    AtomicWriter,
    encode_line,
    header_json,
    iter_archive,
    record_json,
)
from worker.backfill.ranges import (
    PartitionRange,
    RangeSettings,
    format_time,
    resolve_ranges,
)
from worker.config import FrozenConfig, KafkaSecurity, setting, setting_from
from worker.contract.errors import BrokerError, ConfigError
from worker.contract.records import OutRecord
from worker.core.pacing import Pacer
from worker.edge.choice import clients_for
from worker.edge.client import Clients, Deliveries, Producer, RangeReader

log = logging.getLogger(__name__)


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
    writer: AtomicWriter | None = None
    try:
        if not found:
            raise ConfigError(f"topic {topic!r} does not exist or has no partitions")
        missing = sorted(set(seen) - set(found))
        if missing:
            raise ConfigError(
                f"topic {topic!r} has no partition {missing} (it has {sorted(found)})"
            )
        writer = AtomicWriter(out)
        parts = _write_archive(reader, topic, ordered, writer, timeout_s)
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


def _write_archive(
    reader: RangeReader,
    topic: str,
    ordered: Sequence[PartitionRange],
    writer: AtomicWriter,
    timeout_s: float,
) -> list[dict[str, int]]:
    """The header line, then every range in order; returns each partition's summary."""
    ranges = [{"partition": r.partition, "start": r.start, "end": r.end} for r in ordered]
    writer.write(encode_line(header_json(topic, format_time(int(time.time() * 1000)), ranges)))
    parts = []
    for r in ordered:
        n = _copy_partition(reader, topic, r, writer, timeout_s)
        parts.append({"partition": r.partition, "start": r.start, "end": r.end, "records": n})
        log.info(
            "archived %s/%d offsets [%d, %d): %d records", topic, r.partition, r.start, r.end, n
        )
    return parts


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
    reader: RangeReader, topic: str, r: PartitionRange, writer: AtomicWriter, timeout_s: float
) -> int:
    """Copy offsets ``[r.start, r.end)`` of one partition to ``writer``; return records written."""
    written = 0
    for record in reader.read(topic, r.partition, r.start, r.end, timeout_s):
        writer.write(encode_line(record_json(record)))
        written += 1
    return written


# ------------------------------------------------------------------ restore


@dataclass
class _Sent:
    """What a restore has sent so far."""

    records: int = 0
    bytes: int = 0
    null_headers: int = 0


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
    counts = _partition_counts(path)
    total = sum(counts.values())
    security = security or KafkaSecurity()
    clients = clients_for(security.kafka_client)
    _check_target(clients, bootstrap_servers, to_topic, security, path, counts)
    speed = f"{rate:g} records/s" if rate > 0 else "full speed"
    log.info("restoring %d records of %s to %s at %s", total, path.name, to_topic, speed)
    producer = clients.plain_producer(
        bootstrap_servers, security, client_id=client_id, compression_type=compression_type
    )
    started = time.monotonic()
    sent = _send_archive(path, producer, to_topic, rate, flush_timeout_s, total)
    seconds = time.monotonic() - started
    log.info("restored %d records to %s in %.2f s", sent.records, to_topic, seconds)
    return _restore_summary(path, to_topic, counts, sent, seconds)


def _restore_summary(
    path: Path, to_topic: str, counts: dict[int, int], sent: _Sent, seconds: float
) -> dict[str, Any]:
    return {
        "file": str(path),
        "to_topic": to_topic,
        "records": sent.records,
        "partitions": [{"partition": p, "records": n} for p, n in sorted(counts.items())],
        "bytes": sent.bytes,
        "null_header_values": sent.null_headers,
        "seconds": round(seconds, 3),
    }


def _partition_counts(path: Path) -> dict[int, int]:
    """Records per partition of the archive, every line validated before anything is sent."""
    counts: dict[int, int] = {}
    for _, record in iter_archive(path):
        counts[record.partition] = counts.get(record.partition, 0) + 1
    return counts


def _check_target(
    clients: Clients,
    bootstrap_servers: str,
    to_topic: str,
    security: KafkaSecurity,
    path: Path,
    counts: dict[int, int],
) -> None:
    """Refuse a target topic that is missing or lacks a partition the archive uses."""
    needed = max(counts, default=-1) + 1
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


def _send_archive(
    path: Path,
    producer: Producer,
    to_topic: str,
    rate: float,
    flush_timeout_s: float,
    total: int,
) -> _Sent:
    """Send every record of ``path``, flush, and check that all ``total`` were acknowledged."""
    acks = Deliveries()
    # Bursts of up to 100 ms of records only to catch up after a slow send.
    pacer = Pacer(rate, burst=max(1.0, rate / 10)) if rate > 0 else None
    try:
        sent = _send_records(path, producer, to_topic, acks, pacer)
        try:
            producer.flush(flush_timeout_s)
        except BrokerError as exc:
            raise BrokerError(
                f"restore to {to_topic}: {sent.records - acks.acked} of {sent.records} records "
                f"not acknowledged after {flush_timeout_s:g} s: {exc}",
                retriable=exc.retriable,
            ) from exc
    finally:
        producer.close(5)
    if acks.failed or acks.acked != sent.records or sent.records != total:
        raise BrokerError(
            f"restore to {to_topic}: {acks.acked} of {total} records acknowledged "
            f"({acks.failed} failed: {acks.first_error!r}); the topic may hold a prefix of "
            "the archive, restoring again would duplicate it"
        )
    return sent


def _send_records(
    path: Path, producer: Producer, to_topic: str, acks: Deliveries, pacer: Pacer | None
) -> _Sent:
    """Send the records of ``path`` in file order, each to its own partition number."""
    sent = _Sent()
    with contextlib.closing(iter_archive(path)) as lines:
        for lineno, record in lines:
            if acks.failed:
                break  # stop at the first failure: later records would land out of order
            if pacer is not None:
                pacer.pace()
            out = OutRecord(
                to_topic,
                record.key,
                record.value,
                _restored_headers(record, sent, path, lineno),
                partition=record.partition,
                timestamp_ms=record.timestamp if record.timestamp >= 0 else None,
            )
            try:
                producer.send(out, acks.ok, acks.error)
            except BrokerError as exc:
                raise BrokerError(
                    f"{path.name} line {lineno}: {exc}", retriable=exc.retriable
                ) from exc
            sent.records += 1
            sent.bytes += record.size
    return sent


def _restored_headers(
    record: ArchivedRecord, sent: _Sent, path: Path, lineno: int
) -> tuple[tuple[str, bytes], ...]:
    """The headers of ``record``, a null value as empty bytes (counted; the first one logged)."""
    headers = []
    for name, value in record.headers:
        if value is None:
            sent.null_headers += 1
            if sent.null_headers == 1:
                log.warning(
                    "%s line %d: header %r has a null value; it is restored as "
                    "empty bytes (counted in null_header_values)",
                    path.name,
                    lineno,
                    name,
                )
        headers.append((name, value if value is not None else b""))
    return tuple(headers)


# ------------------------------------------------------------------ mmstream archive


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
