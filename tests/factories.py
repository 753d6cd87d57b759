"""Small builders shared by unit tests (no broker, no ONNX file)."""

from __future__ import annotations

from typing import Any

import numpy as np

from worker.contract.manifest import InputInfo, Manifest, OutputInfo, PartInfo
from worker.contract.records import Event, Part, RawRecord, SourceRef
from worker.contract.reference_data import LABELS, VOCABULARY
from worker.contract.transforms import ImageTransform, LogMelTransform, WordsTransform


def small_manifest(image_size: int = 16) -> Manifest:
    """The reference model's shape: parts image, text, audio, each filling its own input."""
    image = ImageTransform(image_size, image_size, 3)
    text = WordsTransform(VOCABULARY, max_length=16)
    audio = LogMelTransform()
    inputs = (
        InputInfo("audio", "float32", audio.shape()),
        InputInfo("image", "float32", image.shape()),
        InputInfo("text", "int32", text.shape()),
    )
    return Manifest(
        name="test",
        version="0",
        sha256="0" * 64,
        opset=17,
        inputs=inputs,
        parts=(
            PartInfo("audio", audio, ((inputs[0], "features"),)),
            PartInfo("image", image, ((inputs[1], "pixels"),)),
            PartInfo("text", text, ((inputs[2], "input_ids"),)),
        ),
        outputs=(OutputInfo("probabilities", "float32", (10,), kind="probabilities"),),
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
    return Part(event_id, name, {name: tensor}, source(offset, partition, ts=ts))


def event(event_id: str, partition: int = 0, offsets: tuple[int, ...] = (0,)) -> Event:
    parts = {f"in{i}": part(event_id, f"in{i}", o, partition) for i, o in enumerate(offsets)}
    return Event(event_id, partition, parts, first_seen_ms=0, completed_ms=0)


def train_wordpiece(path: Any, texts: Any = None, vocab_size: int = 120) -> Any:
    """A BERT-style WordPiece ``tokenizer.json`` trained here from ``texts`` (default: the
    reference phrases), with [CLS] ... [SEP] around each text and [PAD] = 0; returns path."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    from worker.contract.reference_data import phrase

    if texts is None:
        rng = np.random.default_rng(0)
        texts = [phrase(d % 10, rng) for d in range(400)] + ["hello there", "no idea"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    tok.train_from_iterator(
        texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=special)
    )
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    tok.save(str(path))
    return path
