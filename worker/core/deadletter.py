"""Dead-lettering: the record that goes to the dead-letter topic for an unusable input.

Pure. The dead letter keeps the original key, value and headers (minus any
``mm-error*``/``mm-source`` headers it already had) and adds::

    mm-error            the reason code (worker.contract.errors.Reason)
    mm-error-detail     a human-readable detail, at most 4000 bytes
    mm-source           topic/partition/offset of the original record
    mm-value-truncated  the original value's size, when the value was cut

Values over :data:`MAX_VALUE_BYTES` are cut so the dead letter stays under the
broker's message size; the original stays on the input topic at ``mm-source``
until retention.
"""

from __future__ import annotations

from worker.contract.errors import Reason
from worker.contract.records import (
    HEADER_ERROR,
    HEADER_ERROR_DETAIL,
    HEADER_SOURCE,
    OutRecord,
    RawRecord,
)

#: Dead-letter values are cut to this size (Kafka's default message limit is ~1 MB).
MAX_VALUE_BYTES = 512 * 1024
MAX_DETAIL_BYTES = 4000
HEADER_VALUE_TRUNCATED = "mm-value-truncated"
_REPLACED = frozenset((HEADER_ERROR, HEADER_ERROR_DETAIL, HEADER_SOURCE, HEADER_VALUE_TRUNCATED))


def dead_letter(topic: str, raw: RawRecord, reason: Reason, detail: str) -> OutRecord:
    """The dead-letter record of ``raw`` for ``topic``."""
    headers = [(k, v) for k, v in raw.headers if k.lower() not in _REPLACED]
    headers += [
        (HEADER_ERROR, reason.value.encode()),
        (HEADER_ERROR_DETAIL, detail.encode("utf-8", "replace")[:MAX_DETAIL_BYTES]),
        (HEADER_SOURCE, str(raw.source).encode()),
    ]
    value = raw.value
    if value is not None and len(value) > MAX_VALUE_BYTES:
        headers.append((HEADER_VALUE_TRUNCATED, str(len(value)).encode()))
        value = value[:MAX_VALUE_BYTES]
    return OutRecord(topic, raw.key, value, tuple(headers))
