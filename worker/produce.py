"""``mmstream produce``: reference-model events to the input topic, per the contract.

Each event is three records (image, text, audio) sharing a key. Parts are
shuffled within windows of ``shuffle_window`` events, so the parts of
different events interleave and arrive in any order. With ``--content raw``
parts are PNG / UTF-8 text / PCM16 WAV; with ``--content npy`` they are the
model's own tensors (``numpy.save``), preprocessed with the manifest's specs.
``--labels-out`` writes one JSON line per event (event id, true label) so
accuracy can be computed downstream.
"""

from __future__ import annotations

import io
import json
import logging
import time
import wave
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from kafka.errors import KafkaError
from PIL import Image

from worker.config import FrozenConfig
from worker.errors import BrokerError, ConfigError
from worker.kafka_io import make_producer
from worker.manifest import Manifest, load_manifest
from worker.records import (
    CONTENT_NPY,
    HEADER_CONTENT_TYPE,
    HEADER_EVENT_TIME,
    HEADER_MODALITY,
)
from worker.reference_data import SAMPLE_RATE, Sample, sample_tensors, samples

log = logging.getLogger(__name__)

Record = tuple[str, str, bytes, str]  # event id, modality, value, content type


@dataclass(frozen=True)
class ProduceConfig(FrozenConfig):
    """Settings of ``mmstream produce``; see ``mmstream produce --help``."""

    bootstrap_servers: str
    topic: str
    count: int = 300
    rate: float = 0.0
    content: str = "raw"
    model: Path | None = None
    seed: int = 0
    corrupt_p: float = 0.0
    shuffle_window: int = 16
    labels_out: Path | None = None
    key_prefix: str = ""
    client_id: str = "mmstream-produce"

    def __post_init__(self) -> None:
        if self.count <= 0:
            raise ConfigError("--count must be > 0")
        if self.rate < 0:
            raise ConfigError("--rate must be >= 0 (0 = as fast as possible)")
        if self.content not in ("raw", "npy"):
            raise ConfigError("--content must be raw or npy")
        if self.content == "npy" and self.model is None:
            raise ConfigError("--content npy needs --model (the tensors follow its manifest)")
        if not 0.0 <= self.corrupt_p <= 1.0:
            raise ConfigError("--corrupt-p must be within [0, 1]")
        if self.shuffle_window <= 0:
            raise ConfigError("--shuffle-window must be > 0")


def png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def wav_bytes(wave_f32: np.ndarray, sample_rate: int = SAMPLE_RATE) -> bytes:
    pcm = (np.clip(wave_f32, -1.0, 1.0) * 32767.0).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def encode_sample(
    event_id: str, sample: Sample, content: str, manifest: Manifest | None
) -> list[Record]:
    """The three part records of one sample."""
    if content == "raw":
        return [
            (event_id, "image", png_bytes(sample.image), "image/png"),
            (event_id, "text", sample.text.encode(), "text/plain; charset=utf-8"),
            (event_id, "audio", wav_bytes(sample.audio), "audio/wav"),
        ]
    if manifest is None:
        raise ConfigError("npy content needs a manifest")
    return [
        (event_id, name, npy_bytes(tensor), CONTENT_NPY)
        for name, tensor in sample_tensors(sample, manifest).items()
    ]


def interleave(
    records: list[list[Record]], window: int, rng: np.random.Generator
) -> Iterator[Record]:
    """Shuffle parts within windows of ``window`` events."""
    for start in range(0, len(records), window):
        chunk = [r for event in records[start : start + window] for r in event]
        for i in rng.permutation(len(chunk)):
            yield chunk[i]


def produce(config: ProduceConfig) -> dict[str, int]:
    """Send ``config.count`` events; return counts. Labels go to ``labels_out``."""
    rng = np.random.default_rng(config.seed)
    manifest = load_manifest(config.model, verify=False) if config.model else None
    prefix = config.key_prefix or f"ev-{config.seed}-"
    batch = samples(config.count, rng, split="test", corrupt_p=config.corrupt_p)
    ids = [f"{prefix}{i:06d}" for i in range(config.count)]
    encoded = [
        encode_sample(i, s, config.content, manifest) for i, s in zip(ids, batch, strict=True)
    ]
    if config.labels_out:
        with Path(config.labels_out).open("w") as f:
            for i, s in zip(ids, batch, strict=True):
                f.write(json.dumps({"event_id": i, "label": str(s.label)}) + "\n")
    producer = make_producer(config.bootstrap_servers, config.client_id)
    parts_per_event = len(encoded[0])
    log.info(
        "producing %d events (%d parts each) to %s at %s",
        config.count,
        parts_per_event,
        config.topic,
        f"{config.rate:g} events/s" if config.rate > 0 else "full speed",
    )
    interval = 1.0 / (config.rate * parts_per_event) if config.rate > 0 else 0.0
    start = time.monotonic()
    sent = 0
    futures = []
    try:
        for event_id, modality, value, ctype in interleave(encoded, config.shuffle_window, rng):
            if interval:
                delay = start + sent * interval - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            headers = [
                (HEADER_MODALITY, modality.encode()),
                (HEADER_CONTENT_TYPE, ctype.encode()),
                (HEADER_EVENT_TIME, str(time.time_ns() // 1_000_000).encode()),
            ]
            futures.append(
                producer.send(config.topic, key=event_id.encode(), value=value, headers=headers)
            )
            sent += 1
        producer.flush()
        failed = [f.exception for f in futures if f.failed()]
        if failed:
            raise BrokerError(f"{len(failed)} of {sent} parts were not acknowledged: {failed[0]}")
    except KafkaError as exc:
        raise BrokerError(f"producing to {config.topic} failed: {exc}") from exc
    finally:
        producer.close(timeout=5)
    elapsed = time.monotonic() - start
    log.info("produced %d events (%d parts) in %.2f s", config.count, sent, elapsed)
    return {"events": config.count, "parts": sent, "ms": int(elapsed * 1000)}
