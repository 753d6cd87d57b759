"""Models teams bring, served end to end from raw media against the real broker.

(a) a Keras fused model whose text side takes ``input_ids`` and ``attention_mask`` from a
WordPiece tokenizer trained here (through ``export``: tf2onnx and its parity check);
(b) an ONNX graph written with the ``onnx`` helpers (no framework: imported as it is)
taking a mean/std-normalised NCHW center crop, ``input_ids`` + ``attention_mask`` and a
raw 16 kHz waveform, with a sample-rate constant, logits, an embedding and multi-label
tags; (c) the reference model. Media as phones send them: an EXIF-rotated JPEG, WebP,
HEIC and PNG images; FLAC, MP3, Opus and float-WAV audio. Every prediction equals
offline ONNX Runtime on the same preprocessing (<= 1e-5); for (b) that preprocessing is
computed here independently (the tokenizer's own encode, Pillow's resize and numpy for
the crop and mean/std, soundfile and soxr for the audio). Bad media are dead-lettered
with their reason; nothing is lost.
"""

from __future__ import annotations

import importlib.util
import io
import json
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image, ImageOps

from worker.contract.manifest import MODEL_FILE, Manifest, load_manifest
from worker.contract.records import RawRecord, SourceRef
from worker.contract.reference_data import dtmf, phrase
from worker.contract.transforms.media import audio_bytes, image_bytes
from worker.core.decode import Limits, decode_record
from worker.tools.produce import npz_bytes

from byom_models import IMAGE, onnx_multimodal
from kafka_broker import committed_offsets, end_offsets, read_topic
from test_worker_kafka import DLQ_SCHEMA, PREDICTION_SCHEMA, RunningWorker, make_config, send_all

pytestmark = [pytest.mark.integration]

Rec = tuple[str, str, bytes, str]  # key, part, value, content type
IMAGE_TYPES = ("image/jpeg+exif", "image/webp", "image/heic", "image/png")
AUDIO_TYPES = ("audio/flac", "audio/mpeg", "audio/opus", "audio/wav+float")


@pytest.fixture(scope="module")
def onnx_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from export.onnx_import import import_onnx

    d = tmp_path_factory.mktemp("byom-onnx")
    import_onnx(onnx_multimodal(d / "src"), d / "model")
    return d / "model"


@pytest.fixture(scope="module")
def keras_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if importlib.util.find_spec("tensorflow") is None:
        pytest.skip("needs the export extra (tensorflow, tf2onnx)")
    from export.convert import export_model

    from byom_models import keras_wordpiece

    d = tmp_path_factory.mktemp("byom-keras")
    export_model(keras_wordpiece(d / "src"), d / "model", parity_batch_sizes=(1, 5))
    return d / "model"


# ---------------------------------------------------------------- media as phones send it


def _image(kind: str, rng: np.random.Generator) -> tuple[bytes, str]:
    """A photo-like picture (a digit on a gradient, 60x48: under twice (b)'s crop, so no
    reduced-scale JPEG decode) in one of :data:`IMAGE_TYPES`."""
    h, w = 48, 60
    y, x = np.mgrid[0:h, 0:w]
    pixels = np.stack([x * 4, y * 5, (x + y) * 2], -1) + rng.integers(0, 40, (h, w, 3))
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    if kind == "image/jpeg+exif":  # stored turned, with the tag that turns it back
        exif = Image.Exif()
        exif[0x0112] = 6
        stored = img.transpose(Image.Transpose.ROTATE_90)
        return image_bytes(stored, "JPEG", exif=exif.tobytes(), quality=92), "image/jpeg"
    fmt = {"image/webp": "WEBP", "image/heic": "HEIF", "image/png": "PNG"}[kind]
    return image_bytes(img, fmt), kind


def _audio(kind: str, rng: np.random.Generator) -> tuple[bytes, str]:
    """A DTMF tone of 0.5-1.2 s in one of :data:`AUDIO_TYPES` (Opus at 48 kHz, float WAV
    at 44.1 kHz: both resampled by the worker)."""
    digit = int(rng.integers(10))
    if kind == "audio/opus":
        wave = dtmf(digit, rng, sample_rate=48000, duration_s=float(rng.uniform(0.5, 1.2)))
        return audio_bytes(wave, 48000, "audio/opus"), kind
    if kind == "audio/wav+float":
        wave = dtmf(digit, rng, sample_rate=44100, duration_s=0.8)
        return audio_bytes(wave, 44100, "audio/wav", "FLOAT"), "audio/wav"
    wave = dtmf(digit, rng, duration_s=float(rng.uniform(0.5, 1.2)))
    return audio_bytes(wave, 16000, kind), kind


