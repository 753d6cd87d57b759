"""The typed results of ``mmstream bench``, and the ``bench.json`` they are written as.

Every measurement returns one of these frozen dataclasses; :meth:`BenchReport.to_json`
gives the dict that ``bench.json`` holds (its shape is the one users' saved results
and docs/benchmarks.md rely on: change it only on purpose).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from worker.tools.bench.config import BenchConfig

#: Field metadata of a value kept in memory (for the plot) but not written to bench.json.
NOT_IN_JSON = {"json": False}


@dataclass(frozen=True)
class Percentiles:
    """A latency distribution in ms (all zeros when there was nothing to measure)."""

    n: int
    p50: float
    p95: float
    p99: float
    mean: float
    max: float


def percentiles(values: Sequence[float] | NDArray[Any]) -> Percentiles:
    """n, p50, p95, p99, mean and max of ``values`` (ms); NaN-free, empty -> zeros."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return Percentiles(n=0, p50=0.0, p95=0.0, p99=0.0, mean=0.0, max=0.0)
    return Percentiles(
        n=int(arr.size),
        p50=float(np.percentile(arr, 50)),
        p95=float(np.percentile(arr, 95)),
        p99=float(np.percentile(arr, 99)),
        mean=float(arr.mean()),
        max=float(arr.max()),
    )


@dataclass(frozen=True)
class Machine:
    """Where the bench ran."""

    date: str
    cpu_count: int
    platform: str
    processor: str
    python: str
    onnxruntime: str
    ort_device: str
    kafka_python: str
    confluent_kafka: str  # "" when not installed
    numpy: str


@dataclass(frozen=True)
class ModelInput:
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ModelInfo:
    """The model measured, and the ORT provider it actually ran on."""

    name: str
    version: str
    sha256: str
    inputs: dict[str, ModelInput]
    provider: str
    providers: tuple[str, ...]


@dataclass(frozen=True)
class OrtPoint:
    """Raw ORT at one batch size (medians of the timed repeats)."""

    batch_size: int
    events_per_s: float
    ms_per_batch: float
    repeats: tuple[float, ...]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OrtPoint:
        """One row of :func:`worker.inference.rawort.bench_ort`, which stays a dict for
        ``deploy/gpu/gpu_bench.py``."""
        return cls(
            batch_size=int(d["batch_size"]),
            events_per_s=float(d["events_per_s"]),
            ms_per_batch=float(d["ms_per_batch"]),
            repeats=tuple(d["repeats"]),
        )


@dataclass(frozen=True)
class ConsumeResult:
    """A plain consumer of one client reading the pre-produced topic."""

    kafka_client: str
    parts: int
    events: int
    megabytes: float
    seconds: float
    parts_per_s: float
    events_per_s: float
    mb_per_s: float


@dataclass(frozen=True)
class NaiveResult:
    """The naive consume -> ORT -> produce loop on the pre-produced topic."""

    kafka_client: str
    events: int
    parts: int
    dropped_parts: int
    seconds: float
    events_per_s: float
    batch_size: int
    guarantees: str


@dataclass(frozen=True)
class RssPeaks:
    """Peak RSS (MiB) of the worker process(es) during the pre-produced run."""

    processes: int
    peak_per_worker_process: float
    peak_total: float
    launcher: float | None  # None with one process: it is the worker itself


@dataclass(frozen=True)
class LatencyStages:
    """Where the open-loop latency went, from each prediction's own ``timing``."""

    to_assembled: Percentiles
    to_inferred: Percentiles
    to_written: Percentiles


@dataclass(frozen=True)
class RunResult:
    """One run of the worker, read from its output topic alone."""

    events: int
    predicted: int
    duplicates: int
    dead_lettered: int
    batches: int
    mean_batch_size: float
    seconds: float
    events_per_s: float
    processes: int
    latency_ms: Percentiles
    latency_note: str
    latencies: tuple[float, ...] = field(repr=False, metadata=NOT_IN_JSON)


@dataclass(frozen=True)
class EndToEndResult(RunResult):
    """The worker on the pre-produced topic (latency is mostly queueing)."""

    rss_mb: RssPeaks


@dataclass(frozen=True)
class OpenLoopResult(RunResult):
    """The worker under a producer at ``target_rate`` events/s."""

    latency_stages_ms: LatencyStages
    target_rate: float
    produced_rate: float


@dataclass(frozen=True)
class Ratios:
    """mmstream end to end over each reference of the same run (and the open-loop load)."""

    ort_batch_size: float
    end_to_end_over_raw_ort: float
    end_to_end_over_raw_consume: float
    end_to_end_over_raw_consume_by_client: dict[str, float]
    end_to_end_over_naive: float
    open_loop_load_fraction: float

    def to_json(self) -> dict[str, float]:
        """Flat, one ``end_to_end_over_raw_consume_<client>`` key per client."""
        by_client = self.end_to_end_over_raw_consume_by_client
        return {
            "ort_batch_size": self.ort_batch_size,
            "end_to_end_over_raw_ort": self.end_to_end_over_raw_ort,
            "end_to_end_over_raw_consume": self.end_to_end_over_raw_consume,
            **{f"end_to_end_over_raw_consume_{n}": v for n, v in by_client.items()},
            "end_to_end_over_naive": self.end_to_end_over_naive,
            "open_loop_load_fraction": self.open_loop_load_fraction,
        }


@dataclass(frozen=True)
class BenchReport:
    """Everything one ``mmstream bench`` run measured."""

    config: BenchConfig
    machine: Machine
    model: ModelInfo
    raw_ort: tuple[OrtPoint, ...]
    produce: dict[str, Any]  # produce()'s own summary, passed through as it is
    raw_consume_by_client: dict[str, ConsumeResult]
    naive_baseline: NaiveResult
    end_to_end: EndToEndResult
    open_loop: OpenLoopResult

    @property
    def raw_consume(self) -> ConsumeResult:
        """Raw consume with the worker's own client (the one the ratios use)."""
        return self.raw_consume_by_client[self.config.kafka_client]

    def ort_at(self, batch_size: int) -> OrtPoint:
        return next(o for o in self.raw_ort if o.batch_size == batch_size)

    @property
    def ratios(self) -> Ratios:
        e2e = self.end_to_end.events_per_s
        batch_size = self.config.max_batch_size
        by_client = self.raw_consume_by_client
        return Ratios(
            ort_batch_size=float(batch_size),
            end_to_end_over_raw_ort=e2e / self.ort_at(batch_size).events_per_s,
            end_to_end_over_raw_consume=e2e / self.raw_consume.events_per_s,
            end_to_end_over_raw_consume_by_client={
                name: e2e / c.events_per_s for name, c in by_client.items()
            },
            end_to_end_over_naive=e2e / self.naive_baseline.events_per_s,
            open_loop_load_fraction=self.open_loop.target_rate / e2e,
        )

    def to_json(self) -> dict[str, Any]:
        """What ``bench.json`` holds (without the raw latencies)."""
        out = {f.name: to_json(getattr(self, f.name)) for f in dataclasses.fields(self)}
        out["raw_consume"] = to_json(self.raw_consume)
        out["ratios"] = self.ratios.to_json()
        return out


def to_json(value: Any) -> Any:
    """Dataclasses as dicts (less their ``NOT_IN_JSON`` fields), tuples as lists, paths
    as strings: what :func:`json.dumps` takes."""
    if isinstance(value, Ratios):
        return value.to_json()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: to_json(getattr(value, f.name))
            for f in dataclasses.fields(value)
            if f.metadata.get("json", True)
        }
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
