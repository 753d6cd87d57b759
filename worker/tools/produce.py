"""``mmstream produce``: events to the input topic, per the contract, for any served model.

Each event is one record per part of the model (without ``--model``: the reference
model's image, text and audio) sharing a key. Parts are shuffled within windows of
``shuffle_window`` events, so the parts of different events interleave and arrive in
any order. What the parts hold (``--media``): ``reference``, the reference task's digits
(each part gets the sample's image, phrase or tone, whatever its transform; true labels
known); ``random``, random valid media from each part's transform (random pixels at a
random size, random words, noise); or the files of ``--media-dir`` (one directory per
event, one file per part, named after the part: ``DIR/ev-1/photo.jpg``). With
``--content raw`` the media are encoded as ``--image-type`` / UTF-8 text /
``--audio-type``; with ``--content npy`` they go through the model's transforms and are
sent as its tensors (``numpy.save``, or ``numpy.savez`` for a part that fills several
inputs).

As a load and fault generator: ``--missing-fraction`` of the events never send
one of their parts, and ``--poison-fraction`` of them send one bad record in
place of a good part, cycling over the kinds the worker dead-letters
(:data:`POISON_KINDS`). Which events, which part and which kind follow from
``--seed`` alone: the same settings give the same records (all but their
``mm-event-time`` header, the wall clock at sending). ``--labels-out``
writes one JSON line per event saying its true label and what was done to it
(:meth:`EventPlan.to_json_dict`), so accuracy can be computed on the clean
events and the dead letters checked downstream.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from worker.config import CONTENTS, FrozenConfig, KafkaSecurity, compression_setting, setting
from worker.contract.errors import BrokerError, ConfigError, Reason
from worker.contract.manifest import Manifest, PartInfo, load_manifest
from worker.contract.records import (
    CONTENT_NPY,
    CONTENT_NPZ,
    HEADER_CONTENT_TYPE,
    HEADER_EVENT_TIME,
    HEADER_MODALITY,
)
from worker.contract.records import OutRecord as Outgoing
from worker.contract.reference_data import (
    MODALITIES,
    SAMPLE_RATE,
    Sample,
    sample_media,
    samples,
)
from worker.contract.transforms.media import ENCODINGS, audio_bytes, encode_media, image_bytes
from worker.core.pacing import Pacer
from worker.edge.choice import clients_for
from worker.edge.client import Deliveries

log = logging.getLogger(__name__)

#: What ``--media`` the parts hold.
MEDIA_SOURCES = ("reference", "random", "files")

Record = tuple[str, str, bytes, str]  # event id, modality, value, content type
T = TypeVar("T")

#: The bad records ``--poison-fraction`` sends, in the order poisoned events cycle
#: through them, each named by the reason code the worker dead-letters it with.
POISON_KINDS: tuple[Reason, ...] = (
    Reason.MISSING_KEY,
    Reason.UNKNOWN_MODALITY,
    Reason.UNSUPPORTED_CONTENT_TYPE,
    Reason.DECODE_ERROR,
    Reason.SHAPE_MISMATCH,
)
#: ``mm-modality`` of the unknown_modality poison: names no model input.
POISON_MODALITY = "no-such-input"
#: ``content-type`` of the unsupported_content_type poison: no input takes it.
POISON_CONTENT_TYPE = "application/octet-stream"
#: Value of the decode_error poison: not PNG, JPEG, WAV, .npy, nor even UTF-8
#: (starts with 0xFF), and short enough for any text size limit.
POISON_BYTES = b"\xff\xfe\x00mmstream-poison\xc3\x28"

#: Second seed word of the generator that picks missing and poisoned events, so
#: that the events themselves and their order stay those of ``--seed`` alone.
_FAULT_STREAM = 0xFA17


@dataclass(frozen=True)
class ProduceConfig(KafkaSecurity, FrozenConfig):
    """Settings of ``mmstream produce``; see ``mmstream produce --help``."""

    bootstrap_servers: str = setting(help="Kafka bootstrap servers")
    topic: str = setting(help="input topic to write parts to")
    count: int = setting(300, help="events to produce")
    rate: float = setting(0.0, help="events/s (0 = as fast as possible)")
    content: str = setting(
        "raw",
        choices=CONTENTS,
        help="raw media (see --image-type, --audio-type) or the model's tensors (.npy, or "
        ".npz for a part that fills several inputs)",
    )
    model: Path | None = setting(
        None, help="model directory: its parts are sent (needed for npy and --media random)"
    )
    media: str = setting(
        "reference",
        choices=MEDIA_SOURCES,
        help="what the parts hold: the reference task's digits (labels known), random media "
        "made by each part's transform, or the files of --media-dir",
    )
    media_dir: Path | None = setting(
        None,
        help="with --media files: one directory per event, one file per part named after "
        "the part (DIR/ev-1/photo.jpg; content type from the extension)",
    )
    image_type: str = setting(
        "image/png", choices=ENCODINGS["image"], help="how raw images are encoded"
    )
    audio_type: str = setting(
        "audio/wav", choices=ENCODINGS["audio"], help="how raw audio is encoded"
    )
    seed: int = setting(0, help="random seed (same seed, same events)")
    corrupt_p: float = setting(
        0.0, help="probability that each modality of an event is replaced by noise"
    )
    missing_fraction: float = setting(
        0.0,
        help="share of events (0..1) that never send one of their parts; the events and the "
        "part are chosen by --seed (the worker sees them incomplete)",
    )
    poison_fraction: float = setting(
        0.0,
        help="share of events (0..1; not the missing ones: the two fractions add up to <= 1) "
        "that send one bad record in place of a good part, cycling over: no key "
        "(missing_key), unknown mm-modality (unknown_modality), unsupported content-type "
        "(unsupported_content_type), undecodable bytes (decode_error), wrong npy shape "
        "(shape_mismatch); the bad record is dead-lettered with that reason and the event "
        "also ends incomplete",
    )
    shuffle_window: int = setting(16, help="parts are shuffled within windows of this many events")
    labels_out: Path | None = setting(
        None,
        help="write one JSON line per event here: event_id, label, and what was done to it "
        '("missing": PART or "poison": REASON, "poison_part": PART)',
    )
    key_prefix: str = setting("", help="event id prefix (default ev-<seed>-)")
    client_id: str = setting("mmstream-produce", help="Kafka client id")
    compression_type: str = compression_setting("the parts written")

    def __post_init__(self) -> None:
        super().__post_init__()  # every setting's choices
        if self.count <= 0:
            raise ConfigError("--count must be > 0")
        if self.rate < 0:
            raise ConfigError("--rate must be >= 0 (0 = as fast as possible)")
        if self.seed < 0:
            raise ConfigError("--seed must be >= 0")
        if self.content == "npy" and self.model is None:
            raise ConfigError("--content npy needs --model (the tensors follow its manifest)")
        if self.media == "random" and self.model is None:
            raise ConfigError("--media random needs --model (its transforms make the media)")
        if (self.media == "files") != (self.media_dir is not None):
            raise ConfigError("--media files and --media-dir DIR go together")
        if self.media == "files" and self.content != "raw":
            raise ConfigError("--media files sends the files as they are: --content raw")
        for name in ("corrupt_p", "missing_fraction", "poison_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"--{name.replace('_', '-')} must be within [0, 1]")
        if self.missing_fraction + self.poison_fraction > 1.0:
            raise ConfigError(
                "--missing-fraction + --poison-fraction must be <= 1 "
                "(an event is missing a part or poisoned, never both)"
            )
        if self.shuffle_window <= 0:
            raise ConfigError("--shuffle-window must be > 0")
        self._check_security()


@dataclass(frozen=True)
class OutRecord:
    """One record to send to the input topic.

    Attributes:
        event_id: the event it belongs to (also its key, unless ``key`` is None).
        key: the record key; None for the missing_key poison.
        modality: the ``mm-modality`` header.
        value: the record value.
        content_type: the ``content-type`` header.
        poison: the reason the worker will dead-letter it with; None for a good part.
    """

    event_id: str
    key: bytes | None
    modality: str
    value: bytes
    content_type: str
    poison: Reason | None = None

    def headers(self) -> list[tuple[str, bytes]]:
        """The contract headers (``mm-event-time`` is added when the record is sent)."""
        return [
            (HEADER_MODALITY, self.modality.encode()),
            (HEADER_CONTENT_TYPE, self.content_type.encode()),
        ]


@dataclass(frozen=True)
class EventPlan:
    """What is sent for one event.

    Attributes:
        event_id: the event's key.
        label: its true label.
        missing: the part never sent, or None.
        poison: the kind of bad record sent in place of ``poison_part``, or None.
        poison_part: the good part that bad record replaced, or None.
    """

    event_id: str
    label: str
    missing: str | None = None
    poison: Reason | None = None
    poison_part: str | None = None

    @property
    def clean(self) -> bool:
        """All parts sent, none bad: the worker should predict this event."""
        return self.missing is None and self.poison is None

    def to_json_dict(self) -> dict[str, str]:
        """One line of ``--labels-out``; see :func:`produce`."""
        out = {"event_id": self.event_id, "label": self.label}
        if self.missing is not None:
            out["missing"] = self.missing
        if self.poison is not None and self.poison_part is not None:
            out["poison"] = str(self.poison)
            out["poison_part"] = self.poison_part
        return out


@dataclass(frozen=True)
class ProducePlan:
    """Everything :func:`produce` sends, before any broker is involved.

    Attributes:
        events: one entry per event, in event-id order.
        records: the records in send order (parts interleaved across events).
        parts_per_event: parts of a complete event (the model's inputs).
    """

    events: tuple[EventPlan, ...]
    records: tuple[OutRecord, ...]
    parts_per_event: int

    def counts(self) -> dict[str, Any]:
        """events, parts, clean, missing, and poison by reason (every kind, zeros too)."""
        poison = {str(kind): 0 for kind in POISON_KINDS}
        for e in self.events:
            if e.poison is not None:
                poison[str(e.poison)] += 1
        return {
            "events": len(self.events),
            "parts": len(self.records),
            "clean": sum(1 for e in self.events if e.clean),
            "missing": sum(1 for e in self.events if e.missing is not None),
            "poison": poison,
        }


def png_bytes(pixels: np.ndarray) -> bytes:
    return image_bytes(pixels, "PNG")


def wav_bytes(wave_f32: np.ndarray, sample_rate: int = SAMPLE_RATE) -> bytes:
    return audio_bytes(wave_f32, sample_rate, "audio/wav")


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """The multi-array form of a part that fills several inputs: one array per input."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]  # (numpy >= 2.2 types an allow_pickle)
    return buf.getvalue()


def part_families(manifest: Manifest | None) -> list[tuple[str, str]]:
    """(part name, media family) of every part; without a model, the reference's."""
    if manifest is None:
        return [(m, m) for m in MODALITIES]
    return [(p.name, p.transform.family) for p in manifest.parts]


def encode_parts(
    event_id: str,
    media: dict[str, Any],
    content: str,
    manifest: Manifest | None,
    *,
    image_type: str = "image/png",
    audio_type: str = "audio/wav",
) -> list[Record]:
    """The part records of one event from its media (part name -> media): raw media
    encoded as the content types say, or (npy) the model's tensors of them."""
    if content == "raw":
        types = {"image": image_type, "text": ENCODINGS["text"][0], "audio": audio_type}
        return [
            (event_id, name, encode_media(media[name], types[family]), types[family])
            for name, family in part_families(manifest)
        ]
    if manifest is None:
        raise ConfigError("npy content needs a manifest")
    out = []
    for part in manifest.parts:
        tensors = part.fill(part.transform.apply(media[part.name]))
        if len(tensors) == 1:
            out.append((event_id, part.name, npy_bytes(next(iter(tensors.values()))), CONTENT_NPY))
        else:
            out.append((event_id, part.name, npz_bytes(tensors), CONTENT_NPZ))
    return out


def encode_sample(
    event_id: str, sample: Sample, content: str, manifest: Manifest | None, **types: str
) -> list[Record]:
    """The part records of one reference sample (each part gets its family's media)."""
    media = {name: sample_media(sample, family) for name, family in part_families(manifest)}
    return encode_parts(event_id, media, content, manifest, **types)


#: Content type by file extension (``--media files``).
EXTENSIONS = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".webp": "image/webp",
    ".heic": "image/heic",
    ".heif": "image/heif",
    ".txt": "text/plain; charset=utf-8",
    ".wav": "audio/wav",
    ".flac": "audio/flac",
    ".ogg": "audio/ogg",
    ".opus": "audio/opus",
    ".mp3": "audio/mpeg",
    ".npy": CONTENT_NPY,
    ".npz": CONTENT_NPZ,
}


