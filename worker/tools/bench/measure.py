"""The measurements of ``mmstream bench``: raw ORT, raw consume, the naive baseline, the
worker end to end and under open-loop load (and the profile); each returns a result
of :mod:`worker.tools.bench.results`."""

from __future__ import annotations

import cProfile
import dataclasses
import io
import json
import os
import platform
import pstats
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import numpy as np

from worker.contract.manifest import Manifest
from worker.contract.records import (
    CONTENT_NPY,
    HEADER_CONTENT_TYPE,
    HEADER_MODALITY,
    RawRecord,
    SourceRef,
)
from worker.core.decode import Limits, decode_record
from worker.core.pipeline import Worker, WorkerStats
from worker.edge.choice import clients_for
from worker.edge.kafka_python.admin import count_records
from worker.inference.model import ModelRunner
from worker.inference.rawort import bench_ort
from worker.tools.bench.baseline import client_versions, naive_loop, timed_read_for
from worker.tools.bench.config import BenchConfig
from worker.tools.bench.processes import (
    Preds,
    WorkerProcesses,
    WorkerThread,
    run_open_loop_producer,
    worker_config,
)
from worker.tools.bench.results import (
    ConsumeResult,
    EndToEndResult,
    LatencyStages,
    Machine,
    ModelInfo,
    ModelInput,
    NaiveResult,
    OpenLoopResult,
    OrtPoint,
    RunResult,
    percentiles,
)

R = TypeVar("R", bound=RunResult)

NAIVE_GUARANTEES = (
    "none: no dead letters, no bounds, commits every second whatever is acknowledged, "
    "no rebalance handling"
)
E2E_LATENCY_NOTE = (
    "prediction record timestamp - newest part's record timestamp (both broker append "
    "times: the topics use LogAppendTime); every part was written before the worker "
    "started, so this is mostly time spent queued"
)
OPEN_LOOP_LATENCY_NOTE = (
    "prediction record timestamp - newest part's record timestamp (both broker append "
    "times: the topics use LogAppendTime), parts produced at target_rate by a separate "
    "process while the worker ran"
)


def machine_info() -> Machine:
    import onnxruntime as ort

    versions = client_versions()
    return Machine(
        date=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        cpu_count=os.cpu_count() or 0,
        platform=platform.platform(),
        processor=platform.processor() or platform.machine(),
        python=platform.python_version(),
        onnxruntime=ort.__version__,
        ort_device=ort.get_device(),
        kafka_python=versions["kafka_python"],
        confluent_kafka=versions["confluent_kafka"],
        numpy=np.__version__,
    )


def model_info(runner: ModelRunner) -> ModelInfo:
    m = runner.manifest
    return ModelInfo(
        name=m.name,
        version=m.version,
        sha256=m.sha256,
        inputs={i.name: ModelInput(dtype=i.dtype, shape=tuple(i.shape)) for i in m.inputs},
        provider=runner.info.provider,
        providers=tuple(runner.info.providers),
    )


def raw_ort(config: BenchConfig, runner: ModelRunner) -> tuple[OrtPoint, ...]:
    """(1) ``session.run`` alone at each batch size (:func:`bench_ort`)."""
    points = bench_ort(runner, config.batch_size_list(), config.seconds_per_ort_point, config.seed)
    return tuple(OrtPoint.from_dict(p) for p in points)


def bench_consume(
    bootstrap_servers: str,
    topic: str,
    parts: int,
    parts_per_event: int,
    timeout_s: float,
    kafka_client: str = "kafka-python",
) -> ConsumeResult:
    """A plain consumer of ``kafka_client`` (no group) reading ``parts`` records from the
    beginning (:func:`worker.tools.bench.baseline.timed_read_for`: connecting is not timed)."""
    read = timed_read_for(kafka_client)(bootstrap_servers, topic, parts, timeout_s)
    count, nbytes, elapsed = read
    return ConsumeResult(
        kafka_client=kafka_client,
        parts=count,
        events=count // parts_per_event,
        megabytes=nbytes / 1e6,
        seconds=elapsed,
        parts_per_s=count / elapsed,
        events_per_s=count / parts_per_event / elapsed,
        mb_per_s=nbytes / 1e6 / elapsed,
    )


