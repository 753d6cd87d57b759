"""``mmstream replay`` against a real broker and the tiny exported model.

Parts are written with explicit record timestamps (CreateTime), so windows and
their edges are exact without sleeping.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from kafka import KafkaAdminClient, KafkaProducer

from worker.backfill.progress import Progress
from worker.backfill.ranges import format_time, parse_offset_ranges, parse_time
from worker.backfill.replay import BACKFILL_GROUP_PREFIX, ReplayConfig, run_replay
from worker.contract.errors import ConfigError
from worker.contract.manifest import load_manifest
from worker.contract.reference_data import samples
from worker.edge.kafka_python.admin import count_records
from worker.tools.produce import encode_sample

from kafka_broker import committed_offsets, end_offsets, read_topic

ROOT = Path(__file__).resolve().parents[1]
HOUR_AGO = int(time.time() * 1000) - 3_600_000


def send_timed(bootstrap: str, topic: str, records: list[tuple[str, str, bytes, str, int]]) -> None:
    """(key, modality, value, content type, timestamp ms), sent in order, acked."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    futures = [
        producer.send(
            topic,
            key=key.encode(),
            value=value,
            headers=[("mm-modality", modality.encode()), ("content-type", ctype.encode())],
            timestamp_ms=ts,
        )
        for key, modality, value, ctype, ts in records
    ]
    producer.flush()
    for f in futures:
        f.get(timeout=10)
    producer.close()


def events(
    model: Path, prefix: str, n: int, t0: int, step_ms: int, seed: int
) -> list[tuple[str, str, bytes, str, int]]:
    """``n`` events, parts of event i at t0 + i * step_ms (+0, +1, +2 ms), npy content."""
    manifest = load_manifest(model)
    out = []
    for i, s in enumerate(samples(n, np.random.default_rng(seed), split="test")):
        for j, (key, modality, value, ctype) in enumerate(
            encode_sample(f"{prefix}-{i:04d}", s, "npy", manifest)
        ):
            out.append((key, modality, value, ctype, t0 + i * step_ms + j))
    return out


def predictions(bootstrap: str, topic: str, timeout_s: float = 5.0) -> list[dict[str, Any]]:
    """Every prediction in ``topic`` now (read up to its end offsets)."""
    n = count_records(bootstrap, topic)
    return [
        json.loads(r.value)
        for r in read_topic(bootstrap, topic, lambda got: len(got) >= n, timeout_s)
    ]


def config(bootstrap: str, model: Path, source: str, out: str, **kw: Any) -> ReplayConfig:
    return ReplayConfig(
        bootstrap_servers=bootstrap,
        source_topic=source,
        model=model,
        output_topic=out,
        device="cpu",
        max_batch_size=8,
        progress="none",
        **kw,
    )


# ------------------------------------------------------------------ pure parts


def test_replay_config_rejects_what_it_cannot_do() -> None:
    base = {"bootstrap_servers": "b:9092", "source_topic": "in", "model": "m"}
    with pytest.raises(ConfigError, match="give a range"):
        ReplayConfig.from_mapping(base)
    with pytest.raises(ConfigError, match="not both"):
        ReplayConfig.from_mapping({**base, "from_time": "2026-01-01T00:00:00Z", "ranges": "0:1-"})
    with pytest.raises(ConfigError, match="ISO-8601"):
        ReplayConfig.from_mapping({**base, "from_time": "yesterday"})
    with pytest.raises(ConfigError, match="after --from"):
        ReplayConfig.from_mapping(
            {**base, "from_time": "2026-01-02T00:00:00Z", "to_time": "2026-01-01T00:00:00Z"}
        )
    with pytest.raises(ConfigError, match="PARTITION:START-END"):
        ReplayConfig.from_mapping({**base, "ranges": "zero:1-2"})
    with pytest.raises(ConfigError, match="must differ"):
        ReplayConfig.from_mapping({**base, "ranges": "0:1-", "output_topic": "in"})
    with pytest.raises(ConfigError, match="unknown setting"):
        ReplayConfig.from_mapping({**base, "ranges": "0:1-", "speed": 3})
    ok = ReplayConfig.from_mapping({**base, "from_time": "2026-11-28T10:00:00+01:00"})
    assert ok.output_topic == "in.backfill" and ok.dlq_topic == "in.backfill.dlq"
    assert ok.window() == (parse_time("2026-11-28T09:00:00Z", "--from"), None)
    assert parse_offset_ranges(["0:5-9", "2:-7", "3:4-"]) == {0: (5, 9), 2: (None, 7), 3: (4, None)}
    assert format_time(0) == "1970-01-01T00:00:00.000+00:00"


