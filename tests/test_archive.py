"""Archives of input parts: topic -> file -> topic, exact ranges, the file format, errors."""

from __future__ import annotations

import base64
import contextlib
import gzip
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.serializer import Serializer

from worker.backfill import archive_copy
from worker.backfill.archive_copy import ArchiveConfig, archive_range, restore_file
from worker.backfill.ranges import PartitionRange, format_time, resolve_ranges
from worker.cli.main import main
from worker.config import KafkaSecurity
from worker.contract.errors import BrokerError, ConfigError
from worker.edge.kafka_python import KafkaPythonClients

from fake_kafka import spy_on_pacing
from kafka_broker import end_offsets

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = json.loads((ROOT / "schemas" / "archive-record.schema.json").read_text())

# partition, key, value, headers, timestamp (ms)
Sent = tuple[int, bytes | None, bytes | None, list[tuple[str, bytes]], int]
# key, value, headers, timestamp, timestamp type
Seen = tuple[bytes | None, bytes | None, list[tuple[str, bytes]], int]


class _NoKey:
    pass


NO_KEY = _NoKey()


class _KeyOrNull(Serializer):  # type: ignore[misc]
    """kafka-python refuses key=None with value=None; a sentinel key serializes to null."""

    def serialize(self, topic: str, headers: Any, data: Any) -> Any:
        return None if data is NO_KEY else data


def produce(bootstrap: str, topic: str, records: list[Sent]) -> None:
    producer = KafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=5, key_serializer=_KeyOrNull()
    )
    try:
        futures = [
            producer.send(
                topic,
                key=NO_KEY if key is None else key,
                value=value,
                headers=headers,
                partition=part,
                timestamp_ms=ts,
            )
            for part, key, value, headers, ts in records
        ]
        producer.flush(timeout=30)
        for f in futures:
            f.get(timeout=1)
    finally:
        producer.close(timeout=5)


def consume_all(bootstrap: str, topic: str, partitions: int) -> dict[int, list[Seen]]:
    """Every record of ``topic``, per partition in offset order."""
    tps = [TopicPartition(topic, p) for p in range(partitions)]
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    try:
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        ends = consumer.end_offsets(tps)
        out: dict[int, list[Seen]] = {p: [] for p in range(partitions)}
        deadline = time.monotonic() + 20
        while any(consumer.position(tp) < ends[tp] for tp in tps):
            assert time.monotonic() < deadline, "could not read the topic back"
            for tp, recs in consumer.poll(timeout_ms=200).items():
                out[tp.partition] += [
                    (r.key, r.value, list(r.headers or []), r.timestamp) for r in recs
                ]
        return out
    finally:
        consumer.close()


