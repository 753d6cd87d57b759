"""librdkafka's errors through the edge's one table, and connecting a client.

librdkafka retries authentication and TLS failures for ever, reporting them only to an
error callback: each client is built with one (:class:`Errors`) and connects before it is
used (:func:`connect`), so a refused login or certificate is one line naming it."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)

from worker.contract.errors import BrokerError
from worker.edge.client import TP, Positions
from worker.edge.common import (
    AUTHORIZATION,
    Failure,
    authentication_failed,
    tls_failure,
    translate,
    wrapping,
)

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)


#: How long a new client may take to reach the cluster before it fails.
CONNECT_TIMEOUT_S = 30.0
#: Blocking lookups (committed offsets, metadata, watermarks).
LOOKUP_TIMEOUT_S = 10.0


class Errors:
    """The error callback of one client: logs librdkafka's client-level errors and
    remembers the first that retrying cannot fix (authentication, TLS trust)."""

    def __init__(self, where: str, security: dict[str, Any]) -> None:
        self.where = where
        self.security = security
        self.cause = ""
        self.last: KafkaError | None = None

    def __call__(self, err: KafkaError) -> None:
        try:
            self.last = err
            text = err.str()
            cause = ""
            if err.code() == KafkaError._AUTHENTICATION and "SASL" in text.upper():
                cause = authentication_failed(self.security, self.where)
            cause = cause or tls_failure(self.security, self.where, text)
            if cause and not self.cause:
                self.cause = cause
            if err.code() in (KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN):
                log.info("kafka: %s", text)
            else:
                log.warning("kafka: %s", text)
        except Exception:  # never raise into librdkafka's callback
            log.exception("error callback failed")


def failure(err: KafkaError) -> Failure:
    """A librdkafka error as the edge's error table reads it (a timeout or a lost broker
    is retriable unless fatal; a transaction that must abort is retried by aborting)."""
    retriable = bool(err.retriable() or err.txn_requires_abort()) and not err.fatal()
    if err.code() in (KafkaError._TIMED_OUT, KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN):
        retriable = not err.fatal()
    return Failure(err.name(), err.str(), retriable)


def kafka_error(exc: BaseException) -> KafkaError | None:
    """The ``KafkaError`` a ``KafkaException`` carries (None for anything else)."""
    if isinstance(exc, KafkaException) and exc.args and isinstance(exc.args[0], KafkaError):
        return exc.args[0]
    return None


def broker_error(
    what: str,
    err: KafkaError | BaseException,
    security: dict[str, Any] | None = None,
    *,
    about: tuple[str, str, str] | None = None,
) -> BrokerError:
    """A librdkafka error through :func:`worker.edge.common.translate`; anything else keeps
    its repr. ``about``: (error name, resource names, operation) when the caller knows
    what a refusal of that name is about."""
    if not isinstance(err, KafkaError):
        err = kafka_error(err) or err
    if not isinstance(err, KafkaError):
        return BrokerError(f"{what}: {err!r}")
    found, operation = failure(err), ""
    if about is not None and about[0] == found.name:
        found = Failure(found.name, found.text, found.retriable, about[1])
        operation = about[2]
    return translate(what, found, security or {}, operation)


wrapped = wrapping(KafkaException, broker_error)


def denied(err: KafkaError) -> bool:
    return err.name() in AUTHORIZATION


def connect(
    client: Consumer | Producer, errors: Errors, what: str, timeout_s: float = CONNECT_TIMEOUT_S
) -> None:
    """Wait until ``client`` reached the cluster (a metadata answer); fail at the first
    error retrying cannot fix, or after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last: BaseException | None = None
    while True:
        try:
            client.list_topics(timeout=0.5)
            return
        except KafkaException as exc:
            last = exc
        if isinstance(client, Producer):
            client.poll(0)  # serves the error callback
        else:
            client.poll(0.0)  # not subscribed yet: serves callbacks, returns nothing
        if errors.cause:
            raise BrokerError(f"{what}: {errors.cause}", retriable=False)
        if time.monotonic() >= deadline:
            detail = errors.last.str() if errors.last is not None else repr(last)
            raise BrokerError(f"{what} to {errors.where}: {detail}", retriable=True)


def topic_partition(
    tp: TP, offset: int | None = None, metadata: str | None = None
) -> TopicPartition:
    if offset is None:
        return TopicPartition(tp[0], tp[1])
    if metadata is None:
        return TopicPartition(tp[0], tp[1], offset)
    return TopicPartition(tp[0], tp[1], offset, metadata=metadata)


def record_headers(found: Any) -> tuple[tuple[str, bytes], ...]:
    return tuple((k, v if v is not None else b"") for k, v in found or ())


def log_record_headers(found: Any) -> tuple[tuple[str, bytes | None], ...]:
    """A message's headers, losslessly (a null value stays None)."""
    return tuple((k, v) for k, v in found or ())


def offsets(positions: Positions) -> list[TopicPartition]:
    return [topic_partition(tp, pos, meta) for tp, (pos, meta) in positions.items()]
