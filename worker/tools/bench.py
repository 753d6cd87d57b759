"""``mmstream bench``: how fast is the worker, next to what bounds it and what a user
would write instead?

In one run on one machine it measures:

1. **raw ORT**: ``session.run`` alone on real (preprocessed) tensors of the
   model, at several batch sizes, on the chosen device (events/s per batch size,
   median of three timed repeats after a warm-up);
2. **raw consume**: a plain consumer of each installed client (no group) reading every
   part of the benchmark's pre-produced topic (parts/s, events/s, MB/s), and the
   **naive baseline** (:mod:`worker.edge.baseline`): the minimal consume -> group by
   key -> ORT -> JSON -> produce loop a user would write instead, with none of the
   worker's guarantees, on the worker's client, model and batch size;
3. **end to end**: the real :class:`~worker.core.pipeline.Worker` (on a thread, a
   fresh group) on that pre-produced topic: events/s from the first record
   consumed to the last prediction acknowledged, and the latency of each
   prediction (its record timestamp minus the newest part's record timestamp;
   here the parts were all written *before* the worker started, so that
   latency is mostly queueing);
4. **open loop**: a fresh topic, the worker running, events produced by a
   separate process at ``open_loop_fraction`` of the measured end-to-end rate:
   latency p50/p95/p99 under that load.

It writes ``bench.json``, ``bench.md`` (tables) and ``bench.png`` (throughput vs
batch size with the raw-ORT line; latency distributions; every measurement side by
side) to ``out`` and returns the report; :func:`format_summary` is what the CLI
prints, with the ratios of end to end to raw ORT, to each client's raw consume and to
the naive baseline. A benchmark reports numbers; it never judges them.
"""

from __future__ import annotations

import contextlib
import cProfile
import io
import json
import logging
import os
import platform
import pstats
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from worker.config import (
    CONTENTS,
    KAFKA_CLIENTS,
    FrozenConfig,
    WorkerConfig,
    setting,
    setting_from,
)
from worker.contract.errors import BrokerError, ConfigError, MMStreamError
from worker.contract.records import (
    CONTENT_NPY,
    HEADER_CONTENT_TYPE,
    HEADER_MODALITY,
    RawRecord,
    SourceRef,
)
from worker.core.decode import Limits, decode_record
from worker.core.pipeline import Worker, WorkerStats
from worker.edge.baseline import naive_loop
from worker.edge.client import client_versions, clients_for, timed_read_for
from worker.edge.kafka_io import count_records, delete_topics, ensure_topics
from worker.inference.model import ModelRunner
from worker.inference.rawort import bench_ort
from worker.tools.demo import read_predictions
from worker.tools.produce import ProduceConfig, produce

log = logging.getLogger(__name__)

LOG_APPEND_TIME = {"message.timestamp.type": "LogAppendTime"}


@dataclass(frozen=True)
class BenchConfig(FrozenConfig):
    """Settings of ``mmstream bench``; see ``mmstream bench --help``."""

    bootstrap_servers: str = setting(help="Kafka bootstrap servers")
    model: Path = setting(help="model directory")
    out: Path = setting(Path(".cache/bench"), help="writes bench.{json,md,png} here")
    events: int = setting(3000, help="events per worker run")
    batch_sizes: str = setting(
        "1,8,32,128",
        help="raw-ORT batch sizes, comma-separated (--max-batch-size is always added)",
    )
    content: str = setting("npy", choices=CONTENTS, help="part encoding")
    media: str = setting_from(
        ProduceConfig,
        "media",
        help="what the parts hold: the reference task's digits, or random media made by each "
        "part's transform (any model)",
    )
    image_type: str = setting_from(
        ProduceConfig, "image_type", help="how raw images are encoded (--content raw)"
    )
    audio_type: str = setting_from(
        ProduceConfig, "audio_type", help="how raw audio is encoded (--content raw)"
    )
    device: str = setting_from(WorkerConfig, "device", help="ORT device")
    partitions: int = setting(3, help="partitions of the bench topics")
    open_loop_fraction: float = setting(
        0.5, help="open-loop rate as a share of the measured end-to-end events/s"
    )
    seconds_per_ort_point: float = setting(2.0, help="time spent per raw-ORT batch size")
    max_batch_size: int = setting_from(
        WorkerConfig, "max_batch_size", help="the worker's max batch size"
    )
    max_batch_delay_ms: int = setting_from(
        WorkerConfig, "max_batch_delay_ms", help="the worker's max batch delay"
    )
    inference_queue: int = setting_from(
        WorkerConfig,
        "inference_queue",
        help="the worker's --inference-queue (-1 = auto, 0 = infer on the poll thread)",
    )
    processes: int = setting_from(
        WorkerConfig,
        "processes",
        help="worker processes in the end-to-end and open-loop runs (mmstream worker "
        "--processes N; at most --partitions)",
    )
    kafka_client: str = setting_from(
        WorkerConfig, "kafka_client", help="the worker's Kafka client (raw consume runs both)"
    )
    seed: int = setting(11, help="random seed of the produced events")
    timeout_s: float = setting(600.0, help="give up a run after this long")
    profile: bool = setting(
        False, help="also run the pre-produced run under cProfile (writes profile.txt)"
    )
    keep_topics: bool = setting(False, help="keep the bench topics (default: deleted)")

    def __post_init__(self) -> None:
        super().__post_init__()  # every setting's choices
        object.__setattr__(self, "model", Path(self.model))
        object.__setattr__(self, "out", Path(self.out))
        if self.events <= 0 or self.partitions <= 0 or self.max_batch_size <= 0:
            raise ConfigError("--events, --partitions and --max-batch-size must be > 0")
        if not 0 < self.processes <= self.partitions:
            raise ConfigError("--processes must be within 1..--partitions (one partition each)")
        if self.inference_queue < -1:
            raise ConfigError("--inference-queue must be -1 (auto) or >= 0")
        if self.max_batch_delay_ms < 0:
            raise ConfigError("--max-batch-delay-ms must be >= 0")
        if not 0.0 < self.open_loop_fraction <= 1.0:
            raise ConfigError("--open-loop-fraction must be within (0, 1]")
        if self.seconds_per_ort_point <= 0 or self.timeout_s <= 0:
            raise ConfigError("--seconds-per-ort-point and --timeout-s must be > 0")
        if self.media == "files":
            raise ConfigError("--media: the bench makes its events (reference or random)")
        self.batch_size_list()  # validates

    def batch_size_list(self) -> list[int]:
        """The raw-ORT batch sizes, sorted, always including ``max_batch_size``."""
        try:
            sizes = {int(s) for s in self.batch_sizes.split(",") if s.strip()}
        except ValueError as exc:
            raise ConfigError(
                f"--batch-sizes must be a comma list of integers: {self.batch_sizes!r}"
            ) from exc
        if not sizes or min(sizes) <= 0:
            raise ConfigError(f"--batch-sizes must be positive integers: {self.batch_sizes!r}")
        return sorted(sizes | {self.max_batch_size})


