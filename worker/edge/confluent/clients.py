"""The :mod:`worker.edge.client` interfaces, implemented with confluent-kafka (librdkafka).

``--kafka-client confluent`` (the optional extra ``mmstream[confluent]``). Same semantics
as :mod:`worker.edge.kafka_python`: manual commits with finished offsets in the commit
metadata, transactions with ``send_offsets_to_transaction``, cooperative-sticky
rebalancing with revocations queued for the loop, static membership, pause and resume,
every codec (built into librdkafka), the security settings mapped to librdkafka's.

What librdkafka does differently, and how it is met here:

* **Callbacks are served by the caller.** Rebalance and error callbacks run inside the
  consumer's :meth:`poll`; delivery reports only from ``Producer.poll``/``flush``, so each
  producer has a thread that serves them (``on_ack``/``on_error`` run there).
* **It retries authentication and TLS failures for ever**, reporting them only to an
  error callback. Each client is built with one (:class:`_Errors`) and connects before it
  is used (:func:`_connect`): a refused login or certificate is one line naming it
  (the same words as kafka-python's, :mod:`worker.edge.common`), retriable=False.
* **Keys are partitioned as the Java client and kafka-python do** (``murmur2_random``),
  not with librdkafka's default CRC32, so both clients write a key to the same partition.
* **It can forget every broker.** A broker shutting down may answer metadata with no
  brokers at all; librdkafka then drops the brokers it knew and, by default, bootstraps
  again only after 5 minutes. mmstream's clients do so after
  :data:`REBOOTSTRAP_AFTER_MS`.
* **Its producer queue is bounded** (``queue.buffering.max.kbytes``); ``send`` waits for
  room (serving delivery reports) up to ``--transaction-wait-s`` instead of failing.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, cast

from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_END,
    TIMESTAMP_LOG_APPEND_TIME,
    TIMESTAMP_NOT_AVAILABLE,
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)

from worker.config import check_compression
from worker.contract.errors import BrokerError
from worker.contract.records import LogRecord, OutRecord, RawRecord, SourceRef
from worker.edge.client import TP, Positions
from worker.edge.common import (
    AUTHORIZATION,
    FETCH_MAX_BYTES,
    PARTITION_FETCH_BYTES,
    Failure,
    Progress,
    authentication_failed,
    checkpoint_metadata,
    tls_failure,
    translate,
    worker_access,
    wrapping,
)
from worker.edge.confluent.access import check_access

if TYPE_CHECKING:
    from worker.config import KafkaSecurity, WorkerConfig

log = logging.getLogger(__name__)

#: How long a new client may take to reach the cluster before it fails.
CONNECT_TIMEOUT_S = 30.0
#: Blocking lookups (committed offsets, metadata, watermarks).
LOOKUP_TIMEOUT_S = 10.0

#: How much longer than the timeout it was given a transactional call may take before
#: it counts as stuck (:meth:`ConfluentProducer._call`).
TXN_GRACE_S = 5.0
#: Producers whose handle a stuck call still uses: kept alive, never destroyed.
_ABANDONED: list[Producer] = []

# ------------------------------------------------------------------ settings


#: librdkafka bootstraps again after this long without metadata from any broker: its
#: default (5 min) strands a client that a shutting-down cluster told of no brokers.
REBOOTSTRAP_AFTER_MS = 10_000


#: How long librdkafka waits before fetching a partition again once its prefetch queue is
#: full: its default, 1 000 ms, idles a consumer that drains the queue sooner
#: (docs/benchmarks.md).
FETCH_QUEUE_BACKOFF_MS = 10

#: ``coordinator.query.interval.ms`` of the worker's consumer (librdkafka: 600 000).
COORDINATOR_QUERY_MS = 10_000

#: The fetch settings of every mmstream consumer on librdkafka (as kafka-python's).
FETCH_SETTINGS: dict[str, Any] = {
    "fetch.max.bytes": FETCH_MAX_BYTES,
    "max.partition.fetch.bytes": PARTITION_FETCH_BYTES,
    "fetch.queue.backoff.ms": FETCH_QUEUE_BACKOFF_MS,
}


def common_settings(bootstrap_servers: str, security: KafkaSecurity) -> dict[str, Any]:
    """What every librdkafka client of mmstream sets: where, how securely, re-bootstrap."""
    return {
        "bootstrap.servers": bootstrap_servers,
        "metadata.recovery.strategy": "rebootstrap",
        "metadata.recovery.rebootstrap.trigger.ms": REBOOTSTRAP_AFTER_MS,
        **librdkafka_security(security),
    }


def librdkafka_security(security: KafkaSecurity) -> dict[str, Any]:
    """The ``--security-*``, ``--sasl-*`` and ``--ssl-*`` settings as librdkafka's."""
    out: dict[str, Any] = {"security.protocol": security.security_protocol.lower()}
    if security.security_protocol.startswith("SASL"):
        out.update(
            {
                "sasl.mechanism": security.sasl_mechanism,
                "sasl.username": security.sasl_username,
                "sasl.password": security.sasl_password,
            }
        )
    for ours, theirs in (
        ("ssl_cafile", "ssl.ca.location"),
        ("ssl_certfile", "ssl.certificate.location"),
        ("ssl_keyfile", "ssl.key.location"),
    ):
        value = getattr(security, ours)
        if value is not None:
            out[theirs] = str(value)
    return out