# ------------------------------------------------------------------ against the broker


@pytest.mark.integration
@pytest.mark.slow
def test_window_replay_predicts_what_the_live_worker_did_and_handles_the_edges(
    kafka_bootstrap: str,
    topic_factory: Callable[..., str],
    tiny_model_dir: Path,
    kafka_client: str,
) -> None:
    from test_worker_kafka import RunningWorker, make_config

    src, live_out, live_dlq = topic_factory(2), topic_factory(2), topic_factory(2)
    # Three blocks, a minute apart: A (before the window), B (inside), C (after).
    a = events(tiny_model_dir, "a", 12, HOUR_AGO, 100, seed=1)
    b = events(tiny_model_dir, "b", 20, HOUR_AGO + 120_000, 100, seed=2)
    c = events(tiny_model_dir, "c", 12, HOUR_AGO + 240_000, 100, seed=3)
    # Edge events: "early" has one part 300 ms before the window starts and the rest in
    # it (whole thanks to the margin, newest part inside: the window's); "late" has two
    # parts in it and its last part 300 ms after the end (the next window's).
    start, end = HOUR_AGO + 60_000, HOUR_AGO + 180_000
    early = events(tiny_model_dir, "edge-early", 1, start - 300, 0, seed=4)
    late = events(tiny_model_dir, "edge-late", 1, end - 600, 0, seed=5)
    early = [(*r[:4], start - 300 if i == 0 else start + 50 + i) for i, r in enumerate(early)]
    late = [(*r[:4], end + 300 if i == 2 else end - 600 + i) for i, r in enumerate(late)]
    # Incomplete events (a part never sent): "gap-in" inside the window (dead-lettered as
    # incomplete), "gap-out" in the margin after it (the next window's: only counted).
    gap_in = events(tiny_model_dir, "gap-in", 1, start + 5_000, 0, seed=10)[:2]
    gap_out = events(tiny_model_dir, "gap-out", 1, end + 200, 0, seed=11)[:2]
    send_timed(kafka_bootstrap, src, a + early + gap_in + b + late + gap_out + c)
    n_all = 12 + 20 + 12 + 2

    live_cfg = make_config(
        kafka_bootstrap, (src, live_out, live_dlq), tiny_model_dir, kafka_client=kafka_client
    )
    with RunningWorker(live_cfg):
        live = read_topic(kafka_bootstrap, live_out, lambda got: len(got) >= n_all, 60)
    live_by_id = {r.key.decode(): json.loads(r.value) for r in live}
    assert len(live_by_id) == n_all

    live_positions = committed_offsets(kafka_bootstrap, live_cfg.group_id, src, 2)
    out = topic_factory(2)
    summary = run_replay(
        config(
            kafka_bootstrap,
            tiny_model_dir,
            src,
            out,
            kafka_client=kafka_client,
            from_time=format_time(start),
            to_time=format_time(end),
            edge_margin_ms=1_000,
        )
    )
    replayed = {p["event_id"]: p for p in predictions(kafka_bootstrap, out)}
    expected = {f"b-{i:04d}" for i in range(20)} | {"edge-early-0000"}
    assert set(replayed) == expected
    for event_id, pred in replayed.items():
        ours = np.array(pred["outputs"]["probabilities"])
        theirs = np.array(live_by_id[event_id]["outputs"]["probabilities"])
        assert np.max(np.abs(ours - theirs)) <= 1e-6, event_id
        assert pred["label"] == live_by_id[event_id]["label"]
    assert summary["events_predicted"] == 21
    # edge-late (complete, newest part after the end) and gap-out (incomplete, after it)
    assert summary["outside_window"] == 2
    assert summary["incomplete_in_window"] == {"dlq": 1}  # gap-in
    assert summary["dead_lettered"] == {"incomplete_event": 2}  # gap-in's two parts
    # The live group's offsets were not moved; the backfill checkpoints in its own group.
    assert committed_offsets(kafka_bootstrap, live_cfg.group_id, src, 2) == live_positions
    group = BACKFILL_GROUP_PREFIX + summary["backfill_id"]
    positions = committed_offsets(kafka_bootstrap, group, src, 2)
    assert all(p is not None for p in positions.values()), positions

    # Explicit offsets: the whole topic, every event (the edges are ordinary events here).
    out2 = topic_factory(2)
    whole = run_replay(
        config(
            kafka_bootstrap,
            tiny_model_dir,
            src,
            out2,
            kafka_client=kafka_client,
            ranges="0:0-,1:0-",
            guarantee="exactly-once",
            on_incomplete="drop",
        )
    )
    assert whole["events_predicted"] == n_all
    assert whole["incomplete_in_window"] == {"drop": 2}
    assert {p["event_id"] for p in predictions(kafka_bootstrap, out2)} == set(live_by_id)


