"""``mmstream demo``: produce sample events, run the worker until each has a prediction, summarise.

Starts the worker (in this process, on a thread) on fresh topics, waits until
it owns its partitions, produces ``--count`` reference events at ``--rate``,
stops the worker once every event's prediction is acknowledged, then reads the
output topic and prints: events, accuracy against the known labels, worker
events/s, end-to-end latency p50/p99 (prediction record timestamp minus the
newest part's record timestamp) and the execution provider that ran.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from worker.config import CONTENTS, FrozenConfig, WorkerConfig, setting, setting_from
from worker.contract.errors import BrokerError, ConfigError, MMStreamError
from worker.contract.records import RawRecord
from worker.core.pipeline import Worker, WorkerStats
from worker.edge.kafka_python import KafkaPythonClients
from worker.edge.kafka_python.admin import ensure_topics, read_records
from worker.inference.model import ModelRunner

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoConfig(FrozenConfig):
    """Settings of ``mmstream demo``; see ``mmstream demo --help``."""

    bootstrap_servers: str = setting("127.0.0.1:9092", help="Kafka bootstrap servers")
    model: Path = setting(Path(".cache/reference-onnx"), help="model directory")
    count: int = setting(400, help="events to produce")
    rate: float = setting(300.0, help="events/s produced (0 = burst)")
    content: str = setting("raw", choices=CONTENTS, help="part encoding")
    partitions: int = setting(3, help="partitions of the demo topics")
    seed: int = setting(7, help="random seed")
    device: str = setting_from(WorkerConfig, "device", help="ORT device")
    timeout_s: float = setting(120.0, help="give up after this long")

    def __post_init__(self) -> None:
        super().__post_init__()  # every setting's choices
        if self.count <= 0 or self.partitions <= 0 or self.timeout_s <= 0:
            raise ConfigError("--count, --partitions and --timeout-s must be > 0")


def read_predictions(
    bootstrap_servers: str, topic: str, expected: int, timeout_s: float
) -> list[tuple[dict[str, Any], int]]:
    """Read predictions (value, record timestamp) from ``topic`` until ``expected``
    distinct events have one (duplicates, which at-least-once allows, are returned too)."""
    out: list[tuple[dict[str, Any], int]] = []
    seen: set[str] = set()

    def enough(records: list[RawRecord]) -> bool:
        for r in records[len(out) :]:
            value = json.loads(r.value or b"{}")
            seen.add(value["event_id"])
            out.append((value, r.source.timestamp_ms))
        return len(seen) >= expected

    read_records(bootstrap_servers, topic, enough, timeout_s)
    return out


def summarise(
    preds: list[tuple[dict[str, Any], int]],
    labels: dict[str, str],
    stats: WorkerStats,
    rate: float,
) -> dict[str, Any]:
    by_event = {p["event_id"]: (p, ts) for p, ts in preds}
    correct = sum(1 for eid, (p, _) in by_event.items() if p.get("label") == labels.get(eid))
    latencies = np.array([ts - p["timing"]["last_part_ms"] for p, ts in by_event.values()])
    span_ms = max(1, (stats.last_acked_ms or 0) - (stats.first_consumed_ms or 0))
    return {
        "events": len(labels),
        "predicted": len(by_event),
        "duplicates": len(preds) - len(by_event),
        "accuracy": correct / max(1, len(labels)),
        "events_per_s": stats.predicted / (span_ms / 1000.0),
        "latency_p50_ms": float(np.percentile(latencies, 50)) if len(latencies) else None,
        "latency_p99_ms": float(np.percentile(latencies, 99)) if len(latencies) else None,
        "provider": stats.provider,
        "dead_lettered": sum(stats.dead_lettered.values()),
        "batches": stats.batches,
        "rate": rate,
    }


def run_demo(config: DemoConfig, workdir: Path) -> dict[str, Any]:
    run = uuid.uuid4().hex[:8]
    topics = {f"mm-demo-{run}-{t}": config.partitions for t in ("in", "out", "dlq")}
    t_in, t_out, t_dlq = topics
    ensure_topics(config.bootstrap_servers, topics)
    wcfg = WorkerConfig(
        bootstrap_servers=config.bootstrap_servers,
        input_topic=t_in,
        output_topic=t_out,
        dlq_topic=t_dlq,
        group_id=f"mm-demo-{run}",
        model=config.model,
        device=config.device,
        max_events=config.count,
    )
    worker = Worker(
        wcfg, ModelRunner.load(config.model, config.device), clients=KafkaPythonClients()
    )
    stop = threading.Event()
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["stats"] = worker.run(stop)
        except MMStreamError as exc:
            result["error"] = exc

    thread = threading.Thread(target=target, name="mmstream-worker", daemon=True)
    thread.start()
    if not worker.ready.wait(timeout=30):
        stop.set()
        raise BrokerError("the worker did not join its consumer group within 30 s")
    labels_path = workdir / f"demo-{run}-labels.jsonl"
    # The producer runs in its own process, as real producers do, so it does not
    # compete with the worker for this interpreter's GIL.
    argv = [
        sys.executable, "-m", "worker.cli", "produce",
        "--bootstrap-servers", config.bootstrap_servers,
        "--topic", t_in,
        "--count", str(config.count),
        "--rate", str(config.rate),
        "--content", config.content,
        "--model", str(config.model),
        "--seed", str(config.seed),
        "--labels-out", str(labels_path),
        "--key-prefix", f"demo-{run}-",
    ]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=config.timeout_s)
    if proc.returncode != 0:
        stop.set()
        raise BrokerError(f"the producer failed: {proc.stderr.strip().splitlines()[-1:]}")
    thread.join(timeout=config.timeout_s)
    if thread.is_alive():
        stop.set()
        thread.join(timeout=30)
        raise BrokerError(
            f"not every event was predicted within {config.timeout_s} s "
            f"({worker.stats.predicted}/{config.count})"
        )
    if "error" in result:
        raise result["error"]
    labels = {
        d["event_id"]: d["label"] for d in map(json.loads, labels_path.read_text().splitlines())
    }
    preds = read_predictions(config.bootstrap_servers, t_out, config.count, 30)
    return summarise(preds, labels, result["stats"], config.rate)


def format_summary(s: dict[str, Any]) -> str:
    return "\n".join(
        [
            "mmstream demo summary",
            f"  events        {s['predicted']}/{s['events']} predicted"
            f" ({s['duplicates']} duplicates, {s['dead_lettered']} dead-lettered)",
            f"  accuracy      {s['accuracy']:.3f}",
            f"  throughput    {s['events_per_s']:.0f} events/s in {s['batches']} batches"
            + (f" (producer paced at {s['rate']:.0f} events/s)" if s["rate"] else " (burst)"),
            f"  latency       p50 {s['latency_p50_ms']:.0f} ms, p99 {s['latency_p99_ms']:.0f} ms"
            " (last part written -> prediction written)",
            f"  provider      {s['provider']}",
        ]
    )
