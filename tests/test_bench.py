"""``mmstream bench`` runs end to end against a real broker and writes a well-formed report.

A benchmark is not a timed test: these check the report's shape and that every
number is a positive, finite measurement, never how fast anything was.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from worker.cli.main import build_parser
from worker.contract.errors import ConfigError
from worker.tools.bench.config import BenchConfig
from worker.tools.bench.plot import side_by_side
from worker.tools.bench.report import format_summary
from worker.tools.bench.results import percentiles
from worker.tools.bench.run import run_bench


def positive(x: Any) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


@pytest.mark.integration
@pytest.mark.slow
def test_bench_writes_json_markdown_and_png(
    kafka_bootstrap: str, tiny_model_dir: Path, tmp_path: Path, kafka_client: str
) -> None:
    out = tmp_path / "bench"
    config = BenchConfig(
        bootstrap_servers=kafka_bootstrap,
        model=tiny_model_dir,
        out=out,
        events=300,
        batch_sizes="1,8",
        max_batch_size=8,
        seconds_per_ort_point=0.3,
        device="cpu",
        partitions=2,
        processes=2,
        timeout_s=120,
        kafka_client=kafka_client,
    )
    report = run_bench(config)

    on_disk = json.loads((out / "bench.json").read_text())
    assert on_disk == json.loads(json.dumps(report.to_json()))
    for section in ("config", "machine", "model", "raw_ort", "produce", "raw_consume"):
        assert section in on_disk
    assert on_disk["model"]["provider"] == "CPUExecutionProvider"
    assert on_disk["machine"]["cpu_count"] > 0

    assert [r["batch_size"] for r in on_disk["raw_ort"]] == [1, 8]
    for r in on_disk["raw_ort"]:
        assert positive(r["events_per_s"]) and positive(r["ms_per_batch"])

    # Raw consume with each client; the ratio is to the worker's own client.
    by_client = on_disk["raw_consume_by_client"]
    assert set(by_client) == {"kafka-python", "confluent"}
    assert on_disk["raw_consume"] == by_client[kafka_client]
    for name, consume in by_client.items():
        assert consume["kafka_client"] == name
        assert consume["parts"] == 3 * 300 and consume["events"] == 300
        for k in ("parts_per_s", "events_per_s", "mb_per_s", "megabytes"):
            assert positive(consume[k]), (name, k)
    assert on_disk["config"]["kafka_client"] == kafka_client

    # The naive baseline: the same client, model and batch size, every event predicted.
    naive = on_disk["naive_baseline"]
    assert naive["kafka_client"] == kafka_client and naive["batch_size"] == 8
    assert naive["events"] == 300 and naive["parts"] == 900 and naive["dropped_parts"] == 0
    assert positive(naive["events_per_s"]) and "none" in naive["guarantees"]

    for run in ("end_to_end", "open_loop"):
        r = on_disk[run]
        assert r["predicted"] == 300 and r["dead_lettered"] == 0, run
        assert positive(r["events_per_s"]) and positive(r["mean_batch_size"]), run
        lat = r["latency_ms"]
        assert lat["n"] == 300, run
        assert 0 <= lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"], run
        assert "_latencies" not in r
    assert positive(on_disk["open_loop"]["target_rate"])
    rss = on_disk["end_to_end"]["rss_mb"]
    assert rss["processes"] == 2
    # Two worker processes (plus the launcher) were sampled; a worker holds ORT and the model.
    assert 30 < rss["peak_per_worker_process"] < rss["peak_total"] < 4096, rss

    ratios = on_disk["ratios"]
    assert ratios["ort_batch_size"] == 8
    assert positive(ratios["end_to_end_over_raw_ort"])
    assert positive(ratios["end_to_end_over_raw_consume"])
    for key in ("naive", "raw_consume_kafka-python", "raw_consume_confluent"):
        assert positive(ratios[f"end_to_end_over_{key}"]), key
    assert ratios["open_loop_load_fraction"] == pytest.approx(0.5)

    md = (out / "bench.md").read_text()
    for heading in ("Raw ONNX Runtime", "Raw consume", "Naive baseline", "Worker end to end"):
        assert f"### {heading}" in md
    assert "end to end / naive baseline (no guarantees)" in md
    assert "| 8 |" in md and "end to end / raw ORT (batch 8)" in md
    assert "| confluent | 900 |" in md and "| kafka-python | 900 |" in md

    png = (out / "bench.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000

    summary = format_summary(report)
    assert "end to end / raw ORT" in summary and "end to end / raw consume" in summary
    assert "end to end / naive baseline" in summary and "naive loop" in summary
    labels = [label for label, _ in side_by_side(report)]
    assert labels[0] == "raw ORT, batch 8" and labels[-1] == "mmstream worker, 2 process(es)"
    assert any(label.startswith("naive loop") for label in labels)


def test_bench_config_checks() -> None:
    base = {"bootstrap_servers": "localhost:1", "model": Path("m")}
    assert BenchConfig.from_mapping({**base, "batch_sizes": "8, 1"}).batch_size_list() == [
        1,
        8,
        32,
    ]
    for bad in (
        {"batch_sizes": "1,x"},
        {"batch_sizes": "0"},
        {"events": 0},
        {"content": "png"},
        {"open_loop_fraction": 0.0},
        {"seconds_per_ort_point": 0},
        {"device": "tpu"},
    ):
        with pytest.raises(ConfigError):
            BenchConfig.from_mapping({**base, **bad})


def test_bench_cli_flags_and_env_map_onto_the_config() -> None:
    parser = build_parser({"MMSTREAM_EVENTS": "123"})
    args = parser.parse_args(
        ["bench", "--bootstrap-servers", "b:1", "--model", "m", "--batch-sizes", "2,4", "--profile"]
    )
    settings = {k: v for k, v in vars(args).items() if k not in ("command", "handler", "known_env")}
    config = BenchConfig.from_mapping(settings)
    assert config.events == 123 and config.profile and config.batch_size_list() == [2, 4, 32]
    assert config.out == Path(".cache/bench")


def test_percentiles_of_nothing_and_something() -> None:
    assert percentiles([]).n == 0
    p = percentiles([1.0, 2.0, 3.0, 4.0])
    assert p.n == 4 and p.p50 == 2.5 and p.max == 4.0
