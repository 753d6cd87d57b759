"""``bench.md`` (tables) and the summary ``mmstream bench`` prints, from a
:class:`~worker.tools.bench.results.BenchReport`."""

from __future__ import annotations

from worker.tools.bench.results import BenchReport, NaiveResult, OpenLoopResult, RssPeaks, RunResult

STAGE_NAMES = {
    "to_assembled": "last part in Kafka -> event assembled (fetch, decode, assembly)",
    "to_inferred": "assembled -> batch inferred (batch delay, queue, ORT)",
    "to_written": "inferred -> prediction in Kafka (JSON, send)",
}


def _row(*cells: object) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def format_markdown(r: BenchReport) -> str:
    lines = [
        *_machine_lines(r),
        *_raw_ort_lines(r),
        *_raw_consume_lines(r),
        *_naive_lines(r.naive_baseline),
        *_worker_lines(r),
        *_ratio_lines(r),
    ]
    return "\n".join(lines)


def _machine_lines(r: BenchReport) -> list[str]:
    m, mod, cfg = r.machine, r.model, r.config
    shapes = ", ".join(f"{k} {v.dtype}{list(v.shape)}" for k, v in mod.inputs.items())
    return [
        "### Machine and model",
        "",
        _row("what", "value"),
        _row("---", "---"),
        _row("date", m.date),
        _row("CPUs", m.cpu_count),
        _row("platform", m.platform),
        _row("python / onnxruntime / kafka-python", f"{m.python} / {m.onnxruntime} / "
             f"{m.kafka_python}"),
        _row("confluent-kafka", m.confluent_kafka or "not installed"),
        _row("provider used", mod.provider),
        _row("model", f"{mod.name} {mod.version} ({shapes})"),
        _row("events / content / partitions", f"{cfg.events} / {cfg.content} / "
             f"{cfg.partitions}"),
        _row("worker", f"{cfg.kafka_client}, {cfg.processes} process(es); batch max "
             f"{cfg.max_batch_size}, delay {cfg.max_batch_delay_ms} ms; inference "
             f"queue {cfg.inference_queue}"),
        "",
    ]  # fmt: skip


def _raw_ort_lines(r: BenchReport) -> list[str]:
    return [
        "### Raw ONNX Runtime (`session.run` only)",
        "",
        _row("batch size", "events/s", "ms / batch"),
        _row("---:", "---:", "---:"),
        *(_row(o.batch_size, f"{o.events_per_s:.0f}", f"{o.ms_per_batch:.2f}") for o in r.raw_ort),
        "",
    ]


def _raw_consume_lines(r: BenchReport) -> list[str]:
    return [
        "### Raw consume (no group)",
        "",
        _row("client", "parts", "MB", "parts/s", "events/s", "MB/s"),
        _row("---", "---:", "---:", "---:", "---:", "---:"),
        *(
            _row(name, c.parts, f"{c.megabytes:.1f}", f"{c.parts_per_s:.0f}",
                 f"{c.events_per_s:.0f}", f"{c.mb_per_s:.1f}")
            for name, c in r.raw_consume_by_client.items()
        ),
        "",
    ]  # fmt: skip


def _naive_lines(nb: NaiveResult) -> list[str]:
    return [
        "### Naive baseline (what a user would write instead; no guarantees)",
        "",
        f"A plain {nb.kafka_client} loop (`worker/tools/bench/baseline.py`): parts grouped by "
        f"key, batches of {nb.batch_size}, `session.run`, `json.dumps`, one record per "
        f"event, the position committed every second. {nb.guarantees}.",
        "",
        _row("client", "events", "events/s", "parts dropped"),
        _row("---", "---:", "---:", "---:"),
        _row(nb.kafka_client, nb.events, f"{nb.events_per_s:.0f}", nb.dropped_parts),
        "",
    ]


def _worker_lines(r: BenchReport) -> list[str]:
    e2e, ol = r.end_to_end, r.open_loop
    return [
        "### Worker end to end",
        "",
        _row("run", "events", "events/s", "batches (mean size)", "p50 ms", "p95 ms", "p99 ms",
             "max ms"),
        _row("---", "---:", "---:", "---:", "---:", "---:", "---:", "---:"),
        _row("pre-produced (latency = queueing)", *_run_cells(e2e)),
        _row(f"open loop @ {ol.target_rate:.0f} ev/s (produced {ol.produced_rate:.0f})",
             *_run_cells(ol)),
        "",
        *_stage_lines(ol),
        _rss_line(e2e.rss_mb),
        "",
    ]  # fmt: skip


