"""The one error root of mmstream, and the one place that decides exit codes.

Every error the project raises on purpose derives from :class:`MMStreamError`,
which says whether trying again may help (``retriable``) and which exit code the
CLI gives it (``exit_code``)::

    MMStreamError                      retriable   exit
    ├── ConfigError                    no          2   bad flag, env var, config key,
    │                                                  missing or unreadable file
    ├── ModelError                     no          2   model dir, manifest, sha256, ORT load
    │   └── ExportError                no          2   TF -> ONNX conversion or parity
    ├── RecordError                    no          2   one input record is unusable; carries
    │                                                  ``reason``, the dead-letter code
    ├── InferenceError                 no          1   ONNX Runtime failed on a batch
    ├── BrokerError                    yes (1)     1   Kafka unreachable, send failed
    └── StorageError                   yes         1   disk full, quota exceeded, I/O error

    (1) a wrapped kafka-python error keeps its own flag: :meth:`BrokerError.wrap`.

The exit code is, in this order: the ``exit_code`` given to the constructor, the
class's :attr:`MMStreamError.default_exit_code`, else :data:`EXIT_RUNTIME` (1) for
a retriable error and :data:`EXIT_INPUT` (2) for one that is not. So 2 means "the
input or the configuration is wrong, fix it", 1 "something failed at run time".
The CLI prints ``mmstream: error: <one line>`` and exits with it; Ctrl-C is
:data:`EXIT_INTERRUPTED` (130).

:func:`os_error` is the one translation of an ``OSError``: a full disk, an
exceeded quota or an I/O error is a :class:`StorageError`; anything else (a
missing file, no permission) is the caller's input error (:class:`ConfigError`
unless told otherwise).
"""

from __future__ import annotations

import errno
from enum import StrEnum
from typing import ClassVar, Self

#: Exit code of a run-time failure (the broker, the device, the disk).
EXIT_RUNTIME = 1
#: Exit code of bad input or configuration (argparse uses it for usage errors too).
EXIT_INPUT = 2
#: Exit code after Ctrl-C (128 + SIGINT), as shells report it.
EXIT_INTERRUPTED = 130

#: ``OSError.errno`` values that are the machine's trouble, not the input's.
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO})


def one_line(text: str) -> str:
    """``text`` with every run of whitespace, newlines included, as one space."""
    return " ".join(text.split())


class MMStreamError(Exception):
    """Root of every mmstream error.

    ``retriable`` says whether a retry may succeed; ``exit_code`` is the CLI's exit
    status for it (see the module docstring for how it is chosen).
    """

    retriable: bool = False
    #: The class's exit code; None: :data:`EXIT_RUNTIME` if retriable, else :data:`EXIT_INPUT`.
    default_exit_code: ClassVar[int | None] = None

    def __init__(
        self, message: str, *, retriable: bool | None = None, exit_code: int | None = None
    ) -> None:
        super().__init__(message)
        if retriable is not None:
            self.retriable = retriable
        if exit_code is not None and not 1 <= exit_code <= 125:
            # A programming error (0 would report a failure as success), not bad input.
            raise ValueError(f"exit_code must be in 1..125, not {exit_code}")
        self._exit_code = exit_code

    @property
    def exit_code(self) -> int:
        """The CLI's exit status: explicit, else the class's, else from ``retriable``."""
        if self._exit_code is not None:
            return self._exit_code
        if self.default_exit_code is not None:
            return self.default_exit_code
        return EXIT_RUNTIME if self.retriable else EXIT_INPUT


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
    EVICTED_AT_BOUND = "evicted_at_bound"
    INFERENCE_ERROR = "inference_error"


class RecordError(MMStreamError):
    """One input record cannot be used; ``reason`` is its dead-letter code."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message, retriable=False)
        self.reason = reason


class InferenceError(MMStreamError):
    """ONNX Runtime failed while running a batch (a run-time failure, not bad input)."""

    default_exit_code = EXIT_RUNTIME


class BrokerError(MMStreamError):
    """Kafka could not be reached or did not acknowledge a record.

    Always a run-time failure (exit 1), whether or not Kafka calls it retriable.
    """

    retriable = True
    default_exit_code = EXIT_RUNTIME

    @classmethod
    def wrap(cls, message: str, exc: BaseException) -> Self:
        """``message: exc`` as a broker error that keeps ``exc``'s own ``retriable`` flag.

        kafka-python's ``KafkaError`` classes carry ``retriable`` (``KafkaError`` itself:
        False; a timeout: True); an exception without one counts as retriable. The
        result's ``__cause__`` is ``exc``; ``raise BrokerError.wrap(...) from exc``
        says the same. A subclass whose constructor needs more arguments (such as
        ``CommitFailed``) cannot be built by ``wrap``.
        """
        detail = str(exc) or type(exc).__name__
        err = cls(f"{message}: {detail}", retriable=bool(getattr(exc, "retriable", True)))
        err.__cause__ = exc
        return err


class StorageError(MMStreamError):
    """A file could not be written or read for lack of space, quota, or a failing device.

    A run-time failure (exit 1), retriable: freeing space or moving to a healthy
    disk and running the same command again may succeed.
    """

    retriable = True
    default_exit_code = EXIT_RUNTIME


def os_error(
    what: str, exc: OSError, *, input_error: type[MMStreamError] = ConfigError
) -> MMStreamError:
    """``exc`` (an ``OSError`` about ``what``, e.g. ``--out '/data/a.gz'``) as a one-line error.

    ``ENOSPC``, ``EDQUOT`` and ``EIO`` (:data:`STORAGE_ERRNOS`) give a
    :class:`StorageError` (exit 1); any other errno (no such file, permission
    denied, is a directory, ...) gives ``input_error`` (default :class:`ConfigError`,
    exit 2). The message is ``"<what>: <strerror>"``, e.g.
    ``--out '/data/a.gz': No space left on device``. Raise it ``from exc``.
    """
    cause = exc.strerror or str(exc) or type(exc).__name__
    cls = StorageError if exc.errno in STORAGE_ERRNOS else input_error
    err = cls(one_line(f"{what}: {cause}"))
    err.__cause__ = exc
    return err