# ------------------------------------------------------------------ helpers


def percentiles(values: list[float] | NDArray[Any]) -> dict[str, float]:
    """n, p50, p95, p99, mean and max of ``values`` (ms); NaN-free, empty -> zeros."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return {"n": 0, "p50": 0.0, "p95": 0.0, "p99": 0.0, "mean": 0.0, "max": 0.0}
    return {
        "n": int(arr.size),
        "p50": float(np.percentile(arr, 50)),
        "p95": float(np.percentile(arr, 95)),
        "p99": float(np.percentile(arr, 99)),
        "mean": float(arr.mean()),
        "max": float(arr.max()),
    }


def _proc_rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError):
        pass
    return 0.0


def _descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (Linux /proc; just ``pid`` elsewhere)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        for task in Path(f"/proc/{p}/task").glob("*/children"):
            with contextlib.suppress(OSError, ValueError):
                todo.extend(int(c) for c in task.read_text().split())
    return found


class _TreeRssSampler:
    """Samples the RSS of a process and its descendants; keeps per-process and total peaks."""

    def __init__(self, pid: int, interval_s: float = 0.2) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.peaks: dict[int, float] = {}
        self.total_peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bench-rss-tree", daemon=True)

    def sample(self) -> None:
        total = 0.0
        for p in _descendants(self.pid):
            rss = _proc_rss_mb(p)
            total += rss
            self.peaks[p] = max(self.peaks.get(p, 0.0), rss)
        self.total_peak = max(self.total_peak, total)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def __enter__(self) -> _TreeRssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def machine_info() -> dict[str, Any]:
    import onnxruntime as ort

    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu_count": os.cpu_count() or 0,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "ort_device": ort.get_device(),
        **client_versions(),
        "numpy": np.__version__,
    }


def model_info(runner: ModelRunner) -> dict[str, Any]:
    m = runner.manifest
    return {
        "name": m.name,
        "version": m.version,
        "sha256": m.sha256,
        "inputs": {i.name: {"dtype": i.dtype, "shape": list(i.shape)} for i in m.inputs},
        "provider": runner.info.provider,
        "providers": list(runner.info.providers),
    }


# ------------------------------------------------------------------ (1) raw ORT


# ------------------------------------------------------------------ (2) raw consume


def bench_consume(
    bootstrap_servers: str,
    topic: str,
    parts: int,
    parts_per_event: int,
    timeout_s: float,
    kafka_client: str = "kafka-python",
) -> dict[str, Any]:
    """A plain consumer of ``kafka_client`` (no group) reading ``parts`` records from the
    beginning (:func:`worker.edge.client.timed_read_for`: connecting is not timed)."""
    read = timed_read_for(kafka_client)(bootstrap_servers, topic, parts, timeout_s)
    count, nbytes, elapsed = read
    return {
        "kafka_client": kafka_client,
        "parts": count,
        "events": count // parts_per_event,
        "megabytes": nbytes / 1e6,
        "seconds": elapsed,
        "parts_per_s": count / elapsed,
        "events_per_s": count / parts_per_event / elapsed,
        "mb_per_s": nbytes / 1e6 / elapsed,
    }


# ------------------------------------------------------------------ the naive baseline


def bench_naive(
    config: BenchConfig, runner: ModelRunner, topic_in: str, topic_out: str, parts: int
) -> dict[str, Any]:
    """What a user would write instead (:mod:`worker.edge.baseline`: no guarantees) on the
    pre-produced topic, with the worker's client, model and batch size: events/s from
    its first record read to its last prediction acknowledged."""
    manifest = runner.manifest
    label_at = (
        runner.output_names.index(manifest.label_output)
        if manifest.label_output in runner.output_names
        else 0
    )
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

    def score(ids: list[str], feeds: dict[str, list[Any]]) -> list[bytes]:
        # Part name -> each event's tensors of that part (input name -> array).
        stacked = {i: np.stack([t[i] for t in rows]) for rows in feeds.values() for i in rows[0]}
        outputs = runner.run(stacked)
        probs = outputs[label_at]
        out = []
        for i, event_id in enumerate(ids):
            top = int(np.argmax(probs[i]))
            label = manifest.labels[top] if top < len(manifest.labels) else str(top)
            doc = {"event_id": event_id, "label": label, "score": float(probs[i][top])}
            out.append(json.dumps(doc).encode())
        return out

    result = naive_loop(
        config.kafka_client,
        config.bootstrap_servers,
        topic_in,
        topic_out,
        f"mm-bench-naive-{uuid.uuid4().hex[:8]}",
        list(manifest.part_names),
        decode,
        score,
        config.events,
        batch_size=config.max_batch_size,
        timeout_s=config.timeout_s,
    )
    return {
        "kafka_client": config.kafka_client,
        "events": result.events,
        "parts": parts,
        "dropped_parts": result.dropped_parts,
        "seconds": result.seconds,
        "events_per_s": result.events / result.seconds,
        "batch_size": config.max_batch_size,
        "guarantees": "none: no dead letters, no bounds, commits every second whatever is "
        "acknowledged, no rebalance handling",
    }


# ------------------------------------------------------------------ (3, 4) the worker


class _WorkerThread:
    """The real Worker on a thread (optionally under cProfile), as ``mmstream demo`` runs it."""

    def __init__(self, worker: Worker, profile: cProfile.Profile | None = None) -> None:
        self.worker = worker
        self.profile = profile
        self.stop = threading.Event()
        self.stats: WorkerStats | None = None
        self.error: MMStreamError | None = None
        self.thread = threading.Thread(target=self._run, name="mmstream-worker", daemon=True)

    def _run(self) -> None:
        try:
            if self.profile is not None:
                self.stats = self.profile.runcall(self.worker.run, self.stop)
            else:
                self.stats = self.worker.run(self.stop)
        except MMStreamError as exc:
            self.error = exc

    def start(self, ready_timeout_s: float = 30.0) -> None:
        self.thread.start()
        if not self.worker.ready.wait(timeout=ready_timeout_s):
            self.stop.set()
            self.thread.join(timeout=30)
            raise BrokerError(
                f"the worker did not join its consumer group within {ready_timeout_s} s"
            )

    def join(self, timeout_s: float) -> WorkerStats:
        self.thread.join(timeout=timeout_s)
        if self.thread.is_alive():
            self.stop.set()
            self.thread.join(timeout=30)
            raise BrokerError(
                f"the worker predicted {self.worker.stats.predicted} events "
                f"within {timeout_s} s and was stopped"
            )
        if self.error is not None:
            raise self.error
        if self.stats is None:
            raise BrokerError("the worker thread ended without stats")
        return self.stats


def _worker_config(
    config: BenchConfig, run: str, topic_in: str, topic_out: str, max_events: int
) -> WorkerConfig:
    return WorkerConfig(
        bootstrap_servers=config.bootstrap_servers,
        input_topic=topic_in,
        output_topic=topic_out,
        dlq_topic=f"{topic_out}.dlq",
        group_id=f"mm-bench-{run}-{uuid.uuid4().hex[:6]}",
        model=config.model,
        device=config.device,
        max_batch_size=config.max_batch_size,
        max_batch_delay_ms=config.max_batch_delay_ms,
        inference_queue=config.inference_queue,
        max_events=max_events,
        kafka_client=config.kafka_client,
    )


Preds = list[tuple[dict[str, Any], int]]


def _first_per_event(preds: Preds) -> Preds:
    """The first prediction (value, record timestamp) of each event, in reading order."""
    first: dict[str, tuple[dict[str, Any], int]] = {}
    for value, ts in preds:
        first.setdefault(value["event_id"], (value, ts))
    return list(first.values())


def _latency_stages(first: Preds) -> dict[str, dict[str, float]]:
    """Where each event's latency went, from the prediction's own timing (p50/p95/p99 ms):
    last part in Kafka -> event assembled in the worker (fetch, decode, assembly);
    assembled -> batch inferred (batch delay, queue, ORT); inferred -> prediction in Kafka
    (JSON, send, linger). Worker-clock and broker-clock stamps: one machine here."""
    rows = [(v["timing"], ts) for v, ts in first]
    return {
        "to_assembled": percentiles([t["completed_ms"] - t["last_part_ms"] for t, _ in rows]),
        "to_inferred": percentiles([t["inferred_ms"] - t["completed_ms"] for t, _ in rows]),
        "to_written": percentiles([ts - t["inferred_ms"] for t, ts in rows]),
    }


def _stats_summary(stats: WorkerStats, n: int) -> dict[str, Any]:
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


def _child_env() -> dict[str, str]:
    """This environment without ``MMSTREAM_*``: the bench's own settings are not the
    child's (each command rejects variables it does not know)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("MMSTREAM_")}