@pytest.mark.integration
@pytest.mark.slow
def test_dry_run_changes_nothing(
    kafka_bootstrap: str, topic_factory: Callable[..., str], tiny_model_dir: Path
) -> None:
    src = topic_factory(2)
    send_timed(kafka_bootstrap, src, events(tiny_model_dir, "d", 10, HOUR_AGO, 10, seed=6))
    out = f"{src}.never"
    plan = run_replay(
        config(kafka_bootstrap, tiny_model_dir, src, out, ranges="0:0-,1:0-", dry_run=True)
    )
    assert plan["dry_run"] is True and plan["records"] == 30
    assert sum(p["records"] for p in plan["partitions"]) == 30
    assert all(p["checkpoint"] is None for p in plan["partitions"])
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    try:
        topics = set(admin.list_topics())
        groups = {g["group_id"] for g in admin.list_groups()}
    finally:
        admin.close()
    assert out not in topics and f"{out}.dlq" not in topics
    assert BACKFILL_GROUP_PREFIX + plan["backfill_id"] not in groups


def _replay_argv(bootstrap: str, model: Path, src: str, out: str, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "worker.cli", "replay",
        "--bootstrap-servers", bootstrap,
        "--source-topic", src,
        "--output-topic", out,
        "--model", str(model),
        "--device", "cpu",
        "--range", "0:0-,1:0-",
        "--max-batch-size", "8",
        "--progress", "log",
        *extra,
    ]  # fmt: skip


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("MMSTREAM_")}


