"""The librdkafka edge's pure parts (no broker): settings, error mapping, the wording of
security failures. Its behaviour against real brokers is in the integration tests that
take the ``kafka_client`` fixture (every one runs on both clients)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from confluent_kafka import KafkaError, KafkaException

from worker.config import WorkerConfig
from worker.contract.errors import BrokerError, ConfigError
from worker.edge.client import CommitFailed, Fenced
from worker.edge.confluent import consumer as cf_consumer
from worker.edge.confluent import errors as cf_errors
from worker.edge.confluent import producer as cf_producer
from worker.edge.confluent import settings as cf_settings


def config(tmp_path: Path, **kw: object) -> WorkerConfig:
    return WorkerConfig(
        bootstrap_servers="b1:9093,b2:9093",
        input_topic="in",
        output_topic="out",
        group_id="g",
        model=tmp_path,
        **kw,  # type: ignore[arg-type]
    )


def test_kafka_client_is_a_checked_setting(tmp_path: Path) -> None:
    assert config(tmp_path).kafka_client == "kafka-python"
    with pytest.raises(ConfigError, match="--kafka-client must be one of"):
        config(tmp_path, kafka_client="librdkafka")


def test_security_settings_map_to_librdkafkas(tmp_path: Path) -> None:
    ca, cert, key = (tmp_path / n for n in ("ca.pem", "c.pem", "k.pem"))
    for f in (ca, cert, key):
        f.write_text("x")
    sasl = config(
        tmp_path,
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="svc",
        sasl_password="s3cret",
        ssl_cafile=ca,
    )
    assert cf_settings.librdkafka_security(sasl) == {
        "security.protocol": "sasl_ssl",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "svc",
        "sasl.password": "s3cret",
        "ssl.ca.location": str(ca),
    }
    mtls = config(
        tmp_path, security_protocol="SSL", ssl_cafile=ca, ssl_certfile=cert, ssl_keyfile=key
    )
    assert cf_settings.librdkafka_security(mtls) == {
        "security.protocol": "ssl",
        "ssl.ca.location": str(ca),
        "ssl.certificate.location": str(cert),
        "ssl.key.location": str(key),
    }
    assert cf_settings.librdkafka_security(config(tmp_path)) == {"security.protocol": "plaintext"}


def test_consumer_settings_keep_the_workers_semantics(tmp_path: Path) -> None:
    c = cf_settings.consumer_settings(
        config(
            tmp_path,
            guarantee="exactly-once",
            group_instance_id="pod-0",
            max_pending_bytes=8 * 1024 * 1024,
            session_timeout_ms=10_000,
        )
    )
    assert c["bootstrap.servers"] == "b1:9093,b2:9093"
    assert c["enable.auto.commit"] is False
    assert c["partition.assignment.strategy"] == "cooperative-sticky"
    assert c["isolation.level"] == "read_committed"
    assert c["group.instance.id"] == "pod-0"
    # Prefetch never holds more than the worker's own byte bound.
    assert c["fetch.max.bytes"] == 8 * 1024 * 1024
    assert c["max.partition.fetch.bytes"] == 1024 * 1024  # the clients' default, below it
    assert c["queued.max.messages.kbytes"] == 8 * 1024
    # A full prefetch queue is fetched again soon, not after librdkafka's 1 s default.
    assert c["fetch.queue.backoff.ms"] == cf_settings.FETCH_QUEUE_BACKOFF_MS <= 50
    # the coordinator is looked up again within a second while it is down (not a minute)
    assert c["coordinator.query.interval.ms"] == cf_settings.COORDINATOR_QUERY_MS <= 10_000
    assert c["heartbeat.interval.ms"] == 1000
    assert c["metadata.recovery.rebootstrap.trigger.ms"] == cf_settings.REBOOTSTRAP_AFTER_MS
    assert "group.instance.id" not in cf_settings.consumer_settings(config(tmp_path))
    # the group's state comes with the statistics: at least every few seconds
    assert 0 < c["statistics.interval.ms"] == cf_settings.STATS_INTERVAL_MS <= 5_000


def test_the_group_state_is_read_from_librdkafkas_statistics() -> None:
    # Shapes as librdkafka 2.x writes them (trimmed): in a stable group; lost while the
    # coordinator is away; a consumer with no group; statistics it cannot read.
    up = '{"name": "c#1", "cgrp": {"state": "up", "join_state": "steady", "assignment_size": 2}}'
    lost = '{"cgrp": {"state": "query-coord", "stateage": 5012, "join_state": "init"}}'
    assert cf_consumer.group_state(up) == cf_consumer.GROUP_UP == ("up", "steady")
    assert cf_consumer.group_state(lost) == ("query-coord", "init")
    assert cf_consumer.group_state('{"name": "c#2", "brokers": {}}') is None
    for unreadable in ("", "not json", "[]", '{"cgrp": {"state": "up"}}'):
        assert cf_consumer.group_state(unreadable) is None


def test_producer_settings(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    p = cf_settings.producer_settings("b:1", "id", cfg, compression_type="zstd")
    assert p["acks"] == "all" and p["enable.idempotence"] is True
    # Keys land where the Java client and kafka-python put them (murmur2), not CRC32.
    assert p["partitioner"] == "murmur2_random"
    assert p["compression.type"] == "zstd" and "transactional.id" not in p
    tx = cf_settings.producer_settings("b:1", "id", cfg, transactional_id="g-pod-0")
    assert tx["transactional.id"] == "g-pod-0" and "delivery.timeout.ms" not in tx
    with pytest.raises(ConfigError):
        cf_settings.producer_settings("b:1", "id", cfg, compression_type="brotli")


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        (KafkaError.REBALANCE_IN_PROGRESS, CommitFailed),
        (KafkaError.ILLEGAL_GENERATION, CommitFailed),
        (KafkaError.UNKNOWN_MEMBER_ID, CommitFailed),
        (KafkaError._FENCED, Fenced),
        (KafkaError.PRODUCER_FENCED, Fenced),
    ],
)
def test_refused_commits_and_fenced_producers_keep_their_kind(code: int, kind: type) -> None:
    err = cf_errors.broker_error("commit failed", KafkaException(KafkaError(code)))
    assert type(err) is kind
    assert err.retriable is (kind is CommitFailed)


def test_retriable_flags_come_from_librdkafka() -> None:
    timed_out = cf_errors.broker_error("x", KafkaError(KafkaError._TIMED_OUT))
    assert type(timed_out) is BrokerError and timed_out.retriable
    abortable = KafkaError(KafkaError._STATE, "abort me", txn_requires_abort=True)
    assert cf_errors.broker_error("x", abortable).retriable
    fatal = KafkaError(KafkaError._TIMED_OUT, "fatal", fatal=True)
    assert not cf_errors.broker_error("x", fatal).retriable
    too_large = cf_errors.broker_error("x", KafkaError(KafkaError.MSG_SIZE_TOO_LARGE))
    assert not too_large.retriable


def test_a_fatal_error_in_the_consumers_messages_stops_the_poll() -> None:
    consumer = object.__new__(cf_consumer.ConfluentConsumer)
    consumer.security = {}
    # As librdkafka hands it over when a newer member takes this group.instance.id.
    fenced = KafkaError(KafkaError._FATAL, "Fatal error: Broker: Static consumer fenced")
    with pytest.raises(BrokerError, match="Static consumer fenced") as err:
        consumer._message_error(fenced)
    assert not err.value.retriable
    consumer._message_error(KafkaError(KafkaError._TRANSPORT, "broker down"))  # logged only


def test_an_authorization_failure_names_the_principal() -> None:
    security = {"security_protocol": "SASL_SSL", "sasl_plain_username": "svc"}
    err = cf_errors.broker_error(
        "cannot write to out", KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED), security
    )
    assert not err.retriable
    assert "not authorized: user 'svc' lacks access to the topic" in str(err)


SASL_FAILED = (
    "sasl_ssl://127.0.0.1:19192/bootstrap: SASL authentication error: Authentication "
    "failed during authentication due to invalid credentials with SASL mechanism "
    "SCRAM-SHA-512 (after 5ms in state AUTH_REQ)"
)
UNTRUSTED = (
    "ssl://127.0.0.1:19193/bootstrap: SSL handshake failed: error:0A000086:SSL routines::"
    "certificate verify failed: broker certificate could not be verified, verify that "
    "ssl.ca.location is correctly configured (after 4ms in state SSL_HANDSHAKE)"
)
REFUSED_CERT = (
    "ssl://127.0.0.1:19193/bootstrap: SSL handshake failed: ssl/record/rec_layer_s3.c:916: "
    "error:0A000418:SSL routines::tlsv1 alert unknown ca: SSL alert number 48"
)


def test_librdkafkas_security_errors_are_worded_like_kafka_pythons() -> None:
    sasl = {
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "mmstream",
        "ssl_cafile": "/x/rogue-ca.pem",
    }
    errors = cf_errors.Errors("127.0.0.1:19192", sasl)
    errors(KafkaError(KafkaError._AUTHENTICATION, SASL_FAILED))
    assert errors.cause == (
        "authentication failed for user 'mmstream' (SCRAM-SHA-512) at 127.0.0.1:19192: "
        "wrong password or unknown user"
    )
    errors = cf_errors.Errors("127.0.0.1:19192", sasl)
    errors(KafkaError(KafkaError._TRANSPORT, "Connection refused"))  # retried, not a cause
    assert errors.cause == ""
    errors(KafkaError(KafkaError._SSL, UNTRUSTED))
    assert errors.cause.startswith(
        "TLS: broker certificate at 127.0.0.1:19192 not trusted by --ssl-cafile /x/rogue-ca.pem"
    )
    mtls = {"security_protocol": "SSL", "ssl_certfile": "/x/rogue-client.pem"}
    errors = cf_errors.Errors("127.0.0.1:19193", mtls)
    errors(KafkaError(KafkaError._SSL, REFUSED_CERT))
    assert errors.cause.startswith(
        "TLS: the broker at 127.0.0.1:19193 refused the client certificate "
        "--ssl-certfile /x/rogue-client.pem"
    )


def test_a_transactional_call_that_overstays_marks_the_producer_stuck(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # librdkafka's send_offsets_to_transaction may ignore its timeout (librdkafka#5456):
    # the edge waits for it at most its timeout plus a grace, then fails, and every later
    # transactional call of that producer fails at once so that the loop replaces it.
    monkeypatch.setattr(cf_producer, "TXN_GRACE_S", 0.05)
    producer = object.__new__(cf_producer.ConfluentProducer)
    producer.security = {}
    producer._stuck = None
    release = threading.Event()
    calls: list[str] = []

    def hangs(*_args: object) -> None:
        calls.append("hangs")
        release.wait(10)

    try:
        with pytest.raises(BrokerError, match="did not return within") as first:
            producer._call("cannot add offsets to the transaction", hangs, 0.1, wait_s=0.1)
        assert first.value.retriable
        with pytest.raises(BrokerError, match="never returned") as later:
            producer._call("cannot abort the transaction", hangs, wait_s=0.1)
        assert later.value.retriable and calls == ["hangs"]  # not called again
    finally:
        release.set()


def test_a_transactional_call_keeps_librdkafkas_error(monkeypatch: pytest.MonkeyPatch) -> None:
    producer = object.__new__(cf_producer.ConfluentProducer)
    producer.security = {}
    producer._stuck = None

    def fenced(*_args: object) -> None:
        raise KafkaException(KafkaError(KafkaError._FENCED, "fenced", fatal=True))

    with pytest.raises(Fenced):
        producer._call("cannot commit the transaction", fenced, wait_s=1.0)
    producer._call("fine", lambda: None, wait_s=1.0)


def test_a_refused_transactional_id_is_named_and_other_refusals_keep_their_words() -> None:
    about = ("TRANSACTIONAL_ID_AUTHORIZATION_FAILED", "'tx-1'", "Write")
    security = {"security_protocol": "SASL_SSL", "sasl_plain_username": "svc"}
    tx = KafkaError(KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED)
    named = cf_errors.broker_error("cannot initialise transactions", tx, security, about=about)
    assert "user 'svc' lacks Write on transactional id 'tx-1' (see" in str(named)
    cluster = KafkaError(KafkaError.CLUSTER_AUTHORIZATION_FAILED)
    other = cf_errors.broker_error("cannot initialise transactions", cluster, security, about=about)
    assert "lacks access to the cluster (" in str(other) and "tx-1" not in str(other)