def _run_cells(run: RunResult) -> list[object]:
    lat = run.latency_ms
    return [
        run.predicted,
        f"{run.events_per_s:.0f}",
        f"{run.batches} ({run.mean_batch_size:.1f})",
        *(f"{v:.0f}" for v in (lat.p50, lat.p95, lat.p99, lat.max)),
    ]


def _stage_lines(run: OpenLoopResult) -> list[str]:
    stages = run.latency_stages_ms
    return [
        "Open-loop latency by stage (from each prediction's `timing`):",
        "",
        _row("stage", "p50 ms", "p95 ms", "p99 ms"),
        _row("---", "---:", "---:", "---:"),
        *(
            _row(label, *(f"{q:.0f}" for q in (p.p50, p.p95, p.p99)))
            for k, label in STAGE_NAMES.items()
            for p in (getattr(stages, k),)
        ),
        "",
    ]


def _rss_line(rss: RssPeaks) -> str:
    line = (
        f"Worker RSS (`/proc/<pid>/status` VmRSS, sampled every 0.2 s during the pre-produced "
        f"run; no TensorFlow in the worker): peak {rss.peak_per_worker_process:.0f} "
        f"MiB per worker process"
    )
    if rss.processes > 1:
        line += (
            f", {rss.peak_total:.0f} MiB for all {rss.processes} processes and the launcher "
            f"({rss.launcher or 0:.0f} MiB)"
        )
    return line + "."


def _ratio_lines(r: BenchReport) -> list[str]:
    rt = r.ratios
    return [
        "### Ratios",
        "",
        _row("ratio", "value"),
        _row("---", "---:"),
        _row(f"end to end / raw ORT (batch {int(rt.ort_batch_size)})",
             f"{rt.end_to_end_over_raw_ort:.2f}"),
        _row("end to end / raw consume", f"{rt.end_to_end_over_raw_consume:.2f}"),
        *(
            _row(f"end to end / raw consume, {name}", f"{value:.2f}")
            for name, value in rt.end_to_end_over_raw_consume_by_client.items()
        ),
        _row("end to end / naive baseline (no guarantees)", f"{rt.end_to_end_over_naive:.2f}"),
        "",
    ]  # fmt: skip


def format_summary(r: BenchReport) -> str:
    """What ``mmstream bench`` prints: each measurement on a line, then the ratios."""
    rt, e2e, ol, nb = r.ratios, r.end_to_end, r.open_loop, r.naive_baseline
    ort_at = r.ort_at(int(rt.ort_batch_size))
    olat = ol.latency_ms
    return "\n".join(
        [
            f"mmstream bench ({r.model.name} {r.model.version} on "
            f"{r.model.provider}, {r.machine.cpu_count} CPUs)",
            f"  raw ORT       {ort_at.events_per_s:.0f} events/s at batch {ort_at.batch_size}",
            *(
                f"  raw consume   {c.events_per_s:.0f} events/s ({c.mb_per_s:.1f} MB/s, {name})"
                for name, c in r.raw_consume_by_client.items()
            ),
            f"  naive loop    {nb.events_per_s:.0f} events/s ({nb.kafka_client}, no guarantees)",
            f"  end to end    {e2e.events_per_s:.0f} events/s "
            f"(mean batch {e2e.mean_batch_size:.1f}, {e2e.processes} worker "
            f"process(es), RSS {e2e.rss_mb.peak_per_worker_process:.0f} MiB each)",
            f"  open loop     {ol.target_rate:.0f} events/s: p50 {olat.p50:.0f} ms, "
            f"p95 {olat.p95:.0f} ms, p99 {olat.p99:.0f} ms",
            f"  ratios        end to end / raw ORT = {rt.end_to_end_over_raw_ort:.2f}; "
            f"end to end / raw consume = {rt.end_to_end_over_raw_consume:.2f}"
            + "".join(
                f"; / raw consume {name} = {value:.2f}"
                for name, value in rt.end_to_end_over_raw_consume_by_client.items()
            )
            + f"; end to end / naive baseline = {rt.end_to_end_over_naive:.2f}",
            f"  report        {r.config.out}/bench.{{json,md,png}}",
        ]
    )
