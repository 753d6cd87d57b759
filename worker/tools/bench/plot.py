"""``bench.png``: throughput vs batch size, latency CDFs, and every measurement side by
side (matplotlib, the ``bench`` extra)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from worker.tools.bench.results import BenchReport

if TYPE_CHECKING:
    from matplotlib.axes import Axes


def plot(report: BenchReport, latencies: Mapping[str, Sequence[float]], path: Path) -> None:
    """Throughput vs batch size (raw ORT line, raw consume, the end-to-end point); latency CDFs."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    fig = Figure(figsize=(16, 4.2), layout="constrained")
    ax1, ax2, ax3 = fig.subplots(1, 3)
    _throughput(ax1, report)
    _latency_cdfs(ax2, latencies)
    _side_by_side(ax3, report)
    fig.savefig(path, dpi=100)


def _throughput(ax: Axes, report: BenchReport) -> None:
    ort_pts = report.raw_ort
    ax.plot(
        [o.batch_size for o in ort_pts],
        [o.events_per_s for o in ort_pts],
        "o-",
        label=f"raw ORT ({report.model.provider})",
    )
    ax.axhline(report.raw_consume.events_per_s, color="tab:green", ls="--", label="raw consume")
    e2e = report.end_to_end
    ax.plot(
        [e2e.mean_batch_size],
        [e2e.events_per_s],
        "s",
        color="tab:red",
        ms=9,
        label=f"worker end to end (mean batch {e2e.mean_batch_size:.1f})",
    )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size (events)")
    ax.set_ylabel("events/s")
    ax.set_title("throughput")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)


def _latency_cdfs(ax: Axes, latencies: Mapping[str, Sequence[float]]) -> None:
    for label, values in latencies.items():
        if not values:
            continue
        xs = np.sort(np.maximum(np.asarray(values, dtype=np.float64), 0.5))
        ys = np.arange(1, len(xs) + 1) / len(xs)
        ax.step(xs, ys, where="post", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("latency, ms (last part written -> prediction written)")
    ax.set_ylabel("fraction of events")
    ax.set_title("latency distribution (CDF)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)


def _side_by_side(ax: Axes, report: BenchReport) -> None:
    bars = side_by_side(report)
    ax.barh(
        [name for name, _ in bars],
        [value for _, value in bars],
        color=["tab:red" if name.startswith("mmstream") else "tab:gray" for name, _ in bars],
    )
    for y, (_, value) in enumerate(bars):
        ax.text(value, y, f" {value:,.0f}", va="center", fontsize=8)
    ax.set_xlim(0, 1.25 * max(value for _, value in bars))
    ax.set_xlabel("events/s")
    ax.set_title("side by side, same run")
    ax.invert_yaxis()


def side_by_side(report: BenchReport) -> list[tuple[str, float]]:
    """(label, events/s) of mmstream and each reference of the run, for the plot."""
    ort_at = report.ort_at(int(report.ratios.ort_batch_size))
    nb, e2e = report.naive_baseline, report.end_to_end
    return [
        (f"raw ORT, batch {ort_at.batch_size}", float(ort_at.events_per_s)),
        *(
            (f"raw consume {name}".strip(), float(c.events_per_s))
            for name, c in report.raw_consume_by_client.items()
        ),
        (f"naive loop, {nb.kafka_client} (no guarantees)", float(nb.events_per_s)),
        (f"mmstream worker, {e2e.processes} process(es)", float(e2e.events_per_s)),
    ]
