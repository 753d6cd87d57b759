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
(:func:`worker.backfill.archive_copy.restore_file`) and nothing is scored; with ``--model``
they are scored: restored once into a staging topic
``mmstream-staging-<backfill id>`` (same partitions and order; kept by a killed
run, so a re-run continues instead of restoring again), replayed whole as
above, and the staging topic is deleted once every event is done.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker.backfill.progress import Progress
from worker.backfill.ranges import PartitionRange, RangeSettings, format_time, resolve_ranges
from worker.backfill.source import RangeSource
from worker.config import (
    FrozenConfig,
    KafkaSecurity,
    WorkerConfig,
    compression_setting,
    setting,
    setting_from,
)
from worker.contract.errors import BrokerError, ConfigError
from worker.contract.records import Event
from worker.core.admission import Admission, Paced, StageRoom
from worker.core.filters import TimeWindow
from worker.core.pacing import Pacer
from worker.core.pipeline import Clock, Worker, WorkerStats, wall_ms
from worker.core.sensors import Sensor
from worker.core.stage import BatchStage
from worker.edge.choice import clients_for
from worker.edge.client import Clients, Consumer, Inspector
from worker.edge.kafka_python.admin import count_records, delete_topics, ensure_topics
from worker.inference.model import ModelRunner

log = logging.getLogger(__name__)

BACKFILL_GROUP_PREFIX = "mmstream-backfill-"


@dataclass(frozen=True)
class ReplayConfig(KafkaSecurity, RangeSettings, FrozenConfig):
    """Settings of ``mmstream replay``; see ``mmstream replay --help``."""

    bootstrap_servers: str = setting(help="Kafka bootstrap servers")
    source_topic: str = setting("", help="topic of the parts to re-score")
    model: Path | None = setting(None, help="model directory to score with")
    from_time: str = setting_from(
        RangeSettings,
        "from_time",
        help="start of the window, ISO-8601 (e.g. 2026-11-28T00:00:00Z; no zone = UTC); "
        "events whose newest part is at or after it",
    )
    to_time: str = setting_from(
        RangeSettings, "to_time", help="end of the window, ISO-8601, exclusive"
    )
    output_topic: str = setting("", help="where predictions go (default: <source>.backfill)")
    dlq_topic: str = setting("", help="dead letters (default: <output-topic>.dlq)")
    backfill_id: str = setting(
        "",
        help="checkpoint name (group mmstream-backfill-<id>); default: derived from the "
        "source, range, output and model, so re-running the same command resumes",
    )
    restart: bool = setting(False, help="ignore the checkpoint and start over")
    rate: float = setting(0.0, help="at most this many events/s (0 = no limit)")
    edge_margin_ms: int = setting(
        60_000,
        help="read this much beyond both window edges, so events straddling an edge are whole",
    )
    assembly_timeout_ms: int = setting_from(
        WorkerConfig,
        "assembly_timeout_ms",
        help="as the worker's (stream time, so a replay decides as the live run did); "
        "at the range's end every event still pending is handled by --on-incomplete",
    )
    on_incomplete: str = setting_from(
        WorkerConfig,
        "on_incomplete",
        help="events of the window still missing parts at the range's end",
    )
    guarantee: str = setting_from(
        WorkerConfig,
        "guarantee",
        help="exactly-once: outputs and checkpoints in transactions (no repeats after a crash)",
    )
    max_batch_size: int = setting_from(WorkerConfig, "max_batch_size")
    max_batch_delay_ms: int = setting_from(
        WorkerConfig, "max_batch_delay_ms", help="partial batch delay"
    )
    device: str = setting_from(WorkerConfig, "device", help="ONNX Runtime device")
    dry_run: bool = setting(
        False,
        help="print the ranges (per partition: offsets, records, checkpoint); change nothing",
    )
    progress: str = setting(
        "auto",
        choices=("auto", "bar", "log", "none"),
        help="a progress bar on a terminal, else a log line every 10 s",
    )
    source_file: Path | None = setting(
        None,
        help="an archive (mmstream archive, JSON Lines): restored to --to-topic, or, with "
        "--model and --output-topic, scored whole (through a staging topic)",
    )
    to_topic: str = setting("", help="with --source-file: restore the archive to this topic")
    log_level: str = setting_from(WorkerConfig, "log_level")
    log_format: str = setting_from(WorkerConfig, "log_format", help="log lines")
    compression_type: str = compression_setting(
        "what replay writes (predictions, dead letters, a restored archive)"
    )

    def __post_init__(self) -> None:
        super().__post_init__()  # every setting's choices
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