def raw_events(manifest: Manifest, n: int, seed: int) -> list[Rec]:
    """``n`` events of raw media, the formats cycling over the events."""
    rng = np.random.default_rng(seed)
    records: list[Rec] = []
    for i in range(n):
        key = f"ev-{i:03d}"
        for part in manifest.parts:
            family = part.transform.family
            if family == "image":
                value, ctype = _image(IMAGE_TYPES[i % len(IMAGE_TYPES)], rng)
            elif family == "audio":
                value, ctype = _audio(AUDIO_TYPES[i % len(AUDIO_TYPES)], rng)
            else:
                value, ctype = phrase(i % 10, rng).encode(), "text/plain; charset=utf-8"
            records.append((key, part.name, value, ctype))
    return records


def serve(
    bootstrap: str,
    topic_factory: Callable[..., str],
    model_dir: Path,
    records: list[Rec],
    *,
    predictions: int,
    dead_letters: int,
    kafka_client: str = "kafka-python",
) -> tuple[dict[str, Any], list[Any], tuple[str, str, str]]:
    """Run a worker on ``records`` (shuffled) until it has published what is expected."""
    topics = (topic_factory(2), topic_factory(1), topic_factory(1))
    random.Random(1).shuffle(records)
    config = make_config(
        bootstrap, topics, model_dir, kafka_client=kafka_client, assembly_timeout_ms=1500
    )
    with RunningWorker(config):
        send_all(bootstrap, topics[0], records)
        out = read_topic(bootstrap, topics[1], lambda got: len(got) >= predictions, 90)
        dlq = read_topic(bootstrap, topics[2], lambda got: len(got) >= dead_letters, 60)
        time.sleep(0.5)  # a duplicate would show up
    out = read_topic(bootstrap, topics[1], lambda got: False, 1.0)
    by_key = {r.key.decode(): json.loads(r.value) for r in out}
    assert len(by_key) == len(out) == predictions, "exactly one prediction per event"
    for pred in by_key.values():
        jsonschema.validate(pred, PREDICTION_SCHEMA)
    assert committed_offsets(bootstrap, config.group_id, topics[0], 2) == end_offsets(
        bootstrap, topics[0], 2
    )
    return by_key, dlq, topics