def _free_port_block(n: int) -> int:
    """A port P with P..P+n-1 free now (for ``--http-port P`` with ``--processes n``)."""
    for _ in range(50):
        with socket.socket() as s0:
            s0.bind(("127.0.0.1", 0))
            base = int(s0.getsockname()[1])
        if base + n > 65535:
            continue
        try:
            with contextlib.ExitStack() as stack:
                for i in range(1, n):
                    sock = stack.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", base + i))
        except OSError:
            continue
        return base
    raise BrokerError(f"no block of {n} free local ports for the worker probes")


class _WorkerProcesses:
    """``mmstream worker --processes N`` as a real deployment runs it: its own
    interpreter(s), so neither the bench's GIL nor its memory is the worker's."""

    def __init__(self, config: BenchConfig, run: str, topic_in: str, topic_out: str) -> None:
        self.config = config
        self.port = _free_port_block(1)  # one port per pod, whatever --processes
        self.argv = [
            sys.executable, "-m", "worker.cli", "worker",
            "--bootstrap-servers", config.bootstrap_servers,
            "--input-topic", topic_in,
            "--output-topic", topic_out,
            "--dlq-topic", f"{topic_out}.dlq",
            "--group-id", f"mm-bench-{run}-{uuid.uuid4().hex[:6]}",
            "--model", str(config.model),
            "--device", config.device,
            "--max-batch-size", str(config.max_batch_size),
            "--max-batch-delay-ms", str(config.max_batch_delay_ms),
            "--inference-queue", str(config.inference_queue),
            "--processes", str(config.processes),
            "--kafka-client", config.kafka_client,
            "--http-host", "127.0.0.1",
            "--http-port", str(self.port),
            "--log-level", "WARNING",
        ]  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None
        self.rss: _TreeRssSampler | None = None
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in __exit__

    def __enter__(self) -> _WorkerProcesses:
        self.proc = subprocess.Popen(
            self.argv, env=_child_env(), stdout=self._log, stderr=subprocess.STDOUT
        )
        self.rss = _TreeRssSampler(self.proc.pid).__enter__()
        return self

    def wait_ready(self, timeout_s: float) -> None:
        """``/readyz`` answers 200: every process loaded the model and joined the group
        (with --processes N the launcher answers for all of them on the one port)."""
        deadline = time.monotonic() + timeout_s
        pending = {self.port}
        while pending:
            if self.proc is not None and self.proc.poll() is not None:
                raise BrokerError(f"the worker exited with {self.proc.returncode}: {self.tail()}")
            if time.monotonic() > deadline:
                raise BrokerError(f"the worker was not ready within {timeout_s} s: {self.tail()}")
            for port in sorted(pending):
                url = f"http://127.0.0.1:{port}/readyz"
                with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2):
                    pending.discard(port)  # 200; a 503 raises HTTPError (an OSError)
            time.sleep(0.2)

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM (drain, commit, exit 0); the exit code."""
        if self.proc is None:
            return -1
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise BrokerError(f"the worker did not stop within {timeout_s} s") from None

    def collect(self, topic_out: str, n: int) -> list[tuple[dict[str, Any], int]]:
        """Read until ``n`` events have a prediction, then stop the worker (it must exit 0)."""
        preds = read_predictions(self.config.bootstrap_servers, topic_out, n, self.config.timeout_s)
        rc = self.stop()
        if rc != 0:
            raise BrokerError(f"the worker exited with {rc}: {self.tail()}")
        return preds

    def tail(self, lines: int = 5) -> str:
        self._log.seek(0)
        text = self._log.read().decode("utf-8", "replace").strip().splitlines()
        return " | ".join(text[-lines:])

    def rss_report(self) -> dict[str, Any]:
        if self.rss is None or self.proc is None:
            return {}
        peaks = self.rss.peaks
        own = peaks.get(self.proc.pid, 0.0)
        # With --processes N > 1 the first process only launches and waits; the workers
        # are its children (multiprocessing may add a small resource tracker, also counted).
        workers = [v for p, v in peaks.items() if p != self.proc.pid] or [own]
        return {
            "processes": self.config.processes,
            "peak_per_worker_process": round(max(workers), 1),
            "peak_total": round(self.rss.total_peak, 1),
            "launcher": round(own, 1) if self.config.processes > 1 else None,
        }

    def __exit__(self, *exc: object) -> None:
        if self.rss is not None:
            self.rss.__exit__()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


def _run_report(
    config: BenchConfig, preds: Preds, n: int, topic_out: str, note: str
) -> tuple[dict[str, Any], Preds]:
    """One worker run, from its output topic alone.

    Throughput: first event assembled -> last prediction written (the worker's clock
    stamps ``completed_ms``; the record timestamp is the broker's append time). Batches:
    each prediction carries its batch's size. Latency per event: its first prediction's
    record timestamp - the newest part's record timestamp (``_latencies``: the values).
    Also returns each event's first prediction."""
    first = _first_per_event(preds)
    start = min((v["timing"]["completed_ms"] for v, _ in first), default=0)
    last = max((ts for _, ts in first), default=0)
    seconds = max(1, last - start) / 1000.0
    batches = sum(1.0 / max(1, v["timing"]["batch_size"]) for v, _ in first)
    lat = [float(ts - v["timing"]["last_part_ms"]) for v, ts in first]
    return {
        "events": n,
        "predicted": len(first),
        "duplicates": len(preds) - len(first),
        "dead_lettered": count_records(config.bootstrap_servers, f"{topic_out}.dlq"),
        "batches": round(batches),
        "mean_batch_size": len(first) / max(1.0, batches),
        "seconds": seconds,
        "events_per_s": len(first) / seconds,
        "processes": config.processes,
        "latency_ms": percentiles(lat),
        "latency_note": note,
        "_latencies": lat,
    }, first


def bench_end_to_end(
    config: BenchConfig, run: str, topic_in: str, topic_out: str
) -> dict[str, Any]:
    """The worker process(es) on the pre-produced topic until every event is predicted."""
    with _WorkerProcesses(config, run, topic_in, topic_out) as w:
        preds = w.collect(topic_out, config.events)
        rss = w.rss_report()
    result, _first = _run_report(
        config,
        preds,
        config.events,
        topic_out,
        "prediction record timestamp - newest part's record timestamp (both broker "
        "append times: the topics use LogAppendTime); every part was "
        "written before the worker started, so this is mostly time spent queued",
    )
    result["rss_mb"] = rss
    return result


def profile_end_to_end(
    config: BenchConfig, runner: ModelRunner, topic_in: str, topic_out: str, top: int = 25
) -> str:
    """The pre-produced run again under cProfile (the worker thread only); pstats text."""
    worker = Worker(
        _worker_config(config, "prof", topic_in, topic_out, config.events),
        runner,
        clients=clients_for(config.kafka_client),
    )
    prof = cProfile.Profile()
    wt = _WorkerThread(worker, prof)
    wt.start()
    stats = wt.join(config.timeout_s)
    buf = io.StringIO()
    buf.write(f"# worker loop under cProfile: {_stats_summary(stats, config.events)}\n")
    pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(top)
    return buf.getvalue()


def bench_open_loop(
    config: BenchConfig, run: str, rate: float, topics: tuple[str, str]
) -> dict[str, Any]:
    """Worker process(es) ready; a separate producer process at ``rate`` events/s; latency."""
    topic_in, topic_out = topics
    n = config.events
    argv = [
        sys.executable, "-m", "worker.cli", "produce",
        "--bootstrap-servers", config.bootstrap_servers,
        "--topic", topic_in,
        "--count", str(n),
        "--rate", f"{rate:.3f}",
        "--content", config.content,
        "--model", str(config.model),
        "--media", config.media,
        "--image-type", config.image_type,
        "--audio-type", config.audio_type,
        "--seed", str(config.seed + 1),
        "--key-prefix", f"bench-open-{uuid.uuid4().hex[:6]}-",
    ]  # fmt: skip
    with _WorkerProcesses(config, f"{run}-open", topic_in, topic_out) as w:
        w.wait_ready(120)
        try:
            proc = subprocess.run(
                argv, capture_output=True, text=True, timeout=config.timeout_s, env=_child_env()
            )
        except subprocess.TimeoutExpired as exc:
            raise BrokerError(f"the open-loop producer ran past {config.timeout_s} s") from exc
        if proc.returncode != 0:
            tail = proc.stderr.strip().splitlines()[-1:]
            raise BrokerError(f"the open-loop producer failed: {tail}")
        produced = json.loads(proc.stdout.strip().splitlines()[-1])
        preds = w.collect(topic_out, n)
    result, first = _run_report(
        config,
        preds,
        n,
        topic_out,
        "prediction record timestamp - newest part's record timestamp (both broker "
        "append times: the topics use LogAppendTime), parts produced "
        "at target_rate by a separate process while the worker ran",
    )
    result["latency_stages_ms"] = _latency_stages(first)
    result["target_rate"] = rate
    result["produced_rate"] = n / max(1e-3, produced["ms"] / 1000.0)
    return result


# ------------------------------------------------------------------ the run


@contextlib.contextmanager
def _topics(config: BenchConfig, names: dict[str, int]) -> Iterator[None]:
    # Record timestamps are the broker's append times: a part's and its prediction's
    # timestamps then come from one clock, and the latency is the pipeline's (Kafka ->
    # worker -> Kafka), not the producer's own queueing before the broker had the part.
    ensure_topics(config.bootstrap_servers, names, configs=LOG_APPEND_TIME)
    try:
        yield
    finally:
        if not config.keep_topics:
            delete_topics(config.bootstrap_servers, list(names))


def run_bench(config: BenchConfig) -> dict[str, Any]:
    """Run the four measurements; write bench.json, bench.md and bench.png; return the report."""
    run = uuid.uuid4().hex[:8]
    p = config.partitions
    t_in, t_out, t_dlq = f"mm-bench-{run}-in", f"mm-bench-{run}-out", f"mm-bench-{run}-out.dlq"
    t_prof, t_oin = f"mm-bench-{run}-prof", f"mm-bench-{run}-open-in"
    t_oout, t_naive = f"mm-bench-{run}-open-out", f"mm-bench-{run}-naive-out"
    names = (t_in, t_out, t_dlq, t_prof, f"{t_prof}.dlq", t_oin, t_oout, f"{t_oout}.dlq", t_naive)
    topics = dict.fromkeys(names, p)
    runner = ModelRunner.load(config.model, config.device, max_batch_size=config.max_batch_size)
    report: dict[str, Any] = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
        "machine": machine_info(),
        "model": model_info(runner),
    }
    log.info(
        "bench: raw ORT on %s at batch sizes %s", runner.info.provider, config.batch_size_list()
    )
    report["raw_ort"] = bench_ort(
        runner, config.batch_size_list(), config.seconds_per_ort_point, config.seed
    )
    with _topics(config, topics):
        log.info("bench: producing %d events (%s) to %s", config.events, config.content, t_in)
        produced = produce(
            ProduceConfig(
                bootstrap_servers=config.bootstrap_servers,
                topic=t_in,
                count=config.events,
                content=config.content,
                model=config.model,
                media=config.media,
                image_type=config.image_type,
                audio_type=config.audio_type,
                seed=config.seed,
                key_prefix=f"bench-{run}-",
                client_id="mmstream-bench",
            )
        )
        parts_per_event = produced["parts"] // produced["events"]
        report["produce"] = produced
        log.info("bench: raw consume of %d parts, with each client", produced["parts"])
        by_client = {
            name: bench_consume(
                config.bootstrap_servers,
                t_in,
                produced["parts"],
                parts_per_event,
                config.timeout_s,
                name,
            )
            for name in _available_clients()
        }
        report["raw_consume_by_client"] = by_client
        report["raw_consume"] = by_client[config.kafka_client]
        log.info("bench: the naive baseline (%s) on the pre-produced topic", config.kafka_client)
        report["naive_baseline"] = bench_naive(config, runner, t_in, t_naive, produced["parts"])
        log.info("bench: end to end on the pre-produced topic")
        report["end_to_end"] = bench_end_to_end(config, run, t_in, t_out)
        if config.profile:
            log.info("bench: end to end again, under cProfile")
            text = profile_end_to_end(config, runner, t_in, t_prof)
            config.out.mkdir(parents=True, exist_ok=True)
            (config.out / "profile.txt").write_text(text)
        rate = config.open_loop_fraction * report["end_to_end"]["events_per_s"]
        log.info("bench: open loop at %.1f events/s", rate)
        report["open_loop"] = bench_open_loop(config, run, rate, (t_oin, t_oout))
    report["ratios"] = ratios(report, config.max_batch_size)
    write_report(report, config.out)
    return report


