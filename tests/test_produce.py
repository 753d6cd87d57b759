"""``mmstream produce`` as a fault generator: missing parts, poison records, the labels file.

The poison records are checked against the worker's own decode stage (each
must be refused with the reason code the labels file promises); the same
settings must give the same records; and one run against the real broker
must put on the topic exactly what the labels file and the summary say.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from worker.cli.main import build_parser
from worker.contract.errors import ConfigError, Reason, RecordError
from worker.contract.manifest import Manifest, load_manifest
from worker.contract.records import RawRecord, SourceRef
from worker.core.decode import Limits, decode_record
from worker.edge.kafka_python.records import to_raw
from worker.tools.produce import (
    POISON_KINDS,
    OutRecord,
    ProduceConfig,
    ProducePlan,
    build_plan,
    produce,
)

from factories import small_manifest
from fake_kafka import spy_on_pacing
from kafka_broker import read_topic

LIMITS = Limits()
MODALITIES = {"image", "text", "audio"}


def config(**kw: object) -> ProduceConfig:
    values: dict[str, object] = {"bootstrap_servers": "unused:9092", "topic": "t", **kw}
    return ProduceConfig.from_mapping(values)


def as_raw(rec: OutRecord, offset: int = 0) -> RawRecord:
    return RawRecord(SourceRef("t", 0, offset, 0), rec.key, rec.value, tuple(rec.headers()))


def by_event(plan: ProducePlan) -> dict[str, list[OutRecord]]:
    out: dict[str, list[OutRecord]] = defaultdict(list)
    for rec in plan.records:
        out[rec.event_id].append(rec)
    return out


def assert_poison_refused_with_its_reason(plan: ProducePlan, manifest: Manifest) -> None:
    """Each poisoned event: its bad record fails decoding with the promised reason, its
    other parts decode, and together they cover every input but ``poison_part``."""
    inputs = set(manifest.part_names)
    records = by_event(plan)
    seen: set[Reason] = set()
    for event in plan.events:
        assert event.poison is not None and event.poison_part in inputs, event
        recs = records[event.event_id]
        assert len(recs) == plan.parts_per_event == len(inputs)
        bad = [r for r in recs if r.poison is not None]
        assert len(bad) == 1 and bad[0].poison == event.poison
        if event.poison == Reason.MISSING_KEY:
            assert not bad[0].key
        with pytest.raises(RecordError) as info:
            decode_record(as_raw(bad[0]), manifest, LIMITS)
        assert info.value.reason == event.poison, info.value
        good = {decode_record(as_raw(r), manifest, LIMITS).name for r in recs if r not in bad}
        assert good == inputs - {event.poison_part}
        seen.add(event.poison)
    assert seen == set(POISON_KINDS)


@pytest.fixture
def small_model_dir(tmp_path: Path) -> Path:
    """A model directory holding only the manifest of the reference family (16x16 images)."""
    small_manifest(16).write(tmp_path)
    return tmp_path


@pytest.mark.parametrize("content", ["raw", "npy"])
def test_poison_records_are_refused_with_their_reason(content: str, small_model_dir: Path) -> None:
    plan = build_plan(config(count=10, content=content, model=small_model_dir, poison_fraction=1))
    assert_poison_refused_with_its_reason(plan, load_manifest(small_model_dir, verify=False))


def test_poison_without_a_model_is_refused_by_any_reference_model() -> None:
    # No --model: the shape_mismatch poison is an empty array, which fits no input.
    plan = build_plan(config(count=10, poison_fraction=1))
    assert_poison_refused_with_its_reason(plan, small_manifest(16))
    assert_poison_refused_with_its_reason(plan, small_manifest(64))


@pytest.mark.slow
@pytest.mark.parametrize("content", ["raw", "npy"])
def test_poison_records_are_refused_by_the_exported_models_manifest(
    content: str, tiny_model_dir: Path
) -> None:
    plan = build_plan(config(count=10, content=content, model=tiny_model_dir, poison_fraction=1))
    assert_poison_refused_with_its_reason(plan, load_manifest(tiny_model_dir))


def test_same_seed_same_records_and_faults_leave_the_rest_alone() -> None:
    cfg = config(count=50, seed=5, missing_fraction=0.2, poison_fraction=0.2, shuffle_window=8)
    plan = build_plan(cfg)
    assert build_plan(cfg) == plan
    assert build_plan(replace(cfg, seed=6)).records != plan.records

    counts = plan.counts()
    assert counts["missing"] == 10 and counts["clean"] == 30
    assert counts["poison"] == {str(k): 2 for k in POISON_KINDS}
    assert counts["parts"] == 3 * 50 - 10
    poisoned = [e.poison for e in plan.events if e.poison is not None]
    assert poisoned == [*POISON_KINDS, *POISON_KINDS]  # cycling, in event-id order
    assert not any(e.missing and e.poison for e in plan.events)

    records = by_event(plan)
    for e in plan.events:
        if e.missing is not None:
            assert {r.modality for r in records[e.event_id]} == MODALITIES - {e.missing}
    # Without faults: the same events with the same labels and, where untouched, the same bytes.
    clean = build_plan(replace(cfg, missing_fraction=0.0, poison_fraction=0.0))
    assert [(e.event_id, e.label) for e in clean.events] == [
        (e.event_id, e.label) for e in plan.events
    ]
    clean_records = by_event(clean)
    for e in plan.events:
        if e.clean:
            assert sorted(records[e.event_id], key=lambda r: r.modality) == sorted(
                clean_records[e.event_id], key=lambda r: r.modality
            )


@pytest.mark.parametrize(
    "bad",
    [
        {"missing_fraction": 1.5},
        {"poison_fraction": -0.1},
        {"missing_fraction": float("nan")},
        {"missing_fraction": 0.6, "poison_fraction": 0.5},
    ],
)
def test_fractions_out_of_range_are_config_errors(bad: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match="fraction"):
        config(**bad)


def test_fraction_flags_read_their_env_vars() -> None:
    env = {"MMSTREAM_MISSING_FRACTION": "0.25", "MMSTREAM_POISON_FRACTION": "0.5"}
    parser = build_parser(env)
    args = parser.parse_args(["produce", "--bootstrap-servers", "b", "--topic", "t"])
    assert args.missing_fraction == 0.25 and args.poison_fraction == 0.5
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    produce_parser = sub.choices["produce"]
    helps = {a.dest: a.help or "" for a in produce_parser._actions}
    assert "[env: MMSTREAM_MISSING_FRACTION]" in helps["missing_fraction"]
    assert "[env: MMSTREAM_POISON_FRACTION]" in helps["poison_fraction"]


def read_all(bootstrap: str, topic: str, n: int, timeout_s: float = 20) -> list[RawRecord]:
    return [to_raw(r) for r in read_topic(bootstrap, topic, lambda got: len(got) >= n, timeout_s)]


@pytest.mark.integration
def test_produced_topic_matches_labels_file_and_summary(
    kafka_bootstrap: str,
    topic_factory: Callable[..., str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    kafka_client: str,
) -> None:
    paced = spy_on_pacing(monkeypatch)
    topic = topic_factory(3)
    labels_path = tmp_path / "labels.jsonl"
    rate = 600.0
    summary = produce(
        ProduceConfig(
            bootstrap_servers=kafka_bootstrap,
            topic=topic,
            count=60,
            rate=rate,
            seed=4,
            missing_fraction=0.2,
            poison_fraction=0.1,
            labels_out=labels_path,
            kafka_client=kafka_client,
        )
    )
    labels = [json.loads(line) for line in labels_path.read_text().splitlines()]
    assert len(labels) == 60 and len({d["event_id"] for d in labels}) == 60
    missing = [d for d in labels if "missing" in d]
    poisoned = Counter(d["poison"] for d in labels if "poison" in d)
    assert len(missing) == 12 and sum(poisoned.values()) == 6
    assert summary["events"] == 60 and summary["missing"] == 12 and summary["clean"] == 42
    assert summary["poison"] == {str(k): poisoned[str(k)] for k in POISON_KINDS}
    assert set(poisoned) == {str(k) for k in POISON_KINDS}
    assert summary["parts"] == 3 * 60 - 12
    # Paced by the one pacer (its rate is tested with an injected clock), never timed here:
    # one call per part sent, at the event rate times the parts per event.
    assert len(paced) == summary["parts"]
    assert paced == [pytest.approx(rate * summary["parts"] / 60)] * len(paced)

    on_topic = read_all(kafka_bootstrap, topic, summary["parts"])
    assert len(on_topic) == summary["parts"]
    keyed: dict[str, list[RawRecord]] = defaultdict(list)
    keyless = []
    for rec in on_topic:
        if rec.key:
            keyed[rec.key.decode()].append(rec)
        else:
            keyless.append(rec)
    assert len(keyless) == poisoned[Reason.MISSING_KEY]
    assert set(keyed) == {d["event_id"] for d in labels}

    manifest = small_manifest(16)
    for d in labels:
        recs = keyed[d["event_id"]]
        good: set[str] = set()
        refused: list[Reason] = []
        for rec in recs:
            try:
                good.add(decode_record(rec, manifest, LIMITS).name)
            except RecordError as exc:
                refused.append(exc.reason)
        if "missing" in d:
            assert len(recs) == 2 and not refused and good == MODALITIES - {d["missing"]}
        elif "poison" in d:
            assert good == MODALITIES - {d["poison_part"]}
            expected = [] if d["poison"] == Reason.MISSING_KEY else [Reason(d["poison"])]
            assert refused == expected and len(recs) == 2 + len(expected)
        else:
            assert len(recs) == 3 and not refused and good == MODALITIES
    for rec in keyless:
        with pytest.raises(RecordError) as info:
            decode_record(rec, manifest, LIMITS)
        assert info.value.reason == Reason.MISSING_KEY


# ------------------------------------------------------------------ any model's parts


@pytest.fixture(scope="module")
def byom_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ONNX example (b): parts photo, caption (two inputs), voice (a waveform)."""
    from export.onnx_import import import_onnx

    from byom_models import onnx_multimodal

    d = tmp_path_factory.mktemp("byom")
    import_onnx(onnx_multimodal(d / "src"), d / "model")
    return d / "model"