def _naive_decoder(manifest: Manifest, topic_in: str) -> Callable[[str, str, bytes], Any]:
    """Decodes a part as a user would: ``np.load`` for a one-input npy part, else the
    worker's own decoding."""
    limits = Limits()

    def decode(modality: str, content_type: str, value: bytes) -> Any:
        part = manifest.part(modality)
        if content_type == CONTENT_NPY and part is not None and len(part.fills) == 1:
            return {part.input_names[0]: np.load(io.BytesIO(value))}
        headers = (
            (HEADER_MODALITY, modality.encode()),
            (HEADER_CONTENT_TYPE, content_type.encode()),
        )
        record = RawRecord(SourceRef(topic_in, 0, 0, 0), b"k", value, headers)
        return decode_record(record, manifest, limits).tensors

    return decode


def _naive_scorer(runner: ModelRunner) -> Callable[[list[str], dict[str, list[Any]]], list[bytes]]:
    """Runs a batch and writes each event's top label as JSON."""
    manifest = runner.manifest
    names = runner.output_names
    label_at = names.index(manifest.label_output) if manifest.label_output in names else 0

    def score(ids: list[str], feeds: dict[str, list[Any]]) -> list[bytes]:
        # ``feeds`` maps a part to each event's tensors of that part (input name -> array).
        stacked = {i: np.stack([t[i] for t in rows]) for rows in feeds.values() for i in rows[0]}
        probs = runner.run(stacked)[label_at]
        out = []
        for i, event_id in enumerate(ids):
            top = int(np.argmax(probs[i]))
            label = manifest.labels[top] if top < len(manifest.labels) else str(top)
            doc = {"event_id": event_id, "label": label, "score": float(probs[i][top])}
            out.append(json.dumps(doc).encode())
        return out

    return score


def bench_naive(
    config: BenchConfig, runner: ModelRunner, topic_in: str, topic_out: str, parts: int
) -> NaiveResult:
    """What a user would write instead (:mod:`worker.tools.bench.baseline`: no guarantees) on the
    pre-produced topic, with the worker's client, model and batch size: events/s from
    its first record read to its last prediction acknowledged."""
    result = naive_loop(
        config.kafka_client,
        config.bootstrap_servers,
        topic_in,
        topic_out,
        f"mm-bench-naive-{uuid.uuid4().hex[:8]}",
        list(runner.manifest.part_names),
        _naive_decoder(runner.manifest, topic_in),
        _naive_scorer(runner),
        config.events,
        batch_size=config.max_batch_size,
        timeout_s=config.timeout_s,
    )
    return NaiveResult(
        kafka_client=config.kafka_client,
        events=result.events,
        parts=parts,
        dropped_parts=result.dropped_parts,
        seconds=result.seconds,
        events_per_s=result.events / result.seconds,
        batch_size=config.max_batch_size,
        guarantees=NAIVE_GUARANTEES,
    )


def _first_per_event(preds: Preds) -> Preds:
    """The first prediction (value, record timestamp) of each event, in reading order."""
    first: dict[str, tuple[dict[str, Any], int]] = {}
    for value, ts in preds:
        first.setdefault(value["event_id"], (value, ts))
    return list(first.values())


def _latency_stages(first: Preds) -> LatencyStages:
    """Where each event's latency went, from the prediction's own timing (p50/p95/p99 ms):
    last part in Kafka -> event assembled in the worker (fetch, decode, assembly);
    assembled -> batch inferred (batch delay, queue, ORT); inferred -> prediction in Kafka
    (JSON, send, linger). Worker-clock and broker-clock stamps: one machine here."""
    rows = [(v["timing"], ts) for v, ts in first]
    return LatencyStages(
        to_assembled=percentiles([t["completed_ms"] - t["last_part_ms"] for t, _ in rows]),
        to_inferred=percentiles([t["inferred_ms"] - t["completed_ms"] for t, _ in rows]),
        to_written=percentiles([ts - t["inferred_ms"] for t, ts in rows]),
    )