def offline(manifest: Manifest, model_dir: Path, records: list[Rec]) -> dict[str, dict[str, Any]]:
    """Each event's outputs from ONNX Runtime on the tensors the worker's decode makes of
    the same bytes (the one implementation of each transform), one event at a time."""
    session = ort.InferenceSession(str(model_dir / MODEL_FILE), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    feeds: dict[str, dict[str, Any]] = {}
    for key, part_name, value, ctype in records:
        headers = (("mm-modality", part_name.encode()), ("content-type", ctype.encode()))
        record = RawRecord(SourceRef("offline", 0, 0, 0), key.encode(), value, headers)
        feeds.setdefault(key, {}).update(decode_record(record, manifest, Limits()).tensors)
    out = {}
    for key, feed in feeds.items():
        batch = {k: v[None] for k, v in feed.items()}
        batch.update({c.input.name: c.array for c in manifest.constants})
        out[key] = dict(zip(names, session.run(names, batch), strict=True))
    return out


def assert_same(by_key: dict[str, Any], want: dict[str, dict[str, Any]], output: str) -> None:
    assert set(by_key) == set(want)
    for key, pred in by_key.items():
        got = np.asarray(pred["outputs"][output], np.float64)
        diff = float(np.max(np.abs(got - want[key][output][0])))
        assert diff <= 1e-5, (key, output, diff)


# ---------------------------------------------------------------- (b) the ONNX graph


def independent_b(records: list[Rec], tokenizer: Path) -> dict[str, dict[str, np.ndarray]]:
    """(b)'s inputs computed here without the transforms: the tokenizer's own encode,
    Pillow + numpy for the crop and mean/std, soundfile + soxr + numpy for the audio."""
    import soundfile as sf
    import soxr
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer))
    tok.enable_truncation(max_length=16)
    tok.enable_padding(length=16, pad_id=0, pad_token="[PAD]")
    mean, std = np.array(IMAGE["mean"], np.float32), np.array(IMAGE["std"], np.float32)
    feeds: dict[str, dict[str, np.ndarray]] = {}
    for key, part, value, ctype in records:
        feed = feeds.setdefault(key, {"sample_rate": np.array(16000, np.int64)})
        if ctype == "application/x-npz":  # preprocessed by the producer: taken as it is
            feed.update({k: v[None] for k, v in np.load(io.BytesIO(value)).items()})
        elif part == "photo":
            img = ImageOps.exif_transpose(Image.open(io.BytesIO(value))).convert("RGB")
            w, h = img.size  # torchvision's Resize(36): the longer side truncated
            size = (36, int(36 * h / w)) if w <= h else (int(36 * w / h), 36)
            arr = np.asarray(img.resize(size, Image.Resampling.BILINEAR), np.float32)
            top, left = round((size[1] - 32) / 2), round((size[0] - 32) / 2)
            crop = arr[top : top + 32, left : left + 32] / 255.0
            feed["pixel_values"] = ((crop - mean) / std).transpose(2, 0, 1)[None]
        elif part == "caption":
            enc = tok.encode(value.decode())
            feed["input_ids"] = np.array([enc.ids], np.int64)
            feed["attention_mask"] = np.array([enc.attention_mask], np.int64)
        else:
            data, rate = sf.read(io.BytesIO(value), dtype="float32", always_2d=True)
            wave = np.clip(data.mean(axis=1), -1.0, 1.0)  # full scale, as documented
            if rate != 16000:
                wave = soxr.resample(wave, rate, 16000)
            wave = wave[:16000]
            wave = (wave - wave.mean()) / np.sqrt(wave.var() + 1e-7)
            feed["audio"] = np.pad(wave, (0, 16000 - len(wave))).astype(np.float32)[None]
    return feeds


