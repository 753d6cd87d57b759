"""kafka-python's private state that mmstream reads, in one place.

kafka-python 3.0 has no public API for these, and each one matters:

* whether the member is in its group: the coordinator's member state and heartbeat
  (a static member fenced by a newer one stays "stable" with its heartbeat off);
* whether a partition is read to its end, from the subscription state's position and
  high watermark (``KafkaConsumer.position`` may block on a committed-offset refresh);
* the producer's transaction manager and sender, to wait for a transactional call at
  most ``--transaction-wait-s`` (the public calls wait without a timeout).

Nothing else of the edge reads a private attribute of kafka-python;
``tests/test_kafka_python_edge.py`` fails when the library renames or drops one of these.
"""

from __future__ import annotations

from typing import Any

from kafka import KafkaConsumer, KafkaProducer
from kafka.structs import TopicPartition

#: (class, attribute) pairs this module relies on (checked by the tests).
RELIES_ON = (
    ("kafka.KafkaConsumer.__init__", "self._coordinator"),
    ("kafka.KafkaConsumer.__init__", "self._subscription"),
    ("kafka.coordinator.base.BaseCoordinator", "def stable"),
    ("kafka.coordinator.base.BaseCoordinator", "self._heartbeat_enabled"),
    ("kafka.coordinator.base.BaseCoordinator.__init__", "self.coordinator_id"),
    ("kafka.consumer.subscription_state.SubscriptionState.__init__", "self.assignment"),
    ("kafka.consumer.subscription_state.TopicPartitionState.__init__", "self.highwater"),
    ("kafka.consumer.subscription_state.TopicPartitionState", "position = property"),
    ("kafka.KafkaProducer.__init__", "self._transaction_manager"),
    ("kafka.KafkaProducer.__init__", "self._sender"),
    ("kafka.producer.sender.Sender", "def wakeup"),
)


def member_stable(consumer: KafkaConsumer) -> bool:
    """STABLE once a join and its sync succeeded (even with no partitions assigned); read
    without side effects (``coordinator_unknown()`` may mark the coordinator dead)."""
    return bool(consumer._coordinator.stable())


def heartbeating(consumer: KafkaConsumer) -> bool:
    """The coordinator is known and the member's heartbeat runs."""
    coordinator = consumer._coordinator
    return coordinator.coordinator_id is not None and bool(coordinator._heartbeat_enabled)


def read_to_end(consumer: KafkaConsumer, tp: TopicPartition) -> bool:
    """The partition's position has reached the high watermark of its last fetch."""
    state = consumer._subscription.assignment.get(tp)
    if state is None or state.highwater is None or state.position is None:
        return False
    return bool(state.position.offset >= state.highwater)


def transaction_manager(producer: KafkaProducer) -> Any:
    """The producer's transaction manager (None: not transactional)."""
    return producer._transaction_manager


def wake_sender(producer: KafkaProducer) -> None:
    """Have the sender thread send what a transactional call queued, now."""
    producer._sender.wakeup()
