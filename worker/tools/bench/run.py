"""One ``mmstream bench`` run: the topics, the measurements in order, and the files."""

from __future__ import annotations

import contextlib
import json
import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker.config import KAFKA_CLIENTS
from worker.contract.errors import ConfigError
from worker.edge.choice import clients_for
from worker.edge.kafka_python.admin import delete_topics, ensure_topics
from worker.inference.model import ModelRunner
from worker.tools.bench import measure
from worker.tools.bench.config import BenchConfig
from worker.tools.bench.plot import plot
from worker.tools.bench.report import format_markdown
from worker.tools.bench.results import BenchReport
from worker.tools.produce import ProduceConfig, produce

log = logging.getLogger(__name__)

LOG_APPEND_TIME = {"message.timestamp.type": "LogAppendTime"}


#: The topics of one run, after ``mm-bench-<run>-``.
TOPIC_SUFFIXES = (
    "in", "out", "out.dlq", "prof", "prof.dlq", "open-in", "open-out", "open-out.dlq", "naive-out",
)  # fmt: skip


@dataclass(frozen=True)
class _Topics:
    """The names of one run's topics."""

    run: str

    def name(self, suffix: str) -> str:
        return f"mm-bench-{self.run}-{suffix}"

    def all(self) -> list[str]:
        return [self.name(s) for s in TOPIC_SUFFIXES]


@contextlib.contextmanager
def _topics(config: BenchConfig, names: dict[str, int]) -> Iterator[None]:
    # Broker append times put a part's and its prediction's timestamps on one clock, so
    # the latency measured is the pipeline's and not the producer's own queueing.
    ensure_topics(config.bootstrap_servers, names, configs=LOG_APPEND_TIME)
    try:
        yield
    finally:
        if not config.keep_topics:
            delete_topics(config.bootstrap_servers, list(names))


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


def _produce_input(config: BenchConfig, run: str, topic: str) -> dict[str, Any]:
    log.info("bench: producing %d events (%s) to %s", config.events, config.content, topic)
    return produce(
        ProduceConfig(
            bootstrap_servers=config.bootstrap_servers,
            topic=topic,
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


def run_bench(config: BenchConfig) -> BenchReport:
    """Run the measurements; write bench.json, bench.md and bench.png; return the report."""
    t = _Topics(uuid.uuid4().hex[:8])
    runner = ModelRunner.load(config.model, config.device, max_batch_size=config.max_batch_size)
    machine, model = measure.machine_info(), measure.model_info(runner)
    log.info(
        "bench: raw ORT on %s at batch sizes %s", runner.info.provider, config.batch_size_list()
    )
    raw_ort = measure.raw_ort(config, runner)
    with _topics(config, dict.fromkeys(t.all(), config.partitions)):
        produced = _produce_input(config, t.run, t.name("in"))
        parts, parts_per_event = produced["parts"], produced["parts"] // produced["events"]
        log.info("bench: raw consume of %d parts, with each client", parts)
        by_client = {
            name: measure.bench_consume(
                config.bootstrap_servers,
                t.name("in"),
                parts,
                parts_per_event,
                config.timeout_s,
                name,
            )
            for name in _available_clients()
        }
        log.info("bench: the naive baseline (%s) on the pre-produced topic", config.kafka_client)
        naive = measure.bench_naive(config, runner, t.name("in"), t.name("naive-out"), parts)
        log.info("bench: end to end on the pre-produced topic")
        e2e = measure.bench_end_to_end(config, t.run, t.name("in"), t.name("out"))
        if config.profile:
            _profile(config, runner, t)
        rate = config.open_loop_fraction * e2e.events_per_s
        log.info("bench: open loop at %.1f events/s", rate)
        topics = (t.name("open-in"), t.name("open-out"))
        open_loop = measure.bench_open_loop(config, t.run, rate, topics)
    report = BenchReport(
        config, machine, model, raw_ort, produced, by_client, naive, e2e, open_loop
    )
    write_report(report, config.out)
    return report


def _profile(config: BenchConfig, runner: ModelRunner, t: _Topics) -> None:
    log.info("bench: end to end again, under cProfile")
    text = measure.profile_end_to_end(config, runner, t.name("in"), t.name("prof"))
    config.out.mkdir(parents=True, exist_ok=True)
    (config.out / "profile.txt").write_text(text)


def write_report(report: BenchReport, out: Path) -> None:
    """bench.json (:meth:`BenchReport.to_json`), bench.md and bench.png in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    lat = {
        "pre-produced (queueing)": report.end_to_end.latencies,
        f"open loop @ {report.open_loop.target_rate:.0f} ev/s": report.open_loop.latencies,
    }
    (out / "bench.json").write_text(json.dumps(report.to_json(), indent=2, sort_keys=True) + "\n")
    (out / "bench.md").write_text(format_markdown(report))
    plot(report, lat, out / "bench.png")
    log.info(
        "bench: wrote %s", ", ".join(str(out / f) for f in ("bench.json", "bench.md", "bench.png"))
    )