def replay_worker(
    config: WorkerConfig,
    runner: ModelRunner,
    ranges: list[PartitionRange],
    window: tuple[int | None, int | None],
    *,
    restart: bool = False,
    rate: float = 0.0,
    progress: Progress | None = None,
    clients: Clients,
    clock: Clock = wall_ms,
) -> tuple[Worker, RangeSource]:
    """The worker with a replay's parts: the range source (checkpointed in the backfill's
    group), the window rule, and (``rate`` > 0) admission paced at ``rate`` events/s in
    bursts of one batch. Nothing of the loop is overridden."""
    holder: list[RangeSource] = []

    def source(consumer: Consumer) -> RangeSource:
        holder.append(RangeSource(consumer, config.input_topic, ranges, restart=restart))
        return holder[0]

    def admission(stage: BatchStage[Event]) -> Admission:
        room = StageRoom(stage)
        if rate <= 0:
            return room
        return Paced(room, Pacer(rate, config.max_batch_size, lambda: clock() / 1000.0))

    sensors: list[Sensor] = []
    if progress is not None:
        progress.done_before = lambda: holder[0].records_before_checkpoint if holder else 0
        sensors.append(progress)
    worker = Worker(
        config,
        runner,
        clock,
        clients=clients,
        source=source,
        events=TimeWindow(*window),
        admission=admission,
        sensors=sensors,
    )
    return worker, holder[0]


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
        assembly_timeout_ms=config.assembly_timeout_ms,
        client_id="mmstream-replay",
        log_level=config.log_level,
        log_format=config.log_format,
        compression_type=config.compression_type,
        **config.security_settings(),
    )


def resolve(config: ReplayConfig, inspector: Inspector) -> list[PartitionRange]:
    start, end = config.window()
    return resolve_ranges(
        inspector,
        config.source_topic,
        from_ms=start,
        to_ms=end,
        offsets=config.offsets(),
        margin_ms=config.edge_margin_ms if (start is not None or end is not None) else 0,
    )


def _plan(
    config: ReplayConfig,
    backfill_id: str,
    ranges: list[PartitionRange],
    inspector: Inspector,
) -> dict[str, Any]:
    start, end = config.window()
    group = BACKFILL_GROUP_PREFIX + backfill_id
    saved = inspector.committed(group, config.source_topic, [r.partition for r in ranges])
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


def run_replay(
    config: ReplayConfig,
    stop: threading.Event | None = None,
    clients: Clients | None = None,
) -> dict[str, Any]:
    """Resolve the range, then predict it (or, with ``dry_run``, only say what it would read).

    ``clients``: the Kafka client factory (default: ``--kafka-client``'s)."""
    if clients is None:
        clients = clients_for(config.kafka_client)
    if config.source_file is not None:
        return _replay_archive(config, config.source_file, stop, clients)
    if config.model is None:
        raise ConfigError("--model is required")
    from worker.contract.manifest import load_manifest

    manifest = load_manifest(config.model, verify=False)
    backfill_id = config.backfill_id or config.default_backfill_id(manifest.sha256)
    ranges, plan, partitions = _resolve_plan(config, backfill_id, clients)
    if config.dry_run:
        plan["dry_run"] = True
        return plan
    ensure_topics(
        config.bootstrap_servers,
        {config.output_topic: partitions, config.dlq_topic: partitions},
        security=config.kafka_security(),
    )
    runner = ModelRunner.load(config.model, config.device, max_batch_size=config.max_batch_size)
    parts_per_event = max(1, len(manifest.parts))
    return _predict(config, backfill_id, runner, ranges, plan, parts_per_event, stop, clients)


def _replay_archive(
    config: ReplayConfig, source_file: Path, stop: threading.Event | None, clients: Clients
) -> dict[str, Any]:
    """``--source-file``: restored to ``--to-topic``, or (with ``--model``) scored."""
    from worker.backfill.archive_copy import restore_file

    if config.to_topic:
        restored: dict[str, Any] = restore_file(
            source_file,
            config.bootstrap_servers,
            config.to_topic,
            rate=config.rate,
            security=config,
            compression_type=config.compression_type,
        )
        return restored
    return _score_archive(config, stop, clients)


