"""The ACL check (:func:`worker.edge.common.check_access`) with librdkafka's admin client.

It asks, as the client's own principal, for the authorized operations on each topic
and on the group (KIP-430). librdkafka's admin client cannot describe a transactional
id; a missing Write on it is reported by the producer's ``init_transactions``, in the
same words (:meth:`~worker.edge.confluent.clients.ConfluentProducer.init_transactions`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from confluent_kafka import KafkaError, KafkaException, TopicCollection
from confluent_kafka.admin import AdminClient

from worker.edge.common import AccessProbe, Allowed, TopicAccess
from worker.edge.common import check_access as common_check_access
from worker.edge.confluent.errors import kafka_error

log = logging.getLogger(__name__)

#: What a group's coordinator answers before it is ready (librdkafka does not flag these
#: retriable in an admin result).
_NOT_READY = frozenset(
    {
        KafkaError.COORDINATOR_NOT_AVAILABLE,
        KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
        KafkaError.NOT_COORDINATOR,
        KafkaError._TIMED_OUT,
        KafkaError._TRANSPORT,
    }
)


def _allowed(ops: Any) -> Allowed:
    return frozenset(op.name for op in ops) if ops else None


class AdminProbe:
    """:class:`~worker.edge.common.AccessProbe` over librdkafka's ``AdminClient``."""

    def __init__(self, admin: AdminClient, timeout_s: float) -> None:
        self.admin = admin
        self.timeout_s = timeout_s

    def topics(self, names: list[str]) -> dict[str, Allowed]:
        out: dict[str, Allowed] = {}
        try:
            futures = self.admin.describe_topics(
                TopicCollection(names),
                include_authorized_operations=True,
                request_timeout=self.timeout_s,
            )
        except KafkaException as exc:
            log.debug("topic access check skipped: %r", exc)
            return out
        for name, future in futures.items():
            try:
                out[name] = _allowed(future.result(timeout=self.timeout_s).authorized_operations)
            except Exception as exc:  # not found, or cannot say: left to the client
                err = kafka_error(exc)
                if err is not None and err.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED:
                    out[name] = "denied"
                else:
                    log.debug("topic access check of %s skipped: %r", name, exc)
        return out

    def group(self, name: str) -> Allowed:
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                future = self.admin.describe_consumer_groups(
                    [name], include_authorized_operations=True, request_timeout=self.timeout_s
                )[name]
                return _allowed(future.result(timeout=self.timeout_s).authorized_operations)
            except Exception as exc:
                err = kafka_error(exc)
                if err is not None and err.code() == KafkaError.GROUP_AUTHORIZATION_FAILED:
                    return "denied"
                # The coordinator may not be ready on a fresh cluster: try again briefly.
                waiting = err is not None and (err.retriable() or err.code() in _NOT_READY)
                if not waiting or time.monotonic() >= deadline:
                    log.debug("group access check skipped: %r", exc)
                    return None
                time.sleep(0.2)

    def transactional_id_denied(self, name: str) -> bool:
        return False  # the producer's init_transactions says so (module docstring)


def check_access(
    settings: Mapping[str, Any],
    security: Mapping[str, Any],
    need: TopicAccess,
    *,
    timeout_s: float = 10.0,
) -> None:
    """Check ``need`` with an admin client of ``settings`` (librdkafka's: where, how
    securely); ``security``: the same as keywords, for the principal's name."""
    probe: AccessProbe = AdminProbe(AdminClient(dict(settings)), timeout_s)
    common_check_access(probe, need, security)