@pytest.mark.integration
@pytest.mark.slow
def test_a_killed_replay_resumes_and_completes(
    kafka_bootstrap: str,
    topic_factory: Callable[..., str],
    tiny_model_dir: Path,
    tmp_path: Path,
    record_property: Callable[[str, object], None],
    kafka_client: str,
) -> None:
    src, out = topic_factory(2), topic_factory(2)
    n = 160
    send_timed(kafka_bootstrap, src, events(tiny_model_dir, "k", n, HOUR_AGO, 10, seed=7))
    argv = _replay_argv(kafka_bootstrap, tiny_model_dir, src, out, "--kafka-client", kafka_client)
    log_path = tmp_path / "first.log"
    with log_path.open("wb") as log_file:
        first = subprocess.Popen(
            [*argv, "--rate", "20"], env=_env(), stdout=log_file, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 60
        while sum(end_offsets(kafka_bootstrap, out, 2).values()) < 24:
            assert time.monotonic() < deadline, log_path.read_text()[-2000:]
            time.sleep(0.1)
            assert first.poll() is None, log_path.read_text()[-2000:]
        first.send_signal(signal.SIGKILL)  # no drain, no final checkpoint
        first.wait(10)
    # Read up to the end offsets (it returns as soon as it has them; a 0.5 s limit once
    # ran out before the first fetch came back on a loaded machine).
    done_before = {p["event_id"] for p in predictions(kafka_bootstrap, out, 15.0)}
    assert 0 < len(done_before) < n

    second = subprocess.run(argv, env=_env(), capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr[-2000:]
    summary = json.loads(second.stdout.strip().splitlines()[-1])
    preds = predictions(kafka_bootstrap, out)
    ids = [p["event_id"] for p in preds]
    duplicates = len(ids) - len(set(ids))
    print(f"killed after {len(done_before)} of {n} events; {duplicates} duplicate predictions")
    record_property("duplicates", duplicates)
    assert set(ids) == {f"k-{i:04d}" for i in range(n)}  # every event predicted
    assert summary["resumed"] is True
    assert any(p["resumed_from"] for p in summary["partitions"])
    # It went on from the checkpoint: it did not predict everything a second time.
    assert summary["events_predicted"] < n


@pytest.mark.integration
@pytest.mark.slow
def test_a_paced_replay_predicts_every_event(
    kafka_bootstrap: str, topic_factory: Callable[..., str], tiny_model_dir: Path
) -> None:
    """--rate reaches the loop's admission; the rate itself is asserted with an injected
    clock (tests/test_loop.py), never with the wall clock."""
    src, out = topic_factory(2), topic_factory(2)
    n, rate = 120, 400.0
    send_timed(kafka_bootstrap, src, events(tiny_model_dir, "r", n, HOUR_AGO, 10, seed=8))
    summary = run_replay(
        config(kafka_bootstrap, tiny_model_dir, src, out, ranges="0:0-,1:0-", rate=rate),
        threading.Event(),
    )
    assert summary["events_predicted"] == n and summary["dead_lettered"] == {}
    print(f"--rate {rate:g}: {summary['events_per_s']} events/s over {summary['seconds']} s")


@pytest.mark.integration
@pytest.mark.slow
def test_live_and_replay_time_events_out_at_the_same_place_in_the_stream(
    kafka_bootstrap: str, topic_factory: Callable[..., str], tiny_model_dir: Path
) -> None:
    """Assembly runs in stream time: "split" has its first part 4 s of record time before
    the rest, past the 2 s timeout, although every part is read within milliseconds; the
    events between are whole. A wall-clock timeout would predict "split"."""
    from test_worker_kafka import RunningWorker, make_config

    src, live_out, live_dlq, out, dlq = (topic_factory(1) for _ in range(5))
    t0 = HOUR_AGO
    split = events(tiny_model_dir, "split", 1, t0, 0, seed=12)
    whole = events(tiny_model_dir, "whole", 8, t0 + 1_000, 400, seed=13)
    send_timed(kafka_bootstrap, src, split[:1] + whole + [(*r[:4], t0 + 4_000) for r in split[1:]])

    live_cfg = make_config(
        kafka_bootstrap, (src, live_out, live_dlq), tiny_model_dir, assembly_timeout_ms=2_000
    )
    with RunningWorker(live_cfg):
        # The split event's first part times out as the stream passes it; its two later
        # parts once the partition has been idle (read to its end) for the timeout.
        live_dead = read_topic(kafka_bootstrap, live_dlq, lambda got: len(got) >= 3, 60)
        live = read_topic(kafka_bootstrap, live_out, lambda got: len(got) >= 8, 30)
    summary = run_replay(
        config(
            kafka_bootstrap, tiny_model_dir, src, out,
            ranges="0:0-", dlq_topic=dlq, assembly_timeout_ms=2_000,
        )
    )  # fmt: skip
    replay_dead = read_topic(kafka_bootstrap, dlq, lambda got: len(got) >= 3, 30)

    def decided(preds: list[Any], dead: list[Any]) -> tuple[set[str], list[tuple[int, bytes]]]:
        predicted = {json.loads(r.value)["event_id"] for r in preds}
        reasons = sorted(
            (int(dict(r.headers)["mm-source"].split(b"/")[-1]), dict(r.headers)["mm-error"])
            for r in dead
        )
        return predicted, reasons

    expected = (
        {f"whole-{i:04d}" for i in range(8)},
        [(0, b"incomplete_event"), (25, b"incomplete_event"), (26, b"incomplete_event")],
    )
    assert decided(live, live_dead) == expected
    assert (
        decided(read_topic(kafka_bootstrap, out, lambda got: len(got) >= 8, 30), replay_dead)
        == expected
    )
    assert summary["events_predicted"] == 8 and summary["dead_lettered"] == {"incomplete_event": 3}


@pytest.mark.integration
@pytest.mark.slow
def test_an_archive_restored_by_replay_scores_like_the_original(
    kafka_bootstrap: str,
    topic_factory: Callable[..., str],
    tiny_model_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from worker.cli import main

    src, restored, out_a, out_b = (topic_factory(2) for _ in range(4))
    send_timed(kafka_bootstrap, src, events(tiny_model_dir, "z", 15, HOUR_AGO, 10, seed=9))
    archive = tmp_path / "parts.jsonl.gz"
    common = ["--bootstrap-servers", kafka_bootstrap]
    assert main(["archive", *common, "--source-topic", src, "--out", str(archive)]) == 0
    restore = ["replay", *common, "--source-file", str(archive), "--to-topic", restored]
    assert main([*restore, "--log-level", "WARNING"]) == 0
    score = [*common, "--model", str(tiny_model_dir), "--device", "cpu", "--progress", "none"]
    window = ["--from", format_time(HOUR_AGO - 1000), "--to", format_time(HOUR_AGO + 60_000)]
    for topic, out in ((src, out_a), (restored, out_b)):
        argv = ["replay", *score, "--source-topic", topic, "--output-topic", out, *window]
        assert main(argv) == 0
    capsys.readouterr()
    a = {p["event_id"]: p["outputs"] for p in predictions(kafka_bootstrap, out_a)}
    b = {p["event_id"]: p["outputs"] for p in predictions(kafka_bootstrap, out_b)}
    assert len(a) == 15 and a == b  # same keys, values, headers and timestamps: same scores

    # Scored straight from the file (a staging topic, deleted at the end).
    out_c = topic_factory(2)
    argv = ["replay", *score, "--source-file", str(archive), "--output-topic", out_c]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    c = {p["event_id"]: p["outputs"] for p in predictions(kafka_bootstrap, out_c)}
    assert c == a and summary["events_predicted"] == 15
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    try:
        deadline = time.monotonic() + 10
        while summary["staging_topic"] in set(admin.list_topics()):
            assert time.monotonic() < deadline, "staging topic not deleted"
            time.sleep(0.2)
    finally:
        admin.close()


def test_progress_bar_and_log_lines(caplog: pytest.LogCaptureFixture) -> None:
    import io

    bar = io.StringIO()
    p = Progress(total_records=300, mode="bar", parts_per_event=3, stream=bar)
    for i in range(150):
        p.consumed("image")
        if i % 3 == 0:
            p.predicted(None)
    p.update(final=True)
    text = bar.getvalue()
    assert "50%" in text and "150/300" in text and "50/~100 events" in text, text
    assert text.endswith("\n")
    now = [0.0]
    resumed = Progress(300, "log", 3, done_before=lambda: 240, clock=lambda: now[0])
    resumed.consumed("text")
    with caplog.at_level("INFO", logger="worker.backfill.progress"):
        resumed.update()  # within 10 s of the start: quiet
        now[0] = 11.0
        resumed.update()
    assert [r.getMessage() for r in caplog.records] == [
        "replay: 80.3% of 300 records, 0 of ~100 events predicted, 0.0 events/s, ETA 3 s"
    ]
    quiet = io.StringIO()
    Progress(total_records=300, mode="none", stream=quiet).update(final=True)
    assert quiet.getvalue() == ""


def test_replay_and_archive_take_the_workers_kafka_security(tmp_path: Path) -> None:
    import dataclasses

    from worker.backfill.archive_copy import ArchiveConfig
    from worker.cli.main import build_parser
    from worker.config import WorkerConfig
    from worker.ops.processes import child_config

    secret = tmp_path / "password"
    secret.write_text("s3cret\n")
    sasl = {
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_username": "backfill",
        "sasl_password_file": secret,
    }
    base = {"bootstrap_servers": "b:9092", "source_topic": "in", "model": "m", "ranges": "0:0-"}
    replay = ReplayConfig.from_mapping({**base, **sasl})
    assert replay.kafka_security()["sasl_plain_password"] == "s3cret"
    assert "s3cret" not in repr(replay)
    assert dataclasses.replace(replay, ranges=("1:0-",)).sasl_password == "s3cret"  # copies work
    with pytest.raises(ConfigError, match="sasl-username"):
        ReplayConfig.from_mapping({**base, **sasl, "sasl_username": ""})
    archive = ArchiveConfig.from_mapping(
        {"bootstrap_servers": "b:9092", "source_topic": "in", "dry_run": True, **sasl}
    )
    assert archive.kafka_security()["security_protocol"] == "SASL_SSL"
    # --processes children are copies too (a password file once made them fail).
    worker = WorkerConfig.from_mapping(
        {
            "bootstrap_servers": "b:9092",
            "input_topic": "i",
            "output_topic": "o",
            "group_id": "g",
            "model": "m",
            "processes": 2,
            **sasl,
        }
    )
    assert child_config(worker, 1).sasl_password == "s3cret"
    with pytest.raises(ConfigError, match="not both"):
        ReplayConfig.from_mapping({**base, **sasl, "sasl_password": "other"})
    parser = build_parser({})
    for command in ("replay", "archive", "worker"):
        sub = parser._subparsers._group_actions[0].choices[command]  # type: ignore[union-attr]
        helps = {a.dest: a.help or "" for a in sub._actions}
        assert "[env: MMSTREAM_SECURITY_PROTOCOL]" in helps["security_protocol"], command
        assert "sasl_password" not in helps, command  # the secret never is a flag
