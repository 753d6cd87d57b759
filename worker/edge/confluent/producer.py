""":class:`~worker.edge.client.Producer` over librdkafka: a thread serves its delivery
reports; transactional calls librdkafka may not time out run on a helper thread."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from confluent_kafka import (
    KafkaError,
    KafkaException,
    Producer,
)

from worker.contract.errors import BrokerError
from worker.contract.records import OutRecord
from worker.edge.client import Positions
from worker.edge.confluent.errors import (
    Errors,
    broker_error,
    connect,
    kafka_error,
    offsets,
    wrapped,
)

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)


#: How much longer than the timeout it was given a transactional call may take before
#: it counts as stuck (:meth:`ConfluentProducer._call`).
TXN_GRACE_S = 5.0
#: Producers whose handle a stuck call still uses: kept alive, never destroyed.
_ABANDONED: list[Producer] = []


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
        self._errors = Errors(conf["bootstrap.servers"], security)
        try:
            self._p = Producer({**conf, "error_cb": self._errors})
        except KafkaException as exc:
            raise broker_error(what, exc, security) from exc
        connect(self._p, self._errors, what)
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
                err = kafka_error(exc)
                if err is not None and err.fatal():
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
        self,
        what: str,
        fn: Callable[..., Any],
        *args: Any,
        wait_s: float,
        about: tuple[str, str, str] | None = None,
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
                raise broker_error(what, failure[0], self.security, about=about) from failure[0]
            raise failure[0]

    def init_transactions(self) -> None:
        # librdkafka's admin client cannot check the transactional id's ACL beforehand.
        self._call(
            "cannot initialise transactions", self._p.init_transactions, 60.0, wait_s=60.0,
            about=("TRANSACTIONAL_ID_AUTHORIZATION_FAILED", repr(self.transactional_id), "Write"),
        )  # fmt: skip

    @wrapped("cannot begin a transaction")
    def begin_transaction(self) -> None:
        self._p.begin_transaction()

    def send_offsets_to_transaction(self, positions: Positions, group_metadata: object) -> None:
        self._call(
            "cannot add offsets to the transaction",
            self._p.send_offsets_to_transaction,
            offsets(positions),
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