@pytest.mark.parametrize("content", ["raw", "npy"])
def test_random_media_of_any_model_decode_in_the_worker(byom_dir: Path, content: str) -> None:
    plan = build_plan(
        config(
            model=byom_dir, media="random", content=content, count=6, poison_fraction=0.5,
            image_type="image/webp", audio_type="audio/flac",
        )
    )  # fmt: skip
    manifest = load_manifest(byom_dir)
    types: Counter[str] = Counter()
    for event in plan.events:
        assert event.label == ""  # random media: no true label
        for rec in by_event(plan)[event.event_id]:
            if rec.poison is not None:
                with pytest.raises(RecordError) as info:
                    decode_record(as_raw(rec), manifest, LIMITS)
                assert info.value.reason == rec.poison
                continue
            types[rec.content_type] += 1
            part = decode_record(as_raw(rec), manifest, LIMITS)
            assert set(part.tensors) == set(manifest.part(rec.modality).input_names)  # type: ignore[union-attr]
    if content == "raw":
        assert {"image/webp", "audio/flac", "text/plain; charset=utf-8"} == set(types)
    else:  # the caption fills two inputs: its tensors go as one npz
        assert {"application/x-npy", "application/x-npz"} == set(types)


def test_files_are_sent_as_they_are_one_directory_per_event(tmp_path: Path) -> None:
    for event in ("ev-b", "ev-a"):
        (tmp_path / event).mkdir()
        (tmp_path / event / "photo.JPG").write_bytes(b"\xff\xd8 jpeg bytes")
        (tmp_path / event / "caption.txt").write_text("a desk")
    plan = build_plan(config(media="files", media_dir=tmp_path, key_prefix="x-"))
    assert [e.event_id for e in plan.events] == ["x-ev-a", "x-ev-b"]
    recs = sorted((r.event_id, r.modality, r.content_type, r.value) for r in plan.records)
    assert recs[0] == ("x-ev-a", "caption", "text/plain; charset=utf-8", b"a desk")
    assert recs[1] == ("x-ev-a", "photo", "image/jpeg", b"\xff\xd8 jpeg bytes")
    (tmp_path / "ev-a" / "notes.docx").write_bytes(b"?")
    with pytest.raises(ConfigError, match=r"unknown extension '\.docx'"):
        build_plan(config(media="files", media_dir=tmp_path))
    with pytest.raises(ConfigError, match="go together"):
        config(media="files")
    with pytest.raises(ConfigError, match="needs --model"):
        config(media="random")
