"""The one error root of mmstream.

Every error the project raises on purpose derives from :class:`MMStreamError`,
which says whether trying again may help (``retriable``)::

    MMStreamError                      retriable unless said otherwise below
    ├── ConfigError                    bad flag, env var or config key    (no)
    ├── ModelError                     model dir, manifest, sha256, ORT   (no)
    │   └── ExportError                TF -> ONNX conversion or parity    (no)
    ├── RecordError                    one input record is unusable       (no)
    │   carries ``reason``, a stable code that goes to the dead-letter topic
    ├── InferenceError                 ONNX Runtime failed on a batch     (no)
    └── BrokerError                    Kafka unreachable, send failed     (yes)

The CLI turns any ``MMStreamError`` into a one-line message and exit code 2.
"""

from __future__ import annotations

from enum import StrEnum


class MMStreamError(Exception):
    """Root of every mmstream error. ``retriable`` says whether a retry may succeed."""

    retriable: bool = False

    def __init__(self, message: str, *, retriable: bool | None = None) -> None:
        super().__init__(message)
        if retriable is not None:
            self.retriable = retriable


class ConfigError(MMStreamError):
    """A flag, environment variable or config key is unknown or has a bad value."""


class ModelError(MMStreamError):
    """The model directory, its manifest or its ONNX file cannot be used."""


class ExportError(ModelError):
    """Converting a Keras model to ONNX failed, or parity was not met."""


class Reason(StrEnum):
    """Stable reason codes for dead-letter records (header ``mm-error``)."""

    MISSING_KEY = "missing_key"
    UNKNOWN_MODALITY = "unknown_modality"
    UNSUPPORTED_CONTENT_TYPE = "unsupported_content_type"
    DECODE_ERROR = "decode_error"
    SHAPE_MISMATCH = "shape_mismatch"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    INCOMPLETE_EVENT = "incomplete_event"
    INFERENCE_ERROR = "inference_error"


class RecordError(MMStreamError):
    """One input record cannot be used; ``reason`` is its dead-letter code."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message, retriable=False)
        self.reason = reason


class InferenceError(MMStreamError):
    """ONNX Runtime failed while running a batch."""


class BrokerError(MMStreamError):
    """Kafka could not be reached or did not acknowledge a record."""

    retriable = True