def sample_records(n: int, partitions: int, base_ms: int) -> list[Sent]:
    """Keys incl. None, values incl. None / empty / binary, headers incl. repeats and empties."""
    records: list[Sent] = []
    for i in range(n):
        key = None if i % 17 == 0 else b"ev-%d\x00\xff" % (i // 3)
        if i % 13 == 0:
            value: bytes | None = None  # tombstone (i = 0, 221: with no key either)
        elif i % 11 == 0:
            value = b""
        else:
            value = bytes((i * 7 + j) % 256 for j in range(i % 40 + 1))
        headers: list[tuple[str, bytes]] = []
        if i % 4:
            headers = [
                ("mm-modality", b"image"),
                ("dup", b"1"),
                ("empty", b""),
                ("dup", b"2"),
                ("bin", bytes([0, 255, i % 256])),
            ]
        if i % 5 == 0:
            headers.append(("n\u00e4me", "v\u00e4lue".encode()))
        records.append((i % partitions, key, value, headers, base_ms + i * 10))
    return records


def expected(records: list[Sent], partitions: int) -> dict[int, list[Seen]]:
    out: dict[int, list[Seen]] = {p: [] for p in range(partitions)}
    for part, key, value, headers, ts in records:
        out[part].append((key, value, headers, ts))
    return out


def read_lines(path: Path) -> list[dict[str, Any]]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def archive_config(monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> ArchiveConfig:
    """The config ``mmstream archive ARGV`` runs with (parsed by the real CLI; nothing read)."""
    seen: list[ArchiveConfig] = []

    def run_archive(config: ArchiveConfig) -> dict[str, Any]:
        seen.append(config)
        return {}

    monkeypatch.setattr(archive_copy, "run_archive", run_archive)
    assert main(["archive", *argv]) == 0
    (config,) = seen
    return config


def base_ms() -> int:
    # Recent (time-based retention keeps it), in the past, whole seconds.
    return (int(time.time()) - 600) * 1000


# ------------------------------------------------------------------ against the broker


@pytest.mark.integration
def test_round_trip_keeps_keys_values_headers_timestamps_and_order(
    kafka_bootstrap: str, topic_factory: Callable[..., str], tmp_path: Path, kafka_client: str
) -> None:
    client = KafkaSecurity(kafka_client=kafka_client)
    source, target = topic_factory(3), topic_factory(3)
    records = sample_records(300, 3, base_ms())
    produce(kafka_bootstrap, source, records)
    want = expected(records, 3)
    assert consume_all(kafka_bootstrap, source, 3) == want  # the fixture itself is right

    ranges = _resolve(kafka_bootstrap, source)
    out = tmp_path / "parts.jsonl.gz"
    summary = archive_range(kafka_bootstrap, source, ranges, out, security=client)
    assert summary["records"] == 300 and summary["bytes"] == out.stat().st_size
    assert [p["records"] for p in summary["partitions"]] == [100, 100, 100]
    assert out.read_bytes()[:2] == b"\x1f\x8b"  # gzip
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # no temp file left

    lines = read_lines(out)
    assert lines[0]["mmstream_archive"] == 1 and lines[0]["topic"] == source
    order = [(r["partition"], r["offset"]) for r in lines[1:]]
    assert order == sorted(order) and len(order) == 300  # partition, then offset order

    restored = restore_file(out, kafka_bootstrap, target, security=client)
    assert restored["records"] == 300
    assert restored["partitions"] == [{"partition": p, "records": 100} for p in range(3)]
    assert consume_all(kafka_bootstrap, target, 3) == want

    validator = Draft202012Validator(SCHEMA)
    for number, obj in enumerate(lines, start=1):
        errors = [e.message for e in validator.iter_errors(obj)]
        assert not errors, f"line {number}: {errors}"


@pytest.mark.integration
def test_time_window_and_offset_ranges_via_the_cli_flags(
    kafka_bootstrap: str,
    topic_factory: Callable[..., str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    kafka_client: str,
) -> None:
    topic = topic_factory(3)
    t0 = base_ms()
    # Record i: partition i % 3, timestamp t0 + i s; the window holds i = 20..39.
    records: list[Sent] = [(i % 3, b"k%d" % i, b"v%d" % i, [], t0 + i * 1000) for i in range(60)]
    produce(kafka_bootstrap, topic, records)
    out = tmp_path / "window.jsonl"
    common = [
        *("--bootstrap-servers", kafka_bootstrap, "--source-topic", topic),
        *("--kafka-client", kafka_client),
    ]
    window = ["--from", format_time(t0 + 20_000), "--to", format_time(t0 + 40_000)]
    assert main(["archive", *common, *window, "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["records"] == 20

    lines = read_lines(out)
    got = sorted((r["timestamp"], r["partition"]) for r in lines[1:])
    assert got == [(t0 + i * 1000, i % 3) for i in range(20, 40)]
    assert lines[0]["ranges"] == [
        {"partition": p, "start": (20 - p + 2) // 3, "end": (40 - p + 2) // 3} for p in range(3)
    ]

    # Explicit offsets: only the partitions named, END exclusive.
    out2 = tmp_path / "offsets.jsonl"
    offsets = ["--range", "0:2-5", "--range", "2:-2"]
    assert main(["archive", *common, *offsets, "--out", str(out2)]) == 0
    capsys.readouterr()
    got2 = [(r["partition"], r["offset"], r["value"]) for r in read_lines(out2)[1:]]
    assert got2 == [
        (p, off, base64.b64encode(b"v%d" % (off * 3 + p)).decode())
        for p, off in [(0, 2), (0, 3), (0, 4), (2, 0), (2, 1)]
    ]


@pytest.mark.integration
def test_dry_run_writes_nothing_and_leaves_no_group(
    kafka_bootstrap: str,
    topic_factory: Callable[..., str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    topic = topic_factory(3)
    produce(kafka_bootstrap, topic, [(i % 3, b"k", b"v", [], base_ms() + i) for i in range(30)])
    before_ends = end_offsets(kafka_bootstrap, topic, 3)
    with contextlib.closing(KafkaAdminClient(bootstrap_servers=kafka_bootstrap)) as admin:
        groups_before = {g["group_id"] for g in admin.list_groups()}
        out = tmp_path / "never.jsonl"
        argv = ["--bootstrap-servers", kafka_bootstrap, "--source-topic", topic]
        assert main(["archive", *argv, "--out", str(out), "--dry-run"]) == 0
        printed = capsys.readouterr().out.strip().splitlines()
        assert len(printed) == 1
        summary = json.loads(printed[0])
        assert summary["dry_run"] is True and summary["records"] == 30
        assert [
            (p["partition"], p["start"], p["end"], p["records"]) for p in summary["partitions"]
        ] == [(p, 0, 10, 10) for p in range(3)]
        assert not out.exists() and list(tmp_path.iterdir()) == []
        assert end_offsets(kafka_bootstrap, topic, 3) == before_ends
        new_groups = {g["group_id"] for g in admin.list_groups()} - groups_before
        for group in new_groups:  # other tests may run: only ours would name this topic
            offsets = admin.list_group_offsets(group).get(group, {})
            assert not any(tp.topic == topic for tp in offsets), group


@pytest.mark.integration
def test_restore_refuses_a_topic_with_too_few_partitions(
    kafka_bootstrap: str, topic_factory: Callable[..., str], tmp_path: Path
) -> None:
    source, small = topic_factory(3), topic_factory(1)
    produce(kafka_bootstrap, source, [(p, b"k", b"v", [], base_ms()) for p in range(3)])
    out = tmp_path / "a.jsonl"
    archive_range(kafka_bootstrap, source, _resolve(kafka_bootstrap, source), out)
    with pytest.raises(ConfigError, match=r"has 1 partition.*at least 3"):
        restore_file(out, kafka_bootstrap, small)
    with pytest.raises(ConfigError, match="does not exist"):
        restore_file(out, kafka_bootstrap, f"{small}-missing")
    assert end_offsets(kafka_bootstrap, small, 1) == {0: 0}


@pytest.mark.integration
def test_restore_paces_and_sends_null_header_values_as_empty(
    kafka_bootstrap: str,
    topic_factory: Callable[..., str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    kafka_client: str,
) -> None:
    paced = spy_on_pacing(monkeypatch)
    target = topic_factory(1)
    t0 = base_ms()
    path = tmp_path / "hand.jsonl"  # no header line: restore accepts that
    rows = [
        {
            "topic": "elsewhere",
            "partition": 0,
            "offset": i,
            "timestamp": t0 + i,
            "timestamp_type": "log_append",
            "key": None,
            "value": "AAE=",
            "headers": [["h", None]] if i == 3 else [],
        }
        for i in range(20)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    client = KafkaSecurity(kafka_client=kafka_client)
    summary = restore_file(path, kafka_bootstrap, target, rate=100, security=client)
    assert summary["records"] == 20 and summary["null_header_values"] == 1
    assert paced == [100.0] * 20  # each record through the one pacer, at --rate
    got = consume_all(kafka_bootstrap, target, 1)[0]
    assert got == [(None, b"\x00\x01", [("h", b"")] if i == 3 else [], t0 + i) for i in range(20)]


@pytest.mark.integration
def test_a_failed_archive_leaves_no_file(
    kafka_bootstrap: str, topic_factory: Callable[..., str], tmp_path: Path, kafka_client: str
) -> None:
    client = KafkaSecurity(kafka_client=kafka_client)
    topic = topic_factory(1)
    produce(kafka_bootstrap, topic, [(0, b"k", b"v", [], base_ms()) for _ in range(5)])
    out = tmp_path / "stalled.jsonl.gz"
    beyond_end = [PartitionRange(0, 0, 50, 0, 5)]  # offsets 5..49 never arrive
    with pytest.raises(BrokerError, match="no progress"):
        archive_range(kafka_bootstrap, topic, beyond_end, out, timeout_s=0.5, security=client)
    with pytest.raises(ConfigError, match=r"no partition \[3\]"):
        archive_range(kafka_bootstrap, topic, [PartitionRange(3, 0, 1, 0, 1)], out, security=client)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.integration
def test_a_range_start_deleted_from_the_log_is_an_error_not_a_skip(
    kafka_bootstrap: str, topic_factory: Callable[..., str], tmp_path: Path, kafka_client: str
) -> None:
    topic = topic_factory(1)
    produce(kafka_bootstrap, topic, [(0, b"k", b"v%d" % i, [], base_ms()) for i in range(10)])
    stale = [PartitionRange(0, 0, 10, 0, 10)]  # resolved before the deletion below
    with contextlib.closing(KafkaAdminClient(bootstrap_servers=kafka_bootstrap)) as admin:
        admin.delete_records({TopicPartition(topic, 0): 4}, timeout_ms=10_000)
    out = tmp_path / "gone.jsonl"
    client = KafkaSecurity(kafka_client=kafka_client)
    with pytest.raises(BrokerError, match=rf"{topic}/0") as info:
        archive_range(kafka_bootstrap, topic, stale, out, timeout_s=10, security=client)
    assert "no progress" not in str(info.value)  # refused at once, not timed out
    assert not out.exists()


def _resolve(bootstrap: str, topic: str) -> list[Any]:
    inspector = KafkaPythonClients().inspector(bootstrap, KafkaSecurity())
    try:
        return resolve_ranges(inspector, topic)
    finally:
        inspector.close()


# ------------------------------------------------------------------ no broker needed

GOOD = {
    "topic": "t",
    "partition": 0,
    "offset": 0,
    "timestamp": 1,
    "timestamp_type": "create",
    "key": "a2V5",
    "value": None,
    "headers": [["x", ""]],
}
HEADER = {"mmstream_archive": 1, "topic": "t", "created": "2026-01-01T00:00:00+00:00", "ranges": []}


@pytest.mark.parametrize(
    ("lines", "match"),
    [
        ([HEADER, GOOD, "{not json"], "line 3: not JSON"),
        ([GOOD, {**GOOD, "key": "a2V5!"}], "line 2: 'key' is not valid base64"),
        (
            [GOOD, {k: v for k, v in GOOD.items() if k != "headers"}],
            r"line 2: .*missing \['headers'\]",
        ),
        ([GOOD, {**GOOD, "partition": -1}], "line 2: 'partition' must be an integer"),
        ([GOOD, {**GOOD, "headers": [["x"]]}], r"line 2: headers\[0\]"),
        ([GOOD, HEADER], "line 2: a header record may only be line 1"),
        ([{**HEADER, "mmstream_archive": 2}], "line 1: archive format version 2"),
        ([GOOD, ""], "line 2: empty line"),
        ([GOOD, [1, 2]], "line 2: expected a JSON object"),
    ],
)
def test_malformed_archive_is_a_config_error_naming_the_line(
    tmp_path: Path, lines: list[Any], match: str
) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    with pytest.raises(ConfigError, match=match) as info:
        restore_file(path, "127.0.0.1:1", "t")  # fails before connecting
    assert "\n" not in str(info.value)


def test_broken_gzip_and_missing_file_are_config_errors(tmp_path: Path) -> None:
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(gzip.compress((json.dumps(GOOD) + "\n").encode() * 50)[:-20])
    with pytest.raises(ConfigError, match="gzip"):
        restore_file(path, "127.0.0.1:1", "t")
    with pytest.raises(ConfigError, match="no such file"):
        restore_file(tmp_path / "nope.jsonl", "127.0.0.1:1", "t")


def test_schema_is_valid_and_accepts_both_line_kinds() -> None:
    Draft202012Validator.check_schema(SCHEMA)
    validator = Draft202012Validator(SCHEMA)
    assert validator.is_valid(GOOD) and validator.is_valid(HEADER)
    assert not validator.is_valid({**GOOD, "extra": 1})
    assert not validator.is_valid({**GOOD, "value": "not base64!"})
    assert not validator.is_valid({**GOOD, "timestamp_type": "other"})


def test_archive_config_is_strict(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = {"bootstrap_servers": "b:9092", "source_topic": "t", "out": tmp_path / "a.jsonl"}
    cfg = ArchiveConfig.from_mapping(base)
    assert cfg.offsets() is None and cfg.window()[0] is None and not cfg.dry_run
    with pytest.raises(AttributeError):
        cfg.dry_run = True  # type: ignore[misc]
    with pytest.raises(ConfigError, match="unknown setting"):
        ArchiveConfig.from_mapping({**base, "dryrun": True})
    with pytest.raises(ConfigError, match="not both"):
        ArchiveConfig.from_mapping({**base, "ranges": ("0:1-2",), "from_time": "2026-01-01"})
    with pytest.raises(ConfigError, match="--out is required"):
        ArchiveConfig.from_mapping({**base, "out": None})
    with pytest.raises(ConfigError, match="ISO-8601"):
        ArchiveConfig.from_mapping({**base, "to_time": "yesterday"})
    with pytest.raises(ConfigError, match="PARTITION:START-END"):
        ArchiveConfig.from_mapping({**base, "ranges": ("0-1",)})
    with pytest.raises(ConfigError, match="does not exist"):
        ArchiveConfig.from_mapping({**base, "out": tmp_path / "no" / "a.jsonl"})
    # The command line: --out is a path; MMSTREAM_RANGE arrives as one string
    # (comma-separated); a --range flag replaces it.
    for name in [k for k in os.environ if k.startswith("MMSTREAM_")]:
        monkeypatch.delenv(name)
    argv = ["--bootstrap-servers", "b", "--source-topic", "t"]
    out = tmp_path / "a.jsonl"
    assert archive_config(monkeypatch, [*argv, "--out", str(out)]).out == out
    argv.append("--dry-run")
    monkeypatch.setenv("MMSTREAM_RANGE", "0:1-2, 1:5-")
    assert archive_config(monkeypatch, argv).ranges == ("0:1-2", "1:5-")
    flag_wins = archive_config(monkeypatch, [*argv, "--range", "2:0-1", "--range", "0:-9,1:4-"])
    assert flag_wins.offsets() == {2: (0, 1), 0: (None, 9), 1: (4, None)}