def file_events(media_dir: Path, prefix: str) -> list[tuple[str, list[Record]]]:
    """``--media files``: one event per directory of ``media_dir`` (sorted), one part per
    file (the part is the file name without its extension)."""
    if not media_dir.is_dir():
        raise ConfigError(f"--media-dir {str(media_dir)!r} is not a directory")
    events = []
    for event_dir in sorted(p for p in media_dir.iterdir() if p.is_dir()):
        event_id = f"{prefix}{event_dir.name}"
        records = []
        for f in sorted(event_dir.iterdir()):
            ctype = EXTENSIONS.get(f.suffix.lower())
            if ctype is None:
                raise ConfigError(
                    f"{f}: unknown extension {f.suffix!r}; known: {sorted(EXTENSIONS)}"
                )
            records.append((event_id, f.stem, f.read_bytes(), ctype))
        if records:
            events.append((event_id, records))
    if not events:
        raise ConfigError(f"--media-dir {str(media_dir)!r} holds no event directories")
    return events


def poison_record(good: Record, kind: Reason, part: PartInfo | None) -> OutRecord:
    """The bad record of ``kind`` sent in place of the good part ``good``.

    ``part`` is the manifest part (None without a manifest); the shape_mismatch poison
    sends its inputs' dtypes with a wrong shape (a batch of two examples: npy for a part
    that fills one input, npz for more), else an empty float32 array, which fits no input.
    """
    event_id, modality, value, ctype = good
    key: bytes | None = event_id.encode()
    if kind == Reason.MISSING_KEY:
        key = None
    elif kind == Reason.UNKNOWN_MODALITY:
        modality = POISON_MODALITY
    elif kind == Reason.UNSUPPORTED_CONTENT_TYPE:
        ctype = POISON_CONTENT_TYPE
    elif kind == Reason.DECODE_ERROR:
        value = POISON_BYTES
    elif kind == Reason.SHAPE_MISMATCH:
        if part is not None and len(part.fills) > 1:
            wrong = {i.name: np.zeros((2, *i.shape), dtype=i.dtype) for i, _ in part.fills}
            value, ctype = npz_bytes(wrong), CONTENT_NPZ
        else:
            info = part.fills[0][0] if part is not None else None
            arr = (
                np.zeros((2, *info.shape), dtype=info.dtype)
                if info is not None
                else np.zeros((0,), dtype=np.float32)
            )
            value, ctype = npy_bytes(arr), CONTENT_NPY
    else:
        raise ConfigError(f"no poison record for reason {kind!s}")
    return OutRecord(event_id, key, modality, value, ctype, poison=kind)


