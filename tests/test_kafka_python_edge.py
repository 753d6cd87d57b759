"""The kafka-python client's own unit tests (no broker), run also without confluent-kafka
installed (tests/test_architecture.py). Its behaviour against real brokers is in the
integration tests that take the ``kafka_client`` fixture."""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import pytest
from kafka import errors as kafka_errors

from worker.contract.errors import BrokerError
from worker.edge.client import CommitFailed, Fenced
from worker.edge.kafka_python.clients import LOOKUP_TIMEOUT_MS, KafkaPythonConsumer
from worker.edge.kafka_python.internals import RELIES_ON
from worker.edge.kafka_python.security import broker_error, failure

SASL = {"security_protocol": "SASL_SSL", "sasl_plain_username": "svc"}


def test_the_committed_lookup_is_bounded_and_its_timeout_retriable() -> None:
    # Without a timeout kafka-python waits for a coordinator without end, inside the loop.
    asked: list[int | None] = []

    class CoordinatorAway:
        def committed(
            self, tp: object, metadata: bool = False, timeout_ms: int | None = None
        ) -> None:
            asked.append(timeout_ms)
            raise kafka_errors.KafkaTimeoutError("Failed to fetch committed offsets")

    consumer = KafkaPythonConsumer(CoordinatorAway())  # type: ignore[arg-type]
    with pytest.raises(BrokerError, match="cannot read the committed offset") as err:
        consumer.committed(("t", 0))
    assert err.value.retriable and asked == [LOOKUP_TIMEOUT_MS]


def test_a_checkpoint_librdkafka_committed_reads_back_without_its_nul() -> None:
    class Found:
        offset, metadata = 7, "mm1:9\x00"

    class Committed:
        def committed(self, tp: object, metadata: bool, timeout_ms: int) -> Found:
            return Found()

    assert KafkaPythonConsumer(Committed()).committed(("t", 0)) == (7, "mm1:9")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("exc", "kind", "rebalancing"),
    [
        (kafka_errors.RebalanceInProgressError(), CommitFailed, True),
        (kafka_errors.CommitFailedError(), CommitFailed, False),
        (kafka_errors.ProducerFencedError(), Fenced, None),
        (kafka_errors.InvalidProducerEpochError(), Fenced, None),
        (kafka_errors.KafkaTimeoutError("slow"), BrokerError, None),
    ],
)
def test_errors_go_through_the_edges_one_table(
    exc: kafka_errors.KafkaError, kind: type[BrokerError], rebalancing: bool | None
) -> None:
    err = broker_error("commit failed", exc)
    assert type(err) is kind and err.__cause__ is exc
    assert err.retriable == (kind is not Fenced and (kind is CommitFailed or exc.retriable))
    if rebalancing is not None:
        assert isinstance(err, CommitFailed) and err.rebalancing is rebalancing


def test_an_authorization_failure_names_the_principal_the_operation_and_the_topics() -> None:
    exc = kafka_errors.TopicAuthorizationFailedError({"b", "a"})
    assert failure(exc).resources == "'a', 'b'"
    err = broker_error("cannot create topics", exc, SASL, "Create or Describe")
    assert not err.retriable
    assert str(err).startswith(
        "cannot create topics: not authorized: user 'svc' lacks Create or Describe on "
        "topic 'a', 'b' (see 'Security and ACLs'"
    )


@pytest.mark.parametrize(("where", "what"), RELIES_ON, ids=[f"{w}:{a}" for w, a in RELIES_ON])
def test_the_private_state_the_adapter_reads_is_still_there(where: str, what: str) -> None:
    # Fails when kafka-python renames or drops what worker/edge/kafka_python/internals.py reads.
    obj: object = importlib.import_module("kafka")
    parts = where.split(".")[1:]
    for i, name in enumerate(parts):
        nxt = getattr(obj, name, None)
        if nxt is None:  # a submodule not imported by its package
            nxt = importlib.import_module(".".join(["kafka", *parts[: i + 1]]))
        obj = nxt
    assert what in inspect.getsource(obj)  # type: ignore[arg-type]


def test_nothing_else_of_the_edge_reads_kafka_pythons_private_attributes() -> None:
    pattern = re.compile(r"\._(c|p|consumer|producer|client)\._[a-z]")
    root = Path(__file__).resolve().parents[1] / "worker" / "edge" / "kafka_python"
    found = [
        f"{p.name}: {line.strip()}"
        for p in sorted(root.glob("*.py"))
        if p.name != "internals.py"
        for line in p.read_text().splitlines()
        if pattern.search(line)
    ]
    assert found == []


def test_a_static_member_fenced_by_a_newer_one_stops_instead_of_retrying() -> None:
    err = broker_error("Kafka poll failed", kafka_errors.FencedInstanceIdError())
    assert type(err) is BrokerError and not err.retriable
