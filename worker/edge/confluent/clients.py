"""The :mod:`worker.edge.client` interfaces, implemented with confluent-kafka (librdkafka):
the factory here, the parts in :mod:`.settings`, :mod:`.errors`, :mod:`.consumer`,
:mod:`.producer`, :mod:`.readers` and :mod:`.access`.

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
  error callback. Each client is built with one and connects before it is used
  (:mod:`.errors`): a refused login or certificate is one line naming it
  (the same words as kafka-python's, :mod:`worker.edge.common`), retriable=False.
* **Keys are partitioned as the Java client and kafka-python do** (``murmur2_random``),
  not with librdkafka's default CRC32, so both clients write a key to the same partition.
* **It can forget every broker.** A broker shutting down may answer metadata with no
  brokers at all; librdkafka then drops the brokers it knew and, by default, bootstraps
  again only after 5 minutes. mmstream's clients do so after
  :data:`~worker.edge.confluent.settings.REBOOTSTRAP_AFTER_MS`.
* **Its producer queue is bounded** (``queue.buffering.max.kbytes``); ``send`` waits for
  room (serving delivery reports) up to ``--transaction-wait-s`` instead of failing.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from worker.edge.common import (
    worker_access,
)
from worker.edge.confluent.access import check_access
from worker.edge.confluent.consumer import ConfluentConsumer
from worker.edge.confluent.producer import ConfluentProducer
from worker.edge.confluent.readers import ConfluentInspector, ConfluentRangeReader
from worker.edge.confluent.settings import common_settings, consumer_settings, producer_settings

if TYPE_CHECKING:
    from worker.config import KafkaSecurity, WorkerConfig

log = logging.getLogger(__name__)


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