def bad_media_b() -> tuple[list[Rec], dict[str, int]]:
    """Hostile and wrong parts for (b), and the dead letters they give: each bad part is
    dead-lettered with its reason, and its event's other parts then time out."""
    big = image_bytes(Image.new("L", (5000, 5000)), "PNG")  # 25 Mpx declared, a small file
    ten_minutes = audio_bytes(np.zeros(600 * 8000, np.float32), 8000, "audio/flac")
    flac = audio_bytes(np.zeros(8000, np.float32), 16000, "audio/flac")
    good = {
        "photo": _image("image/png", np.random.default_rng(9)),
        "caption": (b"the number seven", "text/plain"),
        "voice": _audio("audio/flac", np.random.default_rng(9)),
    }
    bad = {
        "bomb": ("photo", big, "image/png"),
        "long": ("voice", ten_minutes, "audio/flac"),
        "cut": ("voice", flac[: len(flac) // 3] + b"\x00" * 10, "audio/flac"),
        "tiff": ("photo", image_bytes(Image.new("RGB", (8, 8)), "TIFF"), "image/png"),
        "npy": ("caption", np.zeros(16, np.int64).tobytes(), "application/x-npy"),
        "npz": ("caption", npz_bytes({"input_ids": np.zeros(16, np.int64)}), "application/x-npz"),
    }
    records: list[Rec] = []
    for key, (part, value, ctype) in bad.items():
        records.append((f"bad-{key}", part, value, ctype))
        for other, (good_value, good_type) in good.items():
            if other != part:
                records.append((f"bad-{key}", other, good_value, good_type))
    reasons = {
        "payload_too_large": 2,  # bomb, long
        "decode_error": 1,  # cut
        "unsupported_content_type": 2,  # tiff, npy for a part filling two inputs
        "shape_mismatch": 1,  # npz without attention_mask
        "incomplete_event": 2 * len(bad),  # the good parts of each, once it times out
    }
    return records, reasons


def test_b_an_onnx_graph_is_served_from_raw_media(
    kafka_bootstrap: str,
    topic_factory: Callable[..., str],
    onnx_model_dir: Path,
    kafka_client: str,
) -> None:
    manifest = load_manifest(onnx_model_dir)
    good = raw_events(manifest, 12, seed=2)
    # One event whose text comes preprocessed: the two inputs of its part as one npz.
    tok = manifest.part("caption").transform  # type: ignore[union-attr]
    enc = tok.apply("the number 3")
    pre = [r for r in raw_events(manifest, 1, seed=3) if r[1] != "caption"]
    pre = [("pre-000", p, v, c) for _, p, v, c in pre]
    arrays = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    pre.append(("pre-000", "caption", npz_bytes(arrays), "application/x-npz"))
    bad, reasons = bad_media_b()
    by_key, dlq, _topics = serve(
        kafka_bootstrap,
        topic_factory,
        onnx_model_dir,
        [*good, *pre, *bad],
        predictions=13,
        dead_letters=sum(reasons.values()),
        kafka_client=kafka_client,
    )
    assert set(by_key) == {f"ev-{i:03d}" for i in range(12)} | {"pre-000"}

    # The worker's outputs equal ONNX Runtime's on inputs computed independently here.
    session = ort.InferenceSession(
        str(onnx_model_dir / MODEL_FILE), providers=["CPUExecutionProvider"]
    )
    names = [o.name for o in session.get_outputs()]
    feeds = independent_b([*good, *pre], onnx_model_dir / "tokenizer.json")
    for key, pred in by_key.items():
        want = dict(zip(names, session.run(names, feeds[key]), strict=True))
        for name in names:
            diff = np.max(np.abs(np.asarray(pred["outputs"][name]) - want[name][0]))
            assert diff <= 1e-5, (key, name, diff)
        logits = want["logits"][0]
        assert pred["label"] == ["cat", "dog", "bird"][int(np.argmax(logits))]
        soft = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        assert pred["score"] == pytest.approx(float(soft.max()), abs=1e-6)
        names_over = zip(["loud", "bright", "wordy", "dark"], want["tags"][0], strict=True)
        tags = [t for t, v in names_over if v >= 0.5]
        assert pred["tags"] == {"tags": tags}
        assert pred["modalities"] == ["caption", "photo", "voice"]
    # ... and the transforms' own offline run (the same code) agrees too.
    assert_same(by_key, offline(manifest, onnx_model_dir, [*good, *pre]), "embedding")

    counts: dict[str, int] = {}
    for r in dlq:
        headers = {k: v.decode() for k, v in r.headers}
        jsonschema.validate(headers, DLQ_SCHEMA)
        counts[headers["mm-error"]] = counts.get(headers["mm-error"], 0) + 1
    assert counts == reasons, counts


# ---------------------------------------------------------------- (a) Keras + WordPiece


@pytest.mark.slow
def test_a_a_keras_model_with_a_wordpiece_tokenizer_is_served_from_raw_media(
    kafka_bootstrap: str, topic_factory: Callable[..., str], keras_model_dir: Path
) -> None:
    manifest = load_manifest(keras_model_dir)
    assert manifest.part("text").transform.kind == "tokenizer"  # type: ignore[union-attr]
    assert {i.name: i.dtype for i in manifest.inputs}["input_ids"] == "int32"
    assert set(manifest.files) == {"tokenizer.json"}
    records = raw_events(manifest, 12, seed=4)
    by_key, dlq, _ = serve(
        kafka_bootstrap, topic_factory, keras_model_dir, list(records), predictions=12,
        dead_letters=0,
    )  # fmt: skip
    assert dlq == []
    assert_same(by_key, offline(manifest, keras_model_dir, records), "probabilities")


# ---------------------------------------------------------------- (c) the reference model


def test_c_the_reference_model_is_served_from_phone_media(
    kafka_bootstrap: str, topic_factory: Callable[..., str], tiny_model_dir: Path
) -> None:
    manifest = load_manifest(tiny_model_dir)
    records = raw_events(manifest, 12, seed=5)
    by_key, dlq, _ = serve(
        kafka_bootstrap, topic_factory, tiny_model_dir, list(records), predictions=12,
        dead_letters=0,
    )  # fmt: skip
    assert dlq == []
    assert_same(by_key, offline(manifest, tiny_model_dir, records), "probabilities")