def _run_result(
    config: BenchConfig, preds: Preds, topic_out: str, note: str
) -> tuple[RunResult, Preds]:
    """One worker run of ``config.events`` events, from its output topic alone.

    Throughput: first event assembled -> last prediction written (the worker's clock
    stamps ``completed_ms``; the record timestamp is the broker's append time). Batches:
    each prediction carries its batch's size. Latency per event: its first prediction's
    record timestamp - the newest part's record timestamp. Also returns each event's
    first prediction."""
    first = _first_per_event(preds)
    start = min((v["timing"]["completed_ms"] for v, _ in first), default=0)
    last = max((ts for _, ts in first), default=0)
    seconds = max(1, last - start) / 1000.0
    batches = sum(1.0 / max(1, v["timing"]["batch_size"]) for v, _ in first)
    lat = [float(ts - v["timing"]["last_part_ms"]) for v, ts in first]
    result = RunResult(
        events=config.events,
        predicted=len(first),
        duplicates=len(preds) - len(first),
        dead_lettered=count_records(config.bootstrap_servers, f"{topic_out}.dlq"),
        batches=round(batches),
        mean_batch_size=len(first) / max(1.0, batches),
        seconds=seconds,
        events_per_s=len(first) / seconds,
        processes=config.processes,
        latency_ms=percentiles(lat),
        latency_note=note,
        latencies=tuple(lat),
    )
    return result, first


def _extend(cls: type[R], run: RunResult, **extra: Any) -> R:
    """``run`` as its subclass ``cls``, with the subclass's own fields."""
    shallow = {f.name: getattr(run, f.name) for f in dataclasses.fields(run)}
    return cls(**shallow, **extra)


def bench_end_to_end(
    config: BenchConfig, run: str, topic_in: str, topic_out: str
) -> EndToEndResult:
    """(3) The worker process(es) on the pre-produced topic until every event is predicted."""
    with WorkerProcesses(config, run, topic_in, topic_out) as w:
        preds = w.collect(topic_out, config.events)
        rss = w.rss_peaks()
    result, _first = _run_result(config, preds, topic_out, E2E_LATENCY_NOTE)
    return _extend(EndToEndResult, result, rss_mb=rss)


def bench_open_loop(
    config: BenchConfig, run: str, rate: float, topics: tuple[str, str]
) -> OpenLoopResult:
    """(4) Worker process(es) ready; a separate producer process at ``rate`` events/s."""
    topic_in, topic_out = topics
    with WorkerProcesses(config, f"{run}-open", topic_in, topic_out) as w:
        w.wait_ready(120)
        produced = run_open_loop_producer(config, topic_in, rate)
        preds = w.collect(topic_out, config.events)
    result, first = _run_result(config, preds, topic_out, OPEN_LOOP_LATENCY_NOTE)
    return _extend(
        OpenLoopResult,
        result,
        latency_stages_ms=_latency_stages(first),
        target_rate=rate,
        produced_rate=config.events / max(1e-3, produced["ms"] / 1000.0),
    )


def _stats_summary(stats: WorkerStats, n: int) -> dict[str, Any]:
    """The in-process worker's own counts, for the profile's header line."""
    span_ms = max(1, (stats.last_acked_ms or 0) - (stats.first_consumed_ms or 0))
    return {
        "events": n,
        "predicted": stats.predicted,
        "dead_lettered": sum(stats.dead_lettered.values()),
        "batches": stats.batches,
        "mean_batch_size": stats.predicted / max(1, stats.batches),
        "seconds": span_ms / 1000.0,
        "events_per_s": stats.predicted / (span_ms / 1000.0),
        "provider": stats.provider,
    }


def profile_end_to_end(
    config: BenchConfig, runner: ModelRunner, topic_in: str, topic_out: str, top: int = 25
) -> str:
    """The pre-produced run again under cProfile (the worker thread only); pstats text."""
    worker = Worker(
        worker_config(config, "prof", topic_in, topic_out, config.events),
        runner,
        clients=clients_for(config.kafka_client),
    )
    prof = cProfile.Profile()
    wt = WorkerThread(worker, prof)
    wt.start()
    stats = wt.join(config.timeout_s)
    buf = io.StringIO()
    buf.write(f"# worker loop under cProfile: {_stats_summary(stats, config.events)}\n")
    pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(top)
    return buf.getvalue()