def _available_clients() -> list[str]:
    """The Kafka clients installed here (kafka-python always; confluent when present)."""
    names = []
    for name in KAFKA_CLIENTS:
        try:
            clients_for(name)
        except ConfigError:
            continue
        names.append(name)
    return names


def ratios(report: dict[str, Any], batch_size: int) -> dict[str, float]:
    """mmstream end to end over each reference of the same run (and the open-loop load)."""
    e2e = float(report["end_to_end"]["events_per_s"])
    ort_at = next(r for r in report["raw_ort"] if r["batch_size"] == batch_size)
    out = {
        "ort_batch_size": float(batch_size),
        "end_to_end_over_raw_ort": e2e / float(ort_at["events_per_s"]),
        "end_to_end_over_raw_consume": e2e / float(report["raw_consume"]["events_per_s"]),
    }
    for name, consume in report.get("raw_consume_by_client", {}).items():
        out[f"end_to_end_over_raw_consume_{name}"] = e2e / float(consume["events_per_s"])
    if "naive_baseline" in report:
        out["end_to_end_over_naive"] = e2e / float(report["naive_baseline"]["events_per_s"])
    out["open_loop_load_fraction"] = float(report["open_loop"]["target_rate"]) / e2e
    return out


# ------------------------------------------------------------------ output