def _resolve_plan(
    config: ReplayConfig, backfill_id: str, clients: Clients
) -> tuple[list[PartitionRange], dict[str, Any], int]:
    """The ranges to read, the plan (what a dry run prints) and the source's partition count."""
    # Exactly-once reads stop at the last stable offset: resolve the ends the same way.
    inspector = clients.inspector(
        config.bootstrap_servers, config, read_committed=config.guarantee == "exactly-once"
    )
    try:
        ranges = resolve(config, inspector)
        plan = _plan(config, backfill_id, ranges, inspector)
        partitions = len(inspector.partitions(config.source_topic))
    finally:
        inspector.close()
    return ranges, plan, partitions


def _predict(
    config: ReplayConfig,
    backfill_id: str,
    runner: ModelRunner,
    ranges: list[PartitionRange],
    plan: dict[str, Any],
    parts_per_event: int,
    stop: threading.Event | None,
    clients: Clients,
) -> dict[str, Any]:
    """Run the replay worker over ``ranges`` to their ends; the summary."""
    progress = Progress(plan["records"], config.progress, parts_per_event)
    worker, source = replay_worker(
        _worker_config(config, backfill_id),
        runner,
        ranges,
        config.window(),
        restart=config.restart,
        rate=config.rate,
        progress=progress,
        clients=clients,
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
    unsaved = worker.checkpoint.unsaved()
    if unsaved:
        raise BrokerError(
            f"replay {backfill_id}: the last checkpoint {unsaved} was not committed; run the "
            "same command again to continue from the one before"
        )
    progress.update(final=True)
    return summarize(plan, stats, source.resumed_from, seconds, config)


def summarize(
    plan: dict[str, Any],
    stats: WorkerStats,
    resumed_from: dict[int, int],
    seconds: float,
    config: ReplayConfig,
) -> dict[str, Any]:
    incomplete_action = config.on_incomplete
    return {
        **{k: plan[k] for k in ("backfill_id", "source_topic", "output_topic", "window")},
        "partitions": [
            {**p, "resumed_from": resumed_from.get(p["partition"])} for p in plan["partitions"]
        ],
        "records_in_range": plan["records"],
        "records_read": stats.consumed,
        "events_predicted": stats.predicted,
        "outside_window": stats.outside_window,
        "incomplete_in_window": {incomplete_action: stats.incomplete},
        "dead_lettered": dict(stats.dead_lettered),
        "duplicate_parts": stats.duplicate_parts,
        "resumed": bool(resumed_from),
        "skipped_finished_records": stats.skipped_finished,
        "guarantee": config.guarantee,
        "seconds": round(seconds, 3),
        "events_per_s": round(stats.predicted / max(seconds, 1e-3), 1),
        "provider": stats.provider,
    }


def _score_archive(
    config: ReplayConfig, stop: threading.Event | None, clients: Clients
) -> dict[str, Any]:
    """An archive, scored: restored once to a staging topic, replayed whole, cleaned up."""
    from worker.backfill.archive_format import iter_archive
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
    fresh = _stage_archive(config, config.source_file, staging, records, partitions, security)
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
        clients,
    )
    if stop is None or not stop.is_set():
        delete_topics(config.bootstrap_servers, [staging], security)
    return {**scored, "source_file": str(config.source_file), "staging_topic": staging}


def _stage_archive(
    config: ReplayConfig,
    source_file: Path,
    staging: str,
    records: int,
    partitions: int,
    security: dict[str, Any],
) -> bool:
    """Restore the archive to the ``staging`` topic unless a killed run already did;
    whether it was restored now (so no checkpoint of the backfill's applies)."""
    from worker.backfill.archive_copy import restore_file

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
        restore_file(source_file, config.bootstrap_servers, staging, rate=0, security=config)
    elif staged != records:
        raise ConfigError(
            f"staging topic {staging} holds {staged} records, the archive {records}: delete "
            "the topic (or give another --backfill-id) to start over"
        )
    else:
        log.info("replay: %s already holds the archive's %d records", staging, records)
    return fresh