def _compression(compression_type: str | None) -> str:
    if compression_type is None:
        return "none"
    check_compression(compression_type)
    return compression_type


# ------------------------------------------------------------------ errors


class _Errors:
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


def broker_error(
    what: str,
    err: KafkaError | BaseException,
    security: dict[str, Any] | None = None,
    *,
    names: str = "",
    operation: str = "",
) -> BrokerError:
    """A librdkafka error through :func:`worker.edge.common.translate` (``names`` and
    ``operation``: what a refused ACL is about, when the caller knows); anything else
    keeps its repr."""
    if isinstance(err, KafkaException) and err.args and isinstance(err.args[0], KafkaError):
        err = err.args[0]
    if not isinstance(err, KafkaError):
        return BrokerError(f"{what}: {err!r}")
    found = failure(err)
    if names:
        found = Failure(found.name, found.text, found.retriable, names)
    return translate(what, found, security or {}, operation)


_wrapped = wrapping(KafkaException, broker_error)


def _denied(err: KafkaError) -> bool:
    return err.name() in AUTHORIZATION


def _connect(
    client: Consumer | Producer, errors: _Errors, what: str, timeout_s: float = CONNECT_TIMEOUT_S
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


def _tp(tp: TP, offset: int | None = None, metadata: str | None = None) -> TopicPartition:
    if offset is None:
        return TopicPartition(tp[0], tp[1])
    if metadata is None:
        return TopicPartition(tp[0], tp[1], offset)
    return TopicPartition(tp[0], tp[1], offset, metadata=metadata)


def _headers(found: Any) -> tuple[tuple[str, bytes], ...]:
    return tuple((k, v if v is not None else b"") for k, v in found or ())


def _log_headers(found: Any) -> tuple[tuple[str, bytes | None], ...]:
    """A message's headers, losslessly (a null value stays None)."""
    return tuple((k, v) for k, v in found or ())


def _offsets(positions: Positions) -> list[TopicPartition]:
    return [_tp(tp, pos, meta) for tp, (pos, meta) in positions.items()]


# ------------------------------------------------------------------ the consumer

#: How often librdkafka reports its statistics to a consumer (its group state is read
#: from them): about 7 KB of JSON a second for a few partitions.
STATS_INTERVAL_MS = 1000

#: librdkafka's consumer group state and join state of a member in a stable group.
GROUP_UP = ("up", "steady")


def group_state(stats: str) -> tuple[str, str] | None:
    """The ``cgrp`` state and join state in librdkafka's statistics JSON (e.g. ``("up",
    "steady")``, ``("query-coord", "init")`` once the member was lost while its
    coordinator is away); None for a consumer with no group, or statistics it cannot read."""
    try:
        group = json.loads(stats).get("cgrp")
        return (str(group["state"]), str(group["join_state"])) if group else None
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


def consumer_settings(config: WorkerConfig) -> dict[str, Any]:
    """The worker's consumer settings, as kafka-python's (:mod:`worker.edge.kafka_python.build`)."""
    conf: dict[str, Any] = {
        **common_settings(config.bootstrap_servers, config),
        "group.id": config.group_id,
        "client.id": config.client_id,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": config.auto_offset_reset,
        "partition.assignment.strategy": "cooperative-sticky",
        "session.timeout.ms": config.session_timeout_ms,
        "heartbeat.interval.ms": max(300, min(1000, config.session_timeout_ms // 3)),
        "isolation.level": (
            "read_committed" if config.guarantee == "exactly-once" else "read_uncommitted"
        ),
        "topic.metadata.refresh.interval.ms": 30_000,
        # librdkafka's 10 min left a consumer out of its group for over a minute after a
        # broker restart answered "Not coordinator" (confluentinc/librdkafka#2944).
        "coordinator.query.interval.ms": COORDINATOR_QUERY_MS,
        # The group's state comes with librdkafka's statistics (ConfluentConsumer.in_group).
        "statistics.interval.ms": STATS_INTERVAL_MS,
        # Prefetched records wait in librdkafka's queue beside what the worker holds:
        # never more than the worker's own byte bound (a larger record still comes alone).
        **FETCH_SETTINGS,
        "fetch.max.bytes": min(FETCH_MAX_BYTES, config.max_pending_bytes),
        "max.partition.fetch.bytes": min(PARTITION_FETCH_BYTES, config.max_pending_bytes),
        "queued.max.messages.kbytes": max(1024, min(65_536, config.max_pending_bytes // 1024)),
    }
    if config.group_instance_id:
        conf["group.instance.id"] = config.group_instance_id
    return conf


class ConfluentConsumer:
    """:class:`~worker.edge.client.Consumer` over a librdkafka ``Consumer``."""

    def __init__(
        self, conf: dict[str, Any], security: dict[str, Any], what: str, *, earliest: bool = True
    ) -> None:
        self.security = security
        self._earliest = earliest  # auto.offset.reset, for a position nothing set yet
        self._errors = _Errors(conf["bootstrap.servers"], security)
        try:
            self._c = Consumer({**conf, "error_cb": self._errors, "stats_cb": self._stats})
        except KafkaException as exc:
            raise broker_error(what, exc, security) from exc
        #: the group's state in librdkafka's last statistics (None: none came yet)
        self._group_up: bool | None = None
        try:
            _connect(self._c, self._errors, what)
        except BaseException:
            self._c.close()
            raise
        #: revoked or lost partitions, queued by the callbacks; librdkafka runs those inside
        #: poll() and close(), on the caller's thread, so no lock is needed
        self._events: list[frozenset[TP]] = []
        self._assigned: set[TP] = set()
        self._paused: set[TP] = set()
        #: next offset per partition: what was returned or sought (librdkafka's position
        #: is unknown until a record came)
        self._next: dict[TP, int] = {}
        self._joined = False
        self._direct = False

    # -- rebalance callbacks (run inside poll, on the loop's thread)

    def _on_assign(self, _c: Any, parts: list[TopicPartition]) -> None:
        tps = {(p.topic, p.partition) for p in parts}
        log.info("partitions assigned: %s", sorted(tps))
        self._assigned |= tps
        self._joined = True

    def _on_revoke(self, _c: Any, parts: list[TopicPartition]) -> None:
        tps = frozenset((p.topic, p.partition) for p in parts)
        if tps:
            log.info("partitions revoked: %s", sorted(tps))
            self._events.append(tps)
        self._assigned -= tps
        self._paused -= tps
        for tp in tps:
            self._next.pop(tp, None)

    def _stats(self, stats: str) -> None:
        # Served inside poll(), on the loop's thread, every statistics.interval.ms.
        state = group_state(stats)
        if state is not None:
            self._group_up = state == GROUP_UP

    @_wrapped("cannot subscribe")
    def subscribe(self, topic: str) -> None:
        self._c.subscribe(
            [topic], on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_revoke
        )

    @_wrapped("cannot assign partitions")
    def assign(self, tps: Iterable[TP]) -> None:
        wanted = sorted(tps)
        self._c.assign([_tp(tp) for tp in wanted])
        self._assigned = set(wanted)
        self._direct = self._joined = True

    def poll(self, timeout_ms: int, max_records: int) -> list[RawRecord]:
        try:
            # consume(n, t) waits for n records or the whole of t: wait for the first
            # only, then take what is there.
            first = self._c.poll(timeout_ms / 1000)
            if first is None:
                return []
            messages = [first]
            if max_records > 1:
                messages += self._c.consume(max_records - 1, 0)
        except KafkaException as exc:
            raise broker_error("Kafka poll failed", exc, self.security) from exc
        out: list[RawRecord] = []
        owned, nxt = self._assigned, self._next
        for m in messages:
            err = m.error()
            if err is not None:
                self._message_error(err)
                continue
            tp = (m.topic(), m.partition())
            if tp not in owned:
                continue  # revoked during this poll: its new owner reads it
            offset = cast(int, m.offset())
            nxt[tp] = offset + 1
            out.append(
                RawRecord(
                    source=SourceRef(tp[0], tp[1], offset, m.timestamp()[1]),
                    key=m.key(),
                    value=m.value(),
                    headers=_headers(m.headers()),
                )
            )
        return out

    def _message_error(self, err: KafkaError) -> None:
        if err.code() == KafkaError._PARTITION_EOF:
            return
        failure = broker_error("Kafka poll failed", err, self.security)
        # A fatal error reaches the consumer as a message whose code is _FATAL (its own
        # fatal flag unset): the instance is unusable (e.g. a static member fenced).
        if err.fatal() or err.code() == KafkaError._FATAL or _denied(err):
            raise failure
        log.warning("%s", failure)

    def revocations(self) -> list[frozenset[TP]]:
        out, self._events = self._events, []
        return out

    def revocation_pending(self) -> bool:
        return bool(self._events)

    def joined(self) -> bool:
        return self._joined

    def in_group(self) -> bool:
        return self._direct or (self._joined and self._group_up is not False)

    def owned(self) -> set[TP]:
        return set(self._assigned)

    def assignment(self) -> set[TP]:
        return set(self._assigned)

    @_wrapped("cannot pause")
    def pause(self, tps: Iterable[TP]) -> None:
        wanted = [tp for tp in tps if tp in self._assigned]
        if wanted:
            self._c.pause([_tp(tp) for tp in wanted])
            self._paused.update(wanted)

    @_wrapped("cannot resume")
    def resume(self, tps: Iterable[TP]) -> None:
        wanted = [tp for tp in tps if tp in self._paused]
        if wanted:
            self._c.resume([_tp(tp) for tp in wanted])
            self._paused.difference_update(wanted)

    def paused(self) -> set[TP]:
        return set(self._paused)

    def caught_up(self, tp: TP) -> bool:
        # The high watermark of the last fetch response (cached: no request).
        _low, high = self._c.get_watermark_offsets(_tp(tp), cached=True)
        pos = self._next.get(tp)
        return pos is not None and high >= 0 and pos >= high

    @_wrapped("cannot seek")
    def _seek(self, tp: TP, offset: int) -> None:
        # Not Consumer.seek(), which waits without a timeout for a fetcher whose leader may
        # be down (docs/architecture.md): re-assigning the one partition locally does not.
        if tp not in self._assigned:
            raise BrokerError(f"cannot seek {tp}: it is not assigned", retriable=False)
        self._c.incremental_unassign([_tp(tp)])
        self._c.incremental_assign([_tp(tp, offset)])
        if tp in self._paused:
            self._c.pause([_tp(tp)])

    def seek(self, tp: TP, offset: int) -> None:
        self._seek(tp, offset)
        self._next[tp] = offset

    def seek_to_beginning(self, tp: TP) -> None:
        self._seek(tp, OFFSET_BEGINNING)
        self._next.pop(tp, None)

    def seek_to_end(self, tp: TP) -> None:
        self._seek(tp, OFFSET_END)
        self._next.pop(tp, None)

    @_wrapped("cannot read the position")
    def position(self, tp: TP) -> int:
        if tp in self._next:
            return self._next[tp]
        (found,) = self._c.position([_tp(tp)])
        if found.offset >= 0:
            return int(found.offset)
        committed, _meta = self.committed(tp)
        if committed is not None:
            return committed
        low, high = self._c.get_watermark_offsets(_tp(tp), timeout=LOOKUP_TIMEOUT_S)
        return int(low if self._earliest else high)

    @_wrapped("cannot read the committed offset")
    def committed(self, tp: TP) -> tuple[int | None, str]:
        (found,) = self._c.committed([_tp(tp)], timeout=LOOKUP_TIMEOUT_S)
        if found.error is not None:
            raise broker_error("cannot read the committed offset", found.error, self.security)
        if found.offset < 0:
            return None, ""
        return int(found.offset), checkpoint_metadata(found.metadata)

    @_wrapped("commit failed")
    def commit(self, positions: Positions) -> None:
        if not positions:
            return
        done = self._c.commit(offsets=_offsets(positions), asynchronous=False)
        for tp in done or ():
            if tp.error is not None:
                raise broker_error("commit failed", tp.error, self.security)

    def group_metadata(self) -> object:
        return self._c.consumer_group_metadata()

    def partitions_for(self, topic: str) -> set[int]:
        try:
            found = self._c.list_topics(topic, timeout=LOOKUP_TIMEOUT_S).topics.get(topic)
        except KafkaException as exc:
            log.debug("no metadata for %s yet: %s", topic, exc)
            return set()
        if found is None or found.error is not None:
            return set()
        return set(found.partitions)

    def close(self) -> None:
        try:
            self._c.close()
        except (KafkaException, RuntimeError) as exc:
            log.warning("closing the consumer failed: %r", exc)


# ------------------------------------------------------------------ the producer


def producer_settings(
    bootstrap_servers: str,
    client_id: str,
    security: KafkaSecurity,
    *,
    compression_type: str | None = None,
    transactional_id: str = "",
) -> dict[str, Any]:
    """An idempotent producer with acks=all, keys partitioned like the Java client's."""
    conf: dict[str, Any] = {
        **common_settings(bootstrap_servers, security),
        "client.id": client_id,
        "acks": "all",
        "enable.idempotence": True,
        "linger.ms": 5,
        "partitioner": "murmur2_random",
        "message.max.bytes": 32 * 1024 * 1024,
        "compression.type": _compression(compression_type),
    }
    if transactional_id:
        conf["transactional.id"] = transactional_id
    else:
        conf["delivery.timeout.ms"] = 120_000  # kafka-python's default
    return conf


class ConfluentProducer:
    """:class:`~worker.edge.client.Producer` over a librdkafka ``Producer``; a thread
    serves its delivery reports."""

    def __init__(
        self,
        conf: dict[str, Any],
        security: dict[str, Any],
        *,
        transaction_wait_s: float = 20.0,
        what: str = "cannot connect producer",
    ) -> None:
        self.security = security
        self.transactional_id = str(conf.get("transactional.id", ""))
        self._wait_s = transaction_wait_s
        self._errors = _Errors(conf["bootstrap.servers"], security)
        try:
            self._p = Producer({**conf, "error_cb": self._errors})
        except KafkaException as exc:
            raise broker_error(what, exc, security) from exc
        _connect(self._p, self._errors, what)
        self._stuck: threading.Thread | None = None
        self._closed = threading.Event()
        self._server = threading.Thread(
            target=self._serve, name="mmstream-delivery-reports", daemon=True
        )
        self._server.start()

    def _serve(self) -> None:
        while not self._closed.is_set():
            try:
                self._p.poll(0.1)
            except KafkaException as exc:
                # A fatal error (e.g. a refused transactional id) is raised by poll too; the
                # call that met it reports it, and a fatal producer has nothing left to serve.
                log.debug("delivery reports: %s", exc)
                err = exc.args[0] if exc.args else None
                if isinstance(err, KafkaError) and err.fatal():
                    return
                time.sleep(0.1)

    def send(
        self,
        record: OutRecord,
        on_ack: Callable[[], None],
        on_error: Callable[[BaseException], None],
    ) -> None:
        what, security = f"cannot write to {record.topic}", self.security

        def report(err: KafkaError | None, _msg: Any) -> None:
            if err is None:
                on_ack()
            else:
                on_error(broker_error(what, err, security))

        deadline = 0.0
        while True:
            try:
                if record.partition is None and record.timestamp_ms is None:
                    self._p.produce(
                        record.topic, record.value, record.key,
                        headers=list(record.headers), on_delivery=report,
                    )  # fmt: skip
                else:  # librdkafka: partition -1 = the partitioner's, timestamp 0 = now
                    self._p.produce(
                        record.topic, record.value, record.key,
                        partition=-1 if record.partition is None else record.partition,
                        timestamp=record.timestamp_ms or 0,
                        headers=list(record.headers), on_delivery=report,
                    )  # fmt: skip
                return
            except BufferError:
                # librdkafka's queue is full: wait for acknowledgements to make room.
                now = time.monotonic()
                deadline = deadline or now + self._wait_s
                if now >= deadline:
                    raise BrokerError(
                        f"cannot send to {record.topic}: the client's queue stayed full for "
                        f"{self._wait_s:g} s (--transaction-wait-s)",
                        retriable=True,
                    ) from None
                self._p.flush(0.05)
            except KafkaException as exc:
                raise broker_error(f"cannot send to {record.topic}", exc, security) from exc

    def flush(self, timeout_s: float) -> None:
        left = self._p.flush(timeout_s)
        if left:
            raise BrokerError(
                f"flush failed: {left} records not acknowledged within {timeout_s:g} s",
                retriable=True,
            )

    def _call(
        self, what: str, fn: Callable[..., Any], *args: Any, wait_s: float, **denied: str
    ) -> None:
        """``fn(*args)`` (a transactional call given ``wait_s`` as its timeout), on a
        helper thread, waited for at most ``wait_s`` + :data:`TXN_GRACE_S`.

        librdkafka does not always keep these timeouts: ``send_offsets_to_transaction``
        waits for ever once the group coordinator it cached is gone
        (confluentinc/librdkafka#5456, #5511). A call that overstays fails with a
        retriable error and marks the producer stuck: its later transactional calls
        fail at once, so the loop replaces it (:class:`worker.core.guarantee.ExactlyOnce`).
        """
        if self._stuck is not None:
            raise BrokerError(
                f"{what}: an earlier transactional call of this producer never returned "
                "(librdkafka ignored its timeout); the producer must be replaced",
                retriable=True,
            )
        failure: list[BaseException] = []
        done = threading.Event()

        def run() -> None:
            try:
                fn(*args)
            except BaseException as exc:  # handed to the caller
                failure.append(exc)
            finally:
                done.set()

        helper = threading.Thread(target=run, name="mmstream-transaction-call", daemon=True)
        helper.start()
        if not done.wait(wait_s + TXN_GRACE_S):
            self._stuck = helper
            raise BrokerError(
                f"{what}: librdkafka did not return within {wait_s + TXN_GRACE_S:g} s "
                f"(its timeout was {wait_s:g} s; confluentinc/librdkafka#5456)",
                retriable=True,
            )
        if failure:
            if isinstance(failure[0], KafkaException):
                raise broker_error(what, failure[0], self.security, **denied) from failure[0]
            raise failure[0]

    def init_transactions(self) -> None:
        # librdkafka's admin client cannot check the transactional id's ACL beforehand.
        self._call(
            "cannot initialise transactions", self._p.init_transactions, 60.0, wait_s=60.0,
            names=repr(self.transactional_id), operation="Write",
        )  # fmt: skip

    @_wrapped("cannot begin a transaction")
    def begin_transaction(self) -> None:
        self._p.begin_transaction()

    def send_offsets_to_transaction(self, positions: Positions, group_metadata: object) -> None:
        self._call(
            "cannot add offsets to the transaction",
            self._p.send_offsets_to_transaction,
            _offsets(positions),
            group_metadata,
            self._wait_s,
            wait_s=self._wait_s,
        )

    def commit_transaction(self) -> None:
        self._call(
            "cannot commit the transaction",
            self._p.commit_transaction,
            self._wait_s,
            wait_s=self._wait_s,
        )

    def abort_transaction(self) -> None:
        self._call(
            "cannot abort the transaction",
            self._p.abort_transaction,
            self._wait_s,
            wait_s=self._wait_s,
        )

    def close(self, timeout_s: float) -> None:
        if self._stuck is not None:
            # A helper thread is still inside librdkafka with this handle: never destroy
            # it under that call. Kept for the life of the process (fenced by the
            # producer that replaces it; its queued records were never committed).
            log.warning("closing a stuck producer: its handle is left to the process")
            _ABANDONED.append(self._p)
        else:
            left = self._p.flush(timeout_s)
            if left:
                log.warning("closing the producer: %d records not acknowledged, dropped", left)
                self._p.purge()
        self._closed.set()
        self._server.join(timeout=1.0)


# ------------------------------------------------------------------ the inspector


class ConfluentInspector:
    """:class:`~worker.edge.client.Inspector` over a group-less librdkafka ``Consumer``."""

    def __init__(
        self, bootstrap_servers: str, security: KafkaSecurity, read_committed: bool
    ) -> None:
        self.security = security.kafka_security()
        self._conf: dict[str, Any] = {
            **common_settings(bootstrap_servers, security),
            "enable.auto.commit": False,
            "isolation.level": "read_committed" if read_committed else "read_uncommitted",
        }
        self._c = self._consumer("mmstream-inspector")

    def _consumer(self, group: str) -> Consumer:
        errors = _Errors(self._conf["bootstrap.servers"], self.security)
        try:
            c = Consumer({**self._conf, "group.id": group, "error_cb": errors})
        except KafkaException as exc:
            raise broker_error("cannot connect", exc, self.security) from exc
        try:
            _connect(c, errors, "cannot connect")
        except BaseException:
            c.close()
            raise
        return c

    @_wrapped("cannot read topic metadata")
    def partitions(self, topic: str) -> list[int]:
        found = self._c.list_topics(topic, timeout=LOOKUP_TIMEOUT_S).topics.get(topic)
        if found is None or found.error is not None:
            return []
        return sorted(found.partitions)

    @_wrapped("cannot read offsets")
    def offset_bounds(self, topic: str, partitions: Iterable[int]) -> dict[int, tuple[int, int]]:
        out: dict[int, tuple[int, int]] = {}
        for p in partitions:
            low, high = self._c.get_watermark_offsets(
                TopicPartition(topic, p), timeout=LOOKUP_TIMEOUT_S
            )
            out[p] = (int(low), int(high))
        return out

    @_wrapped("cannot look up offsets by time")
    def offsets_for_time(
        self, topic: str, partitions: Iterable[int], ms: int
    ) -> dict[int, int | None]:
        wanted = [TopicPartition(topic, p, max(0, ms)) for p in partitions]
        if not wanted:
            return {}
        found = self._c.offsets_for_times(wanted, timeout=LOOKUP_TIMEOUT_S)
        return {tp.partition: (int(tp.offset) if tp.offset >= 0 else None) for tp in found}

    @_wrapped("cannot read the group's checkpoint")
    def committed(self, group: str, topic: str, partitions: Iterable[int]) -> dict[int, int | None]:
        wanted = [TopicPartition(topic, p) for p in partitions]
        reader = self._consumer(group)
        try:  # reads the checkpoint; joins nothing, commits nothing
            found = reader.committed(wanted, timeout=LOOKUP_TIMEOUT_S) if wanted else []
        finally:
            reader.close()
        return {tp.partition: (int(tp.offset) if tp.offset >= 0 else None) for tp in found}

    def close(self) -> None:
        self._c.close()


# ------------------------------------------------------------------ the range reader

#: librdkafka's timestamp types (``Message.timestamp()[0]``) as an archive names them.
_TIMESTAMP_TYPES = {TIMESTAMP_LOG_APPEND_TIME: "log_append"}


class ConfluentRangeReader:
    """:class:`~worker.edge.client.RangeReader` over a librdkafka ``Consumer`` that assigns
    partitions itself (never subscribes, never commits: it leaves no group behind)."""

    def __init__(self, bootstrap_servers: str, security: KafkaSecurity, client_id: str) -> None:
        self.security = security.kafka_security()
        conf = {
            **common_settings(bootstrap_servers, security),
            "client.id": client_id,
            "group.id": client_id,  # librdkafka wants one; nothing joins or commits
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "allow.auto.create.topics": False,
            # A range start deleted by retention while reading is an error, never a skip.
            "auto.offset.reset": "error",
            # The end of a partition's log is reported: a range ending in transaction
            # markers (offsets no record is returned for) ends there.
            "enable.partition.eof": True,
            **FETCH_SETTINGS,
        }
        self._errors = _Errors(bootstrap_servers, self.security)
        try:
            self._c = Consumer({**conf, "error_cb": self._errors})
        except KafkaException as exc:
            raise broker_error("cannot connect consumer", exc, self.security) from exc
        try:
            _connect(self._c, self._errors, "cannot connect consumer")
        except BaseException:
            self._c.close()
            raise

    def read(
        self, topic: str, partition: int, start: int, end: int, timeout_s: float
    ) -> Iterator[LogRecord]:
        if end <= start:
            return
        where = f"{topic}/{partition} [{start}, {end})"
        try:
            self._c.assign([TopicPartition(topic, partition, start)])
        except KafkaException as exc:
            raise broker_error(f"reading {where}", exc, self.security) from exc
        progress = Progress(where, start, timeout_s)
        position = start
        while position < end:
            try:
                messages = self._c.consume(500, 0.2)
            except KafkaException as exc:
                raise broker_error(f"reading {where}", exc, self.security) from exc
            for m in messages:
                err = m.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        position = max(position, cast(int, m.offset()))
                        continue
                    if err.code() == KafkaError._AUTO_OFFSET_RESET:
                        raise BrokerError(
                            f"reading {where}: offset {position} is no longer in the log "
                            f"(deleted by retention?): {err.str()}",
                            retriable=False,
                        )
                    if err.fatal() or _denied(err):
                        raise broker_error(f"reading {where}", err, self.security)
                    log.warning("reading %s: %s", where, err.str())
                    continue
                if m.topic() != topic or m.partition() != partition:
                    continue
                offset = cast(int, m.offset())
                if offset >= end:
                    position = end
                    break
                position = max(position, offset + 1)
                if offset >= start:
                    ts_type, ts = m.timestamp()
                    yield LogRecord(
                        topic=topic,
                        partition=partition,
                        offset=offset,
                        timestamp=ts if ts_type != TIMESTAMP_NOT_AVAILABLE else -1,
                        timestamp_type=_TIMESTAMP_TYPES.get(ts_type, "create"),
                        key=m.key(),
                        value=m.value(),
                        headers=_log_headers(m.headers()),
                    )
            progress.at(position)

    def close(self) -> None:
        try:
            self._c.close()
        except (KafkaException, RuntimeError) as exc:
            log.warning("closing the range reader failed: %r", exc)


# ------------------------------------------------------------------ the factory


class ConfluentClients:
    """:class:`~worker.edge.client.Clients` with librdkafka (``--kafka-client confluent``)."""

    def consumer(self, config: WorkerConfig) -> ConfluentConsumer:
        security = config.kafka_security()
        consumer = ConfluentConsumer(
            consumer_settings(config),
            security,
            "cannot connect consumer",
            earliest=config.auto_offset_reset == "earliest",
        )
        if config.security_protocol != "PLAINTEXT":
            # Before joining: a missing ACL is one line naming it, and nothing is assigned.
            try:
                check_access(
                    common_settings(config.bootstrap_servers, config),
                    security,
                    worker_access(config),
                )
            except BaseException:
                consumer.close()
                raise
        return consumer

    def producer(self, config: WorkerConfig) -> ConfluentProducer:
        conf = producer_settings(
            config.bootstrap_servers,
            config.client_id,
            config,
            compression_type=config.compression_type,
            transactional_id=(
                config.transactional_id if config.guarantee == "exactly-once" else ""
            ),
        )
        return ConfluentProducer(
            conf, config.kafka_security(), transaction_wait_s=config.transaction_wait_s
        )

    def inspector(
        self, bootstrap_servers: str, security: KafkaSecurity, *, read_committed: bool = False
    ) -> ConfluentInspector:
        return ConfluentInspector(bootstrap_servers, security, read_committed)

    def plain_producer(
        self,
        bootstrap_servers: str,
        security: KafkaSecurity,
        *,
        client_id: str,
        compression_type: str | None = None,
    ) -> ConfluentProducer:
        conf = producer_settings(
            bootstrap_servers, client_id, security, compression_type=compression_type
        )
        return ConfluentProducer(conf, security.kafka_security())

    def range_reader(
        self, bootstrap_servers: str, security: KafkaSecurity, *, client_id: str
    ) -> ConfluentRangeReader:
        return ConfluentRangeReader(bootstrap_servers, security, client_id)