def write_report(report: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    lat = {
        "pre-produced (queueing)": report["end_to_end"].pop("_latencies"),
        f"open loop @ {report['open_loop']['target_rate']:.0f} ev/s": report["open_loop"].pop(
            "_latencies"
        ),
    }
    (out / "bench.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    (out / "bench.md").write_text(format_markdown(report))
    plot(report, lat, out / "bench.png")
    log.info(
        "bench: wrote %s", ", ".join(str(out / f) for f in ("bench.json", "bench.md", "bench.png"))
    )


def _row(*cells: object) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def format_markdown(r: dict[str, Any]) -> str:
    m, mod, cons, e2e, ol = (
        r["machine"],
        r["model"],
        r["raw_consume"],
        r["end_to_end"],
        r["open_loop"],
    )
    cfg, rt = r["config"], r["ratios"]
    shapes = ", ".join(f"{k} {v['dtype']}{v['shape']}" for k, v in mod["inputs"].items())
    lines = [
        "### Machine and model",
        "",
        _row("what", "value"),
        _row("---", "---"),
        _row("date", m["date"]),
        _row("CPUs", m["cpu_count"]),
        _row("platform", m["platform"]),
        _row("python / onnxruntime / kafka-python", f"{m['python']} / {m['onnxruntime']} / "
             f"{m['kafka_python']}"),
        _row("confluent-kafka", m.get("confluent_kafka") or "not installed"),
        _row("provider used", mod["provider"]),
        _row("model", f"{mod['name']} {mod['version']} ({shapes})"),
        _row("events / content / partitions", f"{cfg['events']} / {cfg['content']} / "
             f"{cfg['partitions']}"),
        _row("worker", f"{cfg.get('kafka_client', 'kafka-python')}, "
             f"{cfg.get('processes', 1)} process(es); batch max "
             f"{cfg['max_batch_size']}, delay {cfg['max_batch_delay_ms']} ms; inference "
             f"queue {cfg.get('inference_queue', 0)}"),
        "",
        "### Raw ONNX Runtime (`session.run` only)",
        "",
        _row("batch size", "events/s", "ms / batch"),
        _row("---:", "---:", "---:"),
        *(
            _row(o["batch_size"], f"{o['events_per_s']:.0f}", f"{o['ms_per_batch']:.2f}")
            for o in r["raw_ort"]
        ),
        "",
        "### Raw consume (no group)",
        "",
        _row("client", "parts", "MB", "parts/s", "events/s", "MB/s"),
        _row("---", "---:", "---:", "---:", "---:", "---:"),
        *(
            _row(name, c["parts"], f"{c['megabytes']:.1f}", f"{c['parts_per_s']:.0f}",
                 f"{c['events_per_s']:.0f}", f"{c['mb_per_s']:.1f}")
            for name, c in r.get("raw_consume_by_client", {"kafka-python": cons}).items()
        ),
        "",
        *_naive_lines(r),
        "### Worker end to end",
        "",
        _row("run", "events", "events/s", "batches (mean size)", "p50 ms", "p95 ms", "p99 ms",
             "max ms"),
        _row("---", "---:", "---:", "---:", "---:", "---:", "---:", "---:"),
        _row("pre-produced (latency = queueing)", e2e["predicted"], f"{e2e['events_per_s']:.0f}",
             f"{e2e['batches']} ({e2e['mean_batch_size']:.1f})", *_lat_cells(e2e)),
        _row(f"open loop @ {ol['target_rate']:.0f} ev/s (produced {ol['produced_rate']:.0f})",
             ol["predicted"], f"{ol['events_per_s']:.0f}",
             f"{ol['batches']} ({ol['mean_batch_size']:.1f})", *_lat_cells(ol)),
        "",
        *_stage_lines(ol),
        _rss_line(e2e["rss_mb"]),
        "",
        "### Ratios",
        "",
        _row("ratio", "value"),
        _row("---", "---:"),
        _row(f"end to end / raw ORT (batch {int(rt['ort_batch_size'])})",
             f"{rt['end_to_end_over_raw_ort']:.2f}"),
        _row("end to end / raw consume", f"{rt['end_to_end_over_raw_consume']:.2f}"),
        *(
            _row(f"end to end / raw consume, {name}",
                 f"{rt[f'end_to_end_over_raw_consume_{name}']:.2f}")
            for name in r.get("raw_consume_by_client", {})
        ),
        *(
            [_row("end to end / naive baseline (no guarantees)",
                  f"{rt['end_to_end_over_naive']:.2f}")]
            if "end_to_end_over_naive" in rt else []
        ),
        "",
    ]  # fmt: skip
    return "\n".join(lines)


def _naive_lines(r: dict[str, Any]) -> list[str]:
    nb = r.get("naive_baseline")
    if not nb:
        return []
    return [
        "### Naive baseline (what a user would write instead; no guarantees)",
        "",
        f"A plain {nb['kafka_client']} loop (`worker/edge/baseline.py`): parts grouped by "
        f"key, batches of {nb['batch_size']}, `session.run`, `json.dumps`, one record per "
        f"event, the position committed every second. {nb['guarantees']}.",
        "",
        _row("client", "events", "events/s", "parts dropped"),
        _row("---", "---:", "---:", "---:"),
        _row(nb["kafka_client"], nb["events"], f"{nb['events_per_s']:.0f}", nb["dropped_parts"]),
        "",
    ]


def _stage_lines(run: dict[str, Any]) -> list[str]:
    stages = run.get("latency_stages_ms")
    if not stages:
        return []
    names = {
        "to_assembled": "last part in Kafka -> event assembled (fetch, decode, assembly)",
        "to_inferred": "assembled -> batch inferred (batch delay, queue, ORT)",
        "to_written": "inferred -> prediction in Kafka (JSON, send)",
    }
    return [
        "Open-loop latency by stage (from each prediction's `timing`):",
        "",
        _row("stage", "p50 ms", "p95 ms", "p99 ms"),
        _row("---", "---:", "---:", "---:"),
        *(
            _row(label, *(f"{stages[k][q]:.0f}" for q in ("p50", "p95", "p99")))
            for k, label in names.items()
            if k in stages
        ),
        "",
    ]


def _rss_line(rss: dict[str, Any]) -> str:
    n = rss.get("processes", 1)
    line = (
        f"Worker RSS (`/proc/<pid>/status` VmRSS, sampled every 0.2 s during the pre-produced "
        f"run; no TensorFlow in the worker): peak {rss.get('peak_per_worker_process', 0):.0f} "
        f"MiB per worker process"
    )
    if n > 1:
        line += (
            f", {rss.get('peak_total', 0):.0f} MiB for all {n} processes and the launcher "
            f"({rss.get('launcher') or 0:.0f} MiB)"
        )
    return line + "."


def _lat_cells(run: dict[str, Any]) -> list[str]:
    lat = run["latency_ms"]
    return [f"{lat[k]:.0f}" for k in ("p50", "p95", "p99", "max")]


def plot(report: dict[str, Any], latencies: dict[str, list[float]], path: Path) -> None:
    """Throughput vs batch size (raw ORT line, raw consume, the end-to-end point); latency CDFs."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    fig = Figure(figsize=(16, 4.2), layout="constrained")
    ax1, ax2, ax3 = fig.subplots(1, 3)
    ort_pts = report["raw_ort"]
    ax1.plot(
        [o["batch_size"] for o in ort_pts],
        [o["events_per_s"] for o in ort_pts],
        "o-",
        label=f"raw ORT ({report['model']['provider']})",
    )
    ax1.axhline(
        report["raw_consume"]["events_per_s"], color="tab:green", ls="--", label="raw consume"
    )
    e2e = report["end_to_end"]
    ax1.plot(
        [e2e["mean_batch_size"]],
        [e2e["events_per_s"]],
        "s",
        color="tab:red",
        ms=9,
        label=f"worker end to end (mean batch {e2e['mean_batch_size']:.1f})",
    )
    ax1.set_xscale("log", base=2)
    ax1.set_yscale("log")
    ax1.set_xlabel("batch size (events)")
    ax1.set_ylabel("events/s")
    ax1.set_title("throughput")
    ax1.grid(True, which="both", alpha=0.3)
    ax1.legend(fontsize=8)
    for label, values in latencies.items():
        if not values:
            continue
        xs = np.sort(np.maximum(np.asarray(values, dtype=np.float64), 0.5))
        ys = np.arange(1, len(xs) + 1) / len(xs)
        ax2.step(xs, ys, where="post", label=label)
    ax2.set_xscale("log")
    ax2.set_xlabel("latency, ms (last part written -> prediction written)")
    ax2.set_ylabel("fraction of events")
    ax2.set_title("latency distribution (CDF)")
    ax2.grid(True, which="both", alpha=0.3)
    ax2.legend(fontsize=8)
    bars = side_by_side(report)
    ax3.barh(
        [name for name, _ in bars],
        [value for _, value in bars],
        color=["tab:red" if name.startswith("mmstream") else "tab:gray" for name, _ in bars],
    )
    for y, (_, value) in enumerate(bars):
        ax3.text(value, y, f" {value:,.0f}", va="center", fontsize=8)
    ax3.set_xlim(0, 1.25 * max(value for _, value in bars))
    ax3.set_xlabel("events/s")
    ax3.set_title("side by side, same run")
    ax3.invert_yaxis()
    fig.savefig(path, dpi=100)


def side_by_side(report: dict[str, Any]) -> list[tuple[str, float]]:
    """(label, events/s) of mmstream and each reference of the run, for the plot."""
    rt = report["ratios"]
    ort_at = next(o for o in report["raw_ort"] if o["batch_size"] == int(rt["ort_batch_size"]))
    e2e = report["end_to_end"]
    bars = [(f"raw ORT, batch {ort_at['batch_size']}", float(ort_at["events_per_s"]))]
    by_client = report.get("raw_consume_by_client", {"": report["raw_consume"]})
    bars += [
        (f"raw consume {name}".strip(), float(c["events_per_s"])) for name, c in by_client.items()
    ]
    if "naive_baseline" in report:
        nb = report["naive_baseline"]
        bars.append(
            (f"naive loop, {nb['kafka_client']} (no guarantees)", float(nb["events_per_s"]))
        )
    workers = f"{e2e.get('processes', 1)} process(es)"
    bars.append((f"mmstream worker, {workers}", float(e2e["events_per_s"])))
    return bars


def format_summary(r: dict[str, Any]) -> str:
    rt, e2e, ol = r["ratios"], r["end_to_end"], r["open_loop"]
    ort_at = next(o for o in r["raw_ort"] if o["batch_size"] == int(rt["ort_batch_size"]))
    olat = ol["latency_ms"]
    return "\n".join(
        [
            f"mmstream bench ({r['model']['name']} {r['model']['version']} on "
            f"{r['model']['provider']}, {r['machine']['cpu_count']} CPUs)",
            f"  raw ORT       {ort_at['events_per_s']:.0f} events/s at batch "
            f"{ort_at['batch_size']}",
            *(
                f"  raw consume   {c['events_per_s']:.0f} events/s ({c['mb_per_s']:.1f} MB/s, "
                f"{name})"
                for name, c in r.get("raw_consume_by_client", {"": r["raw_consume"]}).items()
            ),
            *(
                [
                    f"  naive loop    {r['naive_baseline']['events_per_s']:.0f} events/s "
                    f"({r['naive_baseline']['kafka_client']}, no guarantees)"
                ]
                if "naive_baseline" in r
                else []
            ),
            f"  end to end    {e2e['events_per_s']:.0f} events/s "
            f"(mean batch {e2e['mean_batch_size']:.1f}, {e2e.get('processes', 1)} worker "
            f"process(es), RSS {e2e['rss_mb'].get('peak_per_worker_process', 0):.0f} MiB each)",
            f"  open loop     {ol['target_rate']:.0f} events/s: p50 {olat['p50']:.0f} ms, "
            f"p95 {olat['p95']:.0f} ms, p99 {olat['p99']:.0f} ms",
            f"  ratios        end to end / raw ORT = {rt['end_to_end_over_raw_ort']:.2f}; "
            f"end to end / raw consume = {rt['end_to_end_over_raw_consume']:.2f}"
            + "".join(
                f"; / raw consume {name} = {rt[f'end_to_end_over_raw_consume_{name}']:.2f}"
                for name in r.get("raw_consume_by_client", {})
            )
            + (
                f"; end to end / naive baseline = {rt['end_to_end_over_naive']:.2f}"
                if "end_to_end_over_naive" in rt
                else ""
            ),
            f"  report        {r['config']['out']}/bench.{{json,md,png}}",
        ]
    )
