"""The message contract's records: parts in, events assembled, predictions out.

Input topic: one Kafka record per part. Key = event id (UTF-8); header
``mm-modality`` = the manifest part name; header ``content-type`` = a raw media
type, ``application/x-npy`` (a part that fills one input) or ``application/x-npz``
(one array per input the part fills); optional ``mm-event-time`` (ms).
Parts of one event share a key, hence a partition, so assembly is local to the
consumer that owns it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from numpy.typing import NDArray

HEADER_MODALITY = "mm-modality"
HEADER_CONTENT_TYPE = "content-type"
HEADER_EVENT_TIME = "mm-event-time"
HEADER_ERROR = "mm-error"
HEADER_ERROR_DETAIL = "mm-error-detail"
HEADER_SOURCE = "mm-source"

CONTENT_NPY = "application/x-npy"
CONTENT_NPZ = "application/x-npz"


@dataclass(frozen=True)
class SourceRef:
    """Where a record came from.

    Attributes:
        topic, partition, offset: the record's position in Kafka.
        timestamp_ms: the record's timestamp (producer create time, ms since epoch).
    """

    topic: str
    partition: int
    offset: int
    timestamp_ms: int

    def __str__(self) -> str:
        return f"{self.topic}/{self.partition}/{self.offset}"


@dataclass(frozen=True)
class RawRecord:
    """A consumed Kafka record, before decoding.

    Attributes:
        source: topic/partition/offset/timestamp.
        key: the record key, or None.
        value: the record value, or None (tombstone).
        headers: header name -> value bytes, as sent (duplicates: last wins).
    """

    source: SourceRef
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]

    def header(self, name: str) -> bytes | None:
        """The value of header ``name`` (lower case; names match case-insensitively)."""
        # A part is asked for three or four headers: index them once, at the first ask
        # (kept in the instance's __dict__; not a field, so equality ignores it).
        by_name = self.__dict__.get("_by_name")
        if by_name is None:
            by_name = self.__dict__["_by_name"] = {k.lower(): v for k, v in self.headers}
        return by_name.get(name)


@dataclass(frozen=True)
class OutRecord:
    """A record to write: a prediction, a dead letter, a restored or a sample part.

    Attributes:
        topic: where it goes.
        key, value: as written (bytes, or None).
        headers: header name -> value bytes, in order.
        partition: the partition to write to (None: the key's, as the Java client picks).
        timestamp_ms: the record's create time (None: the time of sending).
    """

    topic: str
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]
    partition: int | None = None
    timestamp_ms: int | None = None

    @property
    def nbytes(self) -> int:
        """Key, value and header bytes: what the record holds while unacknowledged."""
        return (
            len(self.key or b"")
            + len(self.value or b"")
            + sum(len(k) + len(v) for k, v in self.headers)
        )


@dataclass(frozen=True)
class LogRecord:
    """A Kafka record exactly as the log holds it (what an archive keeps).

    Attributes:
        topic, partition, offset: its position.
        timestamp: ms since the epoch (-1: the record has none).
        timestamp_type: ``create`` (the producer's) or ``log_append`` (the broker's).
        key, value: bytes or None.
        headers: in Kafka's order, repeats kept; a value is None where a client sent a
            header with a null value.
    """

    topic: str
    partition: int
    offset: int
    timestamp: int
    timestamp_type: str
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes | None], ...] = ()

    @property
    def size(self) -> int:
        """Bytes of key, value, header names and header values."""
        return (
            len(self.key or b"")
            + len(self.value or b"")
            + sum(len(n.encode()) + len(v or b"") for n, v in self.headers)
        )


@dataclass(frozen=True)
class Part:
    """One decoded part of an event.

    Attributes:
        event_id: the record key, decoded as UTF-8.
        name: the manifest part it is (``mm-modality``).
        tensors: model input name -> per-example tensor in that input's dtype and shape
            (every input the part fills).
        source: where the record came from.
        event_time_ms: ``mm-event-time`` if sent, else None.
        raw: the original record (dead-letter records carry its key, value and headers).
    """

    event_id: str
    name: str
    tensors: dict[str, NDArray[Any]]
    source: SourceRef
    event_time_ms: int | None = None
    raw: RawRecord | None = None

    @property
    def nbytes(self) -> int:
        """Memory held for this part: its tensors plus the original value."""
        n = len(self.raw.value or b"") if self.raw is not None else 0
        for tensor in self.tensors.values():  # (a loop: most parts hold one tensor)
            n += tensor.nbytes
        return n


@dataclass(frozen=True)
class Event:
    """A complete event: one part per manifest part.

    Attributes:
        event_id: the shared key of the parts.
        partition: the partition its parts came from.
        parts: part name -> part.
        first_seen_ms, completed_ms: worker clock when the first part arrived
            and when the last one completed the event.
        duplicates: parts for an input that already had one (the later replaced it).
        missing: parts absent when an incomplete event is inferred anyway
            (``--on-incomplete infer``); their inputs are filled with the part's blank.
    """

    event_id: str
    partition: int
    parts: dict[str, Part]
    first_seen_ms: int
    completed_ms: int
    duplicates: tuple[SourceRef, ...] = ()
    missing: tuple[str, ...] = ()

    @property
    def sources(self) -> tuple[SourceRef, ...]:
        return tuple(p.source for p in self.parts.values()) + self.duplicates

    @property
    def last_part_ms(self) -> int:
        """Timestamp of the newest part record (where end-to-end latency starts)."""
        return max(p.source.timestamp_ms for p in self.parts.values())


@dataclass(frozen=True)
class Prediction:
    """One model prediction for one event (the output topic's value).

    Attributes:
        event_id: the event's key.
        outputs: output name -> values of this event (a list of floats; nested lists for
            an output of more than one axis per example).
        label, score: argmax class name and its probability, when the manifest has labels.
        modalities: parts that were present.
        missing: parts that were absent and blanked (``--on-incomplete infer``).
        tags: multi-label output name -> the labels at or over their thresholds.
        timing: ms since epoch: ``last_part_ms`` (newest part record),
            ``completed_ms`` (event assembled), ``inferred_ms`` (batch returned);
            and ``batch_size``.
    """

    event_id: str
    outputs: dict[str, list[Any]]
    label: str | None
    score: float | None
    modalities: tuple[str, ...]
    timing: dict[str, int]
    missing: tuple[str, ...] = ()
    tags: dict[str, list[str]] | None = None

    def to_json_dict(self, model: dict[str, str]) -> dict[str, Any]:
        out: dict[str, Any] = {
            "event_id": self.event_id,
            "model": model,
            "outputs": self.outputs,
            "modalities": list(self.modalities),
            "timing": self.timing,
        }
        if self.missing:
            out["missing"] = list(self.missing)
        if self.tags is not None:
            out["tags"] = self.tags
        if self.label is not None:
            out["label"] = self.label
            out["score"] = self.score
        return out