def interleave(
    records: Sequence[Sequence[T]], window: int, rng: np.random.Generator
) -> Iterator[T]:
    """Shuffle parts within windows of ``window`` events."""
    for start in range(0, len(records), window):
        chunk = [r for event in records[start : start + window] for r in event]
        for i in rng.permutation(len(chunk)):
            yield chunk[i]


def _share(fraction: float, count: int) -> int:
    return min(count, int(fraction * count + 0.5))


def _random_media(manifest: Manifest, rng: np.random.Generator) -> dict[str, Any]:
    return {p.name: p.transform.sample_media(rng) for p in manifest.parts}


def build_plan(config: ProduceConfig) -> ProducePlan:
    """The events and records :func:`produce` sends: a function of the config alone.

    Events, their order and the interleaving come from ``--seed`` (as before the
    fault options existed); which events miss a part or are poisoned, and which
    part, come from a second generator seeded with it, so adding faults leaves
    the rest of the traffic unchanged. Missing and poisoned events are disjoint;
    poisoned events, in event-id order, cycle over :data:`POISON_KINDS`.
    """
    rng = np.random.default_rng(config.seed)
    faults = np.random.default_rng([config.seed, _FAULT_STREAM])
    manifest = load_manifest(config.model, verify=False) if config.model else None
    prefix = config.key_prefix or f"ev-{config.seed}-"
    types = {"image_type": config.image_type, "audio_type": config.audio_type}
    if config.media == "files" and config.media_dir is not None:
        found = file_events(config.media_dir, prefix)
        ids = [event_id for event_id, _ in found]
        encoded = [records for _, records in found]
        labels = [""] * len(ids)
    elif config.media == "random" and manifest is not None:
        ids = [f"{prefix}{i:06d}" for i in range(config.count)]
        encoded = [
            encode_parts(i, _random_media(manifest, rng), config.content, manifest, **types)
            for i in ids
        ]
        labels = [""] * len(ids)
    else:
        batch = samples(config.count, rng, split="test", corrupt_p=config.corrupt_p)
        ids = [f"{prefix}{i:06d}" for i in range(config.count)]
        encoded = [
            encode_sample(i, s, config.content, manifest, **types)
            for i, s in zip(ids, batch, strict=True)
        ]
        labels = [str(s.label) for s in batch]
    count = len(ids)
    n_missing = _share(config.missing_fraction, count)
    n_poison = min(_share(config.poison_fraction, count), count - n_missing)
    order = faults.permutation(count)
    missing = {int(i) for i in order[:n_missing]}
    poisoned = {int(i) for i in order[n_missing : n_missing + n_poison]}

    events: list[EventPlan] = []
    out: list[list[OutRecord]] = []
    kinds = itertools.cycle(POISON_KINDS)
    for idx, (event_id, label, parts) in enumerate(zip(ids, labels, encoded, strict=True)):
        records = [OutRecord(e, e.encode(), m, v, c) for e, m, v, c in parts]
        if idx in missing:
            j = int(faults.integers(len(parts)))
            events.append(EventPlan(event_id, label, missing=parts[j][1]))
            del records[j]
        elif idx in poisoned:
            j = int(faults.integers(len(parts)))
            name = parts[j][1]
            kind = next(kinds)
            part = manifest.part(name) if manifest is not None else None
            records[j] = poison_record(parts[j], kind, part)
            events.append(EventPlan(event_id, label, poison=kind, poison_part=name))
        else:
            events.append(EventPlan(event_id, label))
        out.append(records)
    return ProducePlan(
        events=tuple(events),
        records=tuple(interleave(out, config.shuffle_window, rng)),
        parts_per_event=len(encoded[0]),
    )


