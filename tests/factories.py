"""Small builders shared by unit tests (no broker, no ONNX file)."""

from __future__ import annotations

from typing import Any

import numpy as np

from worker.contract.manifest import InputInfo, Manifest, OutputInfo
from worker.contract.preprocess import AudioSpec, ImageSpec, TextSpec
from worker.contract.records import Event, Part, RawRecord, SourceRef
from worker.contract.reference_data import LABELS, VOCABULARY


def small_manifest(image_size: int = 16) -> Manifest:
    image = ImageSpec(image_size, image_size, 3)
    text = TextSpec(VOCABULARY, max_length=16)
    audio = AudioSpec()
    return Manifest(
        name="test",
        version="0",
        sha256="0" * 64,
        opset=17,
        inputs=(
            InputInfo("audio", "audio", "float32", audio.shape(), audio),
            InputInfo("image", "image", "float32", image.shape(), image),
            InputInfo("text", "text", "int32", text.shape(), text),
        ),
        outputs=(OutputInfo("probabilities", "float32", (10,)),),
        labels=LABELS,
        label_output="probabilities",
    )


def source(offset: int, partition: int = 0, topic: str = "in", ts: int = 1000) -> SourceRef:
    return SourceRef(topic, partition, offset, ts)


def raw(
    value: bytes | None,
    *,
    key: bytes | None = b"ev-1",
    modality: str | None = "text",
    ctype: str | None = "text/plain; charset=utf-8",
    offset: int = 0,
    extra: tuple[tuple[str, bytes], ...] = (),
) -> RawRecord:
    headers: list[tuple[str, bytes]] = []
    if modality is not None:
        headers.append(("mm-modality", modality.encode()))
    if ctype is not None:
        headers.append(("content-type", ctype.encode()))
    return RawRecord(source(offset), key, value, tuple(headers) + extra)


def part(
    event_id: str, name: str, offset: int, partition: int = 0, value: Any = 0.0, ts: int = 1000
) -> Part:
    tensor = np.array([value], dtype=np.float32)
    return Part(event_id, name, tensor, source(offset, partition, ts=ts))


def event(event_id: str, partition: int = 0, offsets: tuple[int, ...] = (0,)) -> Event:
    parts = {f"in{i}": part(event_id, f"in{i}", o, partition) for i, o in enumerate(offsets)}
    return Event(event_id, partition, parts, first_seen_ms=0, completed_ms=0)
