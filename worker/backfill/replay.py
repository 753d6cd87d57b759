"""``mmstream replay``: bounded, resumable re-scoring of a topic range (backfills).

It runs the worker's own pipeline (:class:`~worker.core.pipeline.Worker`: decode ->
assemble -> batch -> infer -> publish -> commit) over a fixed range instead of
a live subscription:

* **Range**: ``--from`` / ``--to`` (ISO-8601) resolved per partition with
  offsets-for-times, or explicit ``--range P:START-END`` offsets
  (:mod:`worker.backfill.ranges`). It assigns the partitions itself: no live consumer
  group is joined, and no live group's offsets are ever read or moved.
* **Which events**: with a time window, an event belongs to it when its newest
  part's record timestamp is in ``[from, to)``; the read is widened by
  ``--edge-margin-ms`` on both sides so that an event straddling an edge is
  read whole. Events completed outside the window belong to the neighbouring
  window (consecutive windows predict every event once) and are counted as
  ``outside_window``, not predicted. Events still incomplete when every
  partition reached its end are handled by ``--on-incomplete`` if they belong
  to the window, and counted as outside otherwise. With explicit offsets every
  event in the range is the backfill's.
* **Resumable**: progress is committed to the group ``mmstream-backfill-<id>``
  (``--backfill-id``; by default derived from the source topic, range, output
  topic and model, so re-running the same command continues). On a re-run
  each partition starts at its checkpoint, and events finished beyond it are
  skipped (the worker's commit metadata). ``--restart`` starts over.
  At-least-once, predictions a killed run wrote after its last checkpoint (at
  most one commit interval, 500 ms, of work) are written again on the re-run;
  ``--guarantee exactly-once`` writes outputs and checkpoints in transactions,
  so read_committed readers see each prediction once.
* **Throttled**: ``--rate`` events/s (token bucket, bursts of one batch).
* **Progress**: a bar on a terminal, a log line every 10 s otherwise.
* ``--dry-run`` prints the resolved ranges and the checkpoint and changes nothing.

Archives (``--source-file``, written by ``mmstream archive``): with
``--to-topic`` they are re-produced there at ``--rate``
(:func:`worker.backfill.archive.restore_file`) and nothing is scored; with ``--model``
they are scored: restored once into a staging topic
``mmstream-staging-<backfill id>`` (same partitions and order; kept by a killed
run, so a re-run continues instead of restoring again), replayed whole as
above, and the staging topic is deleted once every event is done.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from kafka import KafkaConsumer, TopicPartition
from kafka.structs import OffsetAndMetadata

from worker.backfill.ranges import PartitionRange, RangeSettings, format_time, resolve_ranges
from worker.config import FrozenConfig, KafkaSecurity, WorkerConfig
from worker.contract.errors import BrokerError, ConfigError
from worker.contract.records import Event, RawRecord
from worker.core.assemble import Incomplete
from worker.core.pipeline import Clock, Worker, WorkerStats, wall_ms
from worker.edge.kafka_io import committed, count_records, delete_topics, ensure_topics
from worker.inference.model import ModelRunner

log = logging.getLogger(__name__)

BACKFILL_GROUP_PREFIX = "mmstream-backfill-"


@dataclass(frozen=True)
class ReplayConfig(KafkaSecurity, RangeSettings, FrozenConfig):
    """Settings of ``mmstream replay``; see ``mmstream replay --help``."""

    bootstrap_servers: str
    source_topic: str = ""
    model: Path | None = None
    output_topic: str = ""
    dlq_topic: str = ""
    backfill_id: str = ""
    restart: bool = False
    rate: float = 0.0
    edge_margin_ms: int = 60_000
    on_incomplete: str = "dlq"
    guarantee: str = "at-least-once"
    max_batch_size: int = 32
    max_batch_delay_ms: int = 10
    device: str = "auto"
    dry_run: bool = False
    progress: str = "auto"
    source_file: Path | None = None
    to_topic: str = ""
    log_level: str = "INFO"
    log_format: str = "text"

    def __post_init__(self) -> None:
        self._check_security()
        self._check_range()
        if self.source_file is not None:
            if self.source_topic:
                raise ConfigError("give --source-topic or --source-file, not both")
            if self.rate < 0:
                raise ConfigError("--rate must be >= 0")
            if self.to_topic:
                return  # restore only
            if self.model is None or not self.output_topic:
                raise ConfigError(
                    "--source-file: give --to-topic to restore the archive, or --model and "
                    "--output-topic to score it"
                )
            if self.from_time or self.to_time or self.ranges:
                raise ConfigError("--source-file is scored whole: no --from/--to/--range")
            object.__setattr__(self, "model", Path(self.model))
            if not self.dlq_topic:
                object.__setattr__(self, "dlq_topic", f"{self.output_topic}.dlq")
            return
        if not self.source_topic:
            raise ConfigError("--source-topic (or --source-file) is required")
        if self.model is None:
            raise ConfigError("--model is required")
        object.__setattr__(self, "model", Path(self.model))
        if not self.ranges and not (self.from_time or self.to_time):
            raise ConfigError("give a range: --from and/or --to, or --range P:START-END,...")
        if not self.output_topic:
            object.__setattr__(self, "output_topic", f"{self.source_topic}.backfill")
        if not self.dlq_topic:
            object.__setattr__(self, "dlq_topic", f"{self.output_topic}.dlq")
        if self.source_topic in (self.output_topic, self.dlq_topic):
            raise ConfigError("--output-topic and --dlq-topic must differ from --source-topic")
        if self.rate < 0 or self.edge_margin_ms < 0:
            raise ConfigError("--rate and --edge-margin-ms must be >= 0")
        if self.progress not in ("auto", "bar", "log", "none"):
            raise ConfigError("--progress must be auto, bar, log or none")

    def default_backfill_id(self, model_sha256: str) -> str:
        """Same command (topic or file contents, range, output, model) -> same id -> resumes."""
        source = self.source_topic or _file_sha256(Path(self.source_file or ""))
        ranges = ",".join(self.ranges)  # the id of a comma-separated --range is unchanged
        parts = (source, self.from_time, self.to_time, ranges, self.output_topic)
        key = "|".join((*parts, model_sha256))
        return hashlib.sha256(key.encode()).hexdigest()[:12]


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    except OSError as exc:
        raise ConfigError(f"--source-file {str(path)!r}: {exc.strerror or exc}") from exc
    return digest.hexdigest()


class Pacer:
    """Token bucket: on average ``rate`` events/s, bursts of up to ``burst`` events.

    It starts empty, so from the first batch on the rate holds (a full bucket at
    the start would let one extra burst through)."""

    def __init__(self, rate: float, burst: int, clock: Clock) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.clock = clock
        self._tokens = 0.0
        self._at = clock()

    def _refill(self) -> None:
        now = self.clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate / 1000.0)
        self._at = now

    def ready(self, n: int) -> bool:
        self._refill()
        return self._tokens + 1e-9 >= min(n, self.burst)  # 1e-9: float sums of rate/1000

    def wait_ms(self, n: int) -> int:
        """Milliseconds until ``n`` events may go (0 = now)."""
        self._refill()
        missing = min(n, self.burst) - self._tokens - 1e-9
        return 0 if missing <= 0 else math.ceil(missing * 1000.0 / self.rate)

    def take(self, n: int) -> None:
        self._refill()
        self._tokens -= n


@dataclass
class ReplayCounters:
    """What the replay did besides predicting (the summary's extra lines)."""

    outside_window: int = 0
    incomplete_in_window: int = 0
    resumed_from: dict[int, int] = field(default_factory=dict)


class Progress:
    """A bar on a terminal (``\\r``-updated, 2 per second), else a log line every 10 s."""

    def __init__(
        self,
        total_records: int,
        mode: str,
        parts_per_event: int = 1,
        stream: TextIO | None = None,
    ) -> None:
        self.stream = stream or sys.stderr
        self.total_events = total_records // max(1, parts_per_event)
        self.done_before = 0  # records before the checkpoint a resumed run starts from
        if mode == "auto":
            mode = "bar" if self.stream.isatty() else "log"
        self.mode = mode
        self.total = max(1, total_records)
        self.start = time.monotonic()
        self._last = 0.0

    def update(self, records: int, predicted: int, final: bool = False) -> None:
        if self.mode == "none":
            return
        now = time.monotonic()
        every = 0.5 if self.mode == "bar" else 10.0
        if not final and now - self._last < every:
            return
        self._last = now
        elapsed = max(1e-3, now - self.start)
        records += self.done_before
        frac = min(1.0, records / self.total)
        rate = predicted / elapsed
        eta = (elapsed / frac - elapsed) if frac > 0 else float("nan")
        if self.mode == "bar":
            width = 30
            bar = "=" * int(frac * width)
            self.stream.write(
                f"\r[{bar:<{width}}] {frac:6.1%}  {predicted}/~{self.total_events} events  "
                f"{rate:7.1f} ev/s  ETA {eta:5.0f} s "
            )
            if final:
                self.stream.write("\n")
            self.stream.flush()
        else:
            log.info(
                "replay: %.1f%% of %d records, %d of ~%d events predicted, %.1f events/s, "
                "ETA %.0f s",
                100 * frac,
                self.total,
                predicted,
                self.total_events,
                rate,
                eta,
            )


class ReplayWorker(Worker):
    """The worker over fixed per-partition offset ranges, checkpointed, optionally paced."""

    def __init__(
        self,
        config: WorkerConfig,
        runner: ModelRunner,
        ranges: list[PartitionRange],
        window: tuple[int | None, int | None],
        *,
        restart: bool = False,
        rate: float = 0.0,
        progress: Progress | None = None,
        clock: Clock = wall_ms,
    ) -> None:
        super().__init__(config, runner, clock)
        topic = config.input_topic
        self.ranges = {(topic, r.partition): r for r in ranges}
        self.window = window
        self.restart = restart
        self.pacer = Pacer(rate, config.max_batch_size, clock) if rate > 0 else None
        self.progress = progress
        self.counters = ReplayCounters()
        self.reached: set[tuple[str, int]] = set()
        self.flushed = False

    # -- hooks of Worker

    def _join(self) -> None:
        tps = [TopicPartition(t, p) for t, p in sorted(self.ranges)]
        self.consumer.assign(tps)
        if self.restart:
            # The checkpoint says "nothing done": resuming after this run, or rewinding
            # after an aborted transaction, starts from the range, not from an old run.
            self.consumer.commit(
                offsets={
                    TopicPartition(*k): OffsetAndMetadata(r.start, "", -1)
                    for k, r in self.ranges.items()
                }
            )
        for tp in tps:
            pos = self._start_of((tp.topic, tp.partition))
            r = self.ranges[(tp.topic, tp.partition)]
            if pos > r.start:
                self.counters.resumed_from[tp.partition] = pos
        if self.counters.resumed_from:
            log.info("replay: resuming from checkpoint %s", self.counters.resumed_from)
            if self.progress is not None:
                self.progress.done_before = sum(
                    pos - self.ranges[(self.config.input_topic, p)].start
                    for p, pos in self.counters.resumed_from.items()
                )
        self.ready.set()

    def _start_of(self, key: tuple[str, int]) -> int:
        """Seek a partition to its checkpoint (within the range); pause it if it is done."""
        r = self.ranges[key]
        checkpoint, _meta = committed(self.consumer, key)
        pos = r.start if checkpoint is None else min(max(checkpoint, r.start), r.end)
        tp = TopicPartition(*key)
        self.consumer.seek(tp, pos)
        if pos >= r.end:
            self._reach(key)
        return pos

    def _rewind(self) -> None:
        """After an aborted transaction: back to the checkpoint, and the ends not reached."""
        self.reached.clear()
        self.flushed = False
        self.counters.outside_window = self.counters.incomplete_in_window = 0
        self.consumer.resume(*self.consumer.paused())
        for key in self.ranges:
            self._start_of(key)

    def _resumable(self) -> set[Any]:
        return {tp for tp in self.consumer.paused() if (tp.topic, tp.partition) not in self.reached}

    def _owned(self) -> set[tuple[str, int]]:
        return set(self.ranges)

    def _admit(self, raw: RawRecord) -> bool:
        key = (raw.source.topic, raw.source.partition)
        r = self.ranges.get(key)
        if r is None or raw.source.offset >= r.end:
            self._reach(key)
            return False
        return raw.source.offset >= r.start  # (a rewind to the log start reads before it)

    def _accept(self, event: Event) -> bool:
        if self._in_window(event.last_part_ms):
            return True
        self.counters.outside_window += 1
        return False

    def _incomplete(self, inc: Incomplete, now: int) -> None:
        """Incomplete events of the window follow --on-incomplete; the others belong to a
        neighbouring window and are only counted (one rule for mid-range and at the end)."""
        newest = max(p.source.timestamp_ms for p in inc.parts.values())
        if self._in_window(newest):
            self.counters.incomplete_in_window += 1
            super()._incomplete(inc, now)
        else:
            self.counters.outside_window += 1
            self._mark_done(tuple(p.source for p in inc.all_parts))

    def _can_submit(self, events: int) -> bool:
        return self.stage.has_room() and (self.pacer is None or self.pacer.ready(events))

    def _blocked_wait_ms(self) -> int:
        if self.pacer is None:
            return 2
        n = min(len(self.batcher), self.batcher.max_size)
        return max(2, min(100, self.pacer.wait_ms(n)))

    def _submit(self, events: Any) -> None:
        if self.pacer is not None:
            self.pacer.take(len(events))
        super()._submit(events)

    def _after_poll(self) -> None:
        for key, r in self.ranges.items():
            if key not in self.reached and self.consumer.position(TopicPartition(*key)) >= r.end:
                self._reach(key)
        if len(self.reached) == len(self.ranges) and not self.flushed:
            self._flush_edges()
        if self.progress is not None:
            self.progress.update(self.stats.consumed, self.stats.predicted)

    def _done(self) -> bool:
        return self.flushed and self._pending_events() == 0 and self.tracker.open_count() == 0

    # -- range bookkeeping

    def _reach(self, key: tuple[str, int]) -> None:
        if key in self.ranges:
            self.reached.add(key)
            self.consumer.pause(TopicPartition(*key))

    def _in_window(self, ts_ms: int) -> bool:
        start, end = self.window
        return (start is None or ts_ms >= start) and (end is None or ts_ms < end)

    def _flush_edges(self) -> None:
        """Every partition is at its end: no more parts will come for what is pending."""
        now = self.clock()
        for inc in self.assembler.expire(now, 0):
            self._incomplete(inc, now)
        self.flushed = True


# ------------------------------------------------------------------ the command


def _worker_config(config: ReplayConfig, backfill_id: str) -> WorkerConfig:
    if config.model is None:
        raise ConfigError("--model is required")
    return WorkerConfig(
        bootstrap_servers=config.bootstrap_servers,
        input_topic=config.source_topic,
        output_topic=config.output_topic,
        dlq_topic=config.dlq_topic,
        group_id=BACKFILL_GROUP_PREFIX + backfill_id,
        model=config.model,
        device=config.device,
        max_batch_size=config.max_batch_size,
        max_batch_delay_ms=config.max_batch_delay_ms,
        guarantee=config.guarantee,
        transactional_id=f"{BACKFILL_GROUP_PREFIX}{backfill_id}",
        on_incomplete=config.on_incomplete,
        # At the range's end every pending event is flushed; this (wall-clock) timeout
        # only bounds what an event missing parts mid-range holds before that.
        assembly_timeout_ms=600_000,
        client_id="mmstream-replay",
        log_level=config.log_level,
        log_format=config.log_format,
        **config.security_settings(),
    )


def resolve(config: ReplayConfig, consumer: KafkaConsumer) -> list[PartitionRange]:
    start, end = config.window()
    return resolve_ranges(
        consumer,
        config.source_topic,
        from_ms=start,
        to_ms=end,
        offsets=config.offsets(),
        margin_ms=config.edge_margin_ms if (start is not None or end is not None) else 0,
    )


def _plan(config: ReplayConfig, backfill_id: str, ranges: list[PartitionRange]) -> dict[str, Any]:
    start, end = config.window()
    group = BACKFILL_GROUP_PREFIX + backfill_id
    checkpoint = KafkaConsumer(
        bootstrap_servers=config.bootstrap_servers.split(","),
        group_id=group,
        enable_auto_commit=False,
        **config.kafka_security(),
    )
    try:  # reads the checkpoint; joins nothing, commits nothing
        saved = {
            r.partition: committed(checkpoint, (config.source_topic, r.partition))[0]
            for r in ranges
        }
    finally:
        checkpoint.close(autocommit=False)
    return {
        "backfill_id": backfill_id,
        "group": group,
        "source_topic": config.source_topic,
        "output_topic": config.output_topic,
        "dlq_topic": config.dlq_topic,
        "window": {
            "from": format_time(start) if start is not None else None,
            "to": format_time(end) if end is not None else None,
            "edge_margin_ms": config.edge_margin_ms if (start, end) != (None, None) else 0,
        },
        "partitions": [
            {
                "partition": r.partition,
                "start": r.start,
                "end": r.end,
                "records": r.count,
                "checkpoint": saved.get(r.partition),
            }
            for r in ranges
        ],
        "records": sum(r.count for r in ranges),
    }


def run_replay(config: ReplayConfig, stop: threading.Event | None = None) -> dict[str, Any]:
    """Resolve the range, then predict it (or, with ``dry_run``, only say what it would read)."""
    if config.source_file is not None:
        from worker.backfill.archive import restore_file

        if config.to_topic:
            restored: dict[str, Any] = restore_file(
                config.source_file,
                config.bootstrap_servers,
                config.to_topic,
                rate=config.rate,
                security=config.kafka_security(),
            )
            return restored
        return _score_archive(config, stop)
    if config.model is None:
        raise ConfigError("--model is required")
    from worker.contract.manifest import load_manifest

    manifest = load_manifest(config.model, verify=False)
    backfill_id = config.backfill_id or config.default_backfill_id(manifest.sha256)
    consumer = KafkaConsumer(
        bootstrap_servers=config.bootstrap_servers.split(","),
        group_id=None,
        # Exactly-once reads stop at the last stable offset: resolve the ends the same way.
        isolation_level=(
            "read_committed" if config.guarantee == "exactly-once" else "read_uncommitted"
        ),
        **config.kafka_security(),
    )
    try:
        ranges = resolve(config, consumer)
        plan = _plan(config, backfill_id, ranges)
        partitions = len(consumer.partitions_for_topic(config.source_topic) or ())
    finally:
        consumer.close()
    if config.dry_run:
        plan["dry_run"] = True
        return plan
    ensure_topics(
        config.bootstrap_servers,
        {config.output_topic: partitions, config.dlq_topic: partitions},
        security=config.kafka_security(),
    )
    runner = ModelRunner.load(config.model, config.device, max_batch_size=config.max_batch_size)
    parts_per_event = max(1, len(manifest.inputs))
    worker = ReplayWorker(
        _worker_config(config, backfill_id),
        runner,
        ranges,
        config.window(),
        restart=config.restart,
        rate=config.rate,
        progress=Progress(plan["records"], config.progress, parts_per_event),
    )
    log.info(
        "replay %s: %s -> %s, %d records in %d partitions (about %d events)%s",
        backfill_id,
        config.source_topic,
        config.output_topic,
        plan["records"],
        len(ranges),
        plan["records"] // parts_per_event,
        f", at most {config.rate:g} events/s" if config.rate else "",
    )
    started = time.monotonic()
    stats = worker.run(stop or threading.Event())
    seconds = time.monotonic() - started
    unsaved = {tp: pos for tp, (pos, _m) in worker.tracker.committable().items()}
    if unsaved:
        raise BrokerError(
            f"replay {backfill_id}: the last checkpoint {unsaved} was not committed; run the "
            "same command again to continue from the one before"
        )
    if worker.progress is not None:
        worker.progress.update(stats.consumed, stats.predicted, final=True)
    return summarize(plan, stats, worker.counters, seconds, config)


def summarize(
    plan: dict[str, Any],
    stats: WorkerStats,
    counters: ReplayCounters,
    seconds: float,
    config: ReplayConfig,
) -> dict[str, Any]:
    incomplete_action = config.on_incomplete
    return {
        **{k: plan[k] for k in ("backfill_id", "source_topic", "output_topic", "window")},
        "partitions": [
            {**p, "resumed_from": counters.resumed_from.get(p["partition"])}
            for p in plan["partitions"]
        ],
        "records_in_range": plan["records"],
        "records_read": stats.consumed,
        "events_predicted": stats.predicted,
        "outside_window": counters.outside_window,
        "incomplete_in_window": {incomplete_action: counters.incomplete_in_window},
        "dead_lettered": dict(stats.dead_lettered),
        "duplicate_parts": stats.duplicate_parts,
        "resumed": bool(counters.resumed_from),
        "skipped_finished_records": stats.skipped_finished,
        "guarantee": config.guarantee,
        "seconds": round(seconds, 3),
        "events_per_s": round(stats.predicted / max(seconds, 1e-3), 1),
        "provider": stats.provider,
    }


def _score_archive(config: ReplayConfig, stop: threading.Event | None) -> dict[str, Any]:
    """An archive, scored: restored once to a staging topic, replayed whole, cleaned up."""
    from worker.backfill.archive import iter_archive, restore_file
    from worker.contract.manifest import load_manifest

    if config.model is None or config.source_file is None:
        raise ConfigError("--source-file scoring needs --model")
    manifest = load_manifest(config.model, verify=False)
    backfill_id = config.backfill_id or config.default_backfill_id(manifest.sha256)
    staging = f"mmstream-staging-{backfill_id}"
    records, partitions = 0, 0
    for _lineno, rec in iter_archive(config.source_file):  # validates every line first
        records += 1
        partitions = max(partitions, rec.partition + 1)
    if config.dry_run:
        return {
            "dry_run": True,
            "backfill_id": backfill_id,
            "source_file": str(config.source_file),
            "records": records,
            "staging_topic": staging,
            "output_topic": config.output_topic,
        }
    security = config.kafka_security()
    # Archived records keep their old timestamps: time retention would delete them at once.
    ensure_topics(
        config.bootstrap_servers,
        {staging: max(1, partitions)},
        configs={"retention.ms": "-1", "retention.bytes": "-1"},
        security=security,
    )
    staged = count_records(config.bootstrap_servers, staging, security)
    fresh = staged == 0
    if fresh:
        restore_file(
            config.source_file, config.bootstrap_servers, staging, rate=0, security=security
        )
    elif staged != records:
        raise ConfigError(
            f"staging topic {staging} holds {staged} records, the archive {records}: delete "
            "the topic (or give another --backfill-id) to start over"
        )
    else:
        log.info("replay: %s already holds the archive's %d records", staging, records)
    scored = run_replay(
        dataclasses.replace(
            config,
            source_file=None,
            source_topic=staging,
            ranges=tuple(f"{p}:0-" for p in range(max(1, partitions))),
            backfill_id=backfill_id,
            # A freshly restored staging topic: any checkpoint is of an earlier one.
            restart=config.restart or fresh,
            sasl_password_file=None,
        ),
        stop,
    )
    if stop is None or not stop.is_set():
        delete_topics(config.bootstrap_servers, [staging], security)
    return {**scored, "source_file": str(config.source_file), "staging_topic": staging}