def write_labels(path: Path, events: Sequence[EventPlan]) -> None:
    """``--labels-out``: one JSON object per line and event; see :func:`produce`."""
    with Path(path).open("w") as f:
        for e in events:
            f.write(json.dumps(e.to_json_dict()) + "\n")


def produce(config: ProduceConfig) -> dict[str, Any]:
    """Send ``config.count`` events (:func:`build_plan`); return what was sent.

    ``config.labels_out``, when set, gets one JSON line per event, in event-id order::

        {"event_id": "ev-0-000000", "label": "7"}
        {"event_id": "ev-0-000001", "label": "3", "missing": "audio"}
        {"event_id": "ev-0-000002", "label": "1", "poison": "decode_error", "poison_part": "image"}

    ``missing``: that part was never sent (the worker times the event out as
    ``incomplete_event``). ``poison``: a bad record that the worker dead-letters
    with this reason code was sent in place of the ``poison_part`` part, so the
    event's other parts end incomplete too. Neither key: the event is clean and
    should be predicted (accuracy is computed on these).

    The returned summary (printed as JSON by the CLI): ``events``, ``parts``
    (records sent, bad ones included), ``clean``, ``missing`` (events missing a
    part), ``poison`` (poisoned events by reason code, every kind listed), ``ms``
    (time spent sending until every record was acknowledged) and the achieved
    ``events_per_s`` and ``parts_per_s``.
    """
    plan = build_plan(config)
    summary = plan.counts()
    if config.labels_out:
        write_labels(config.labels_out, plan.events)
    producer = clients_for(config.kafka_client).plain_producer(
        config.bootstrap_servers,
        config,
        client_id=config.client_id,
        compression_type=config.compression_type,
    )
    log.info(
        "producing %d events (%d parts each; %d missing a part, %d poisoned) to %s at %s",
        len(plan.events),
        plan.parts_per_event,
        summary["missing"],
        sum(summary["poison"].values()),
        config.topic,
        f"{config.rate:g} events/s" if config.rate > 0 else "full speed",
    )
    count = len(plan.events)
    per_s = config.rate * len(plan.records) / count if config.rate > 0 else 0.0
    # Bursts of up to 100 ms of records only to catch up after a slow send.
    pacer = Pacer(per_s, burst=max(1.0, per_s / 10)) if per_s > 0 else None
    start = time.monotonic()
    sent = 0
    acks = Deliveries()
    try:
        for rec in plan.records:
            if pacer is not None:
                pacer.pace()
            headers = (
                *rec.headers(),
                (HEADER_EVENT_TIME, str(time.time_ns() // 1_000_000).encode()),
            )
            producer.send(Outgoing(config.topic, rec.key, rec.value, headers), acks.ok, acks.error)
            sent += 1
        producer.flush(120.0)
        if acks.failed or acks.acked != sent:
            cause = acks.first_error or "no acknowledgement"
            raise BrokerError(f"{sent - acks.acked} of {sent} parts were not acknowledged: {cause}")
    except BrokerError as exc:
        raise BrokerError(
            f"producing to {config.topic} failed: {exc}", retriable=exc.retriable
        ) from exc
    finally:
        producer.close(5)
    elapsed = time.monotonic() - start
    seconds = max(elapsed, 1e-6)
    log.info("produced %d events (%d parts) in %.2f s", count, sent, elapsed)
    summary.update(
        parts=sent,
        ms=int(elapsed * 1000),
        events_per_s=round(count / seconds, 1),
        parts_per_s=round(sent / seconds, 1),
    )
    return summary
