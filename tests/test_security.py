"""The worker, replay and archive over a secured broker, with least-privilege ACLs.

One secured broker for the module (``deploy/local/kafka-secure.sh``, :mod:`kafka_secure`):
SASL_SSL with SCRAM-SHA-512 and mTLS (the certificate's CN is the principal), ACLs
enforced. Each test creates its own topics and group as admin and grants exactly the
ACLs of its mode (:data:`kafka_secure.MODES`, documented in docs/operations.md) to
``mmstream``, ``mmstream-replay`` or ``mmstream-archive``; the commands run in-process
(``worker.cli.main.main``).

Every security failure must end the command within 30 s with exit 1 and ONE line
``mmstream: error: ...`` naming the cause, before it joins the group (no "partitions
assigned"), with nothing committed and nothing written.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaProducer

from worker.cli.main import main

from kafka_secure import MODES, Names, SecureBroker, unique
from resilience_tools import EventFactory, _headers

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PARTITIONS = 2
EVENTS = 12
FAIL_WITHIN_S = 30.0
ASSIGNED = "partitions assigned: [("


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBroker]:
    broker = SecureBroker.start(tmp_path_factory.mktemp("kafka-secure"))
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="module")
def parts(tiny_model_dir: Path) -> EventFactory:
    return EventFactory(tiny_model_dir, distinct=8)


# ------------------------------------------------------------------ helpers


def new_names(secure: SecureBroker, *, input_events: int = EVENTS, parts: EventFactory) -> Names:
    """Fresh topics (input filled with ``input_events`` events), group and transactional id."""
    n = Names(
        input=unique("in"),
        output=unique("out"),
        dlq=unique("dlq"),
        group=unique("g"),
        transactional_id=unique("tx"),
    )
    secure.create_topics({n.input: PARTITIONS, n.output: PARTITIONS, n.dlq: 1})
    if input_events:
        produce(secure, n.input, parts, input_events, prefix=f"{n.input}-")
    return n


def produce(secure: SecureBroker, topic: str, parts: EventFactory, count: int, prefix: str) -> None:
    producer = KafkaProducer(acks="all", linger_ms=5, **secure.sasl("admin"))
    try:
        futures = [
            producer.send(topic, key=k.encode(), value=v, headers=_headers(m, c))
            for i in range(count)
            for k, m, v, c in parts.event(f"{prefix}{i:04d}", i)
        ]
        producer.flush(60)
        for f in futures:
            f.get(timeout=30)
    finally:
        producer.close(timeout=5)


def worker_argv(
    n: Names, model: Path, guarantee: str, *extra: str, kafka_client: str = "kafka-python"
) -> list[str]:
    return [
        "worker",
        "--kafka-client", kafka_client,
        "--input-topic", n.input,
        "--output-topic", n.output,
        "--dlq-topic", n.dlq,
        "--group-id", n.group,
        "--transactional-id", n.transactional_id,
        "--guarantee", guarantee,
        "--model", str(model),
        "--device", "cpu",
        "--intra-op-threads", "1",
        "--max-batch-size", "8",
        "--max-batch-delay-ms", "20",
        "--commit-interval-ms", "100",
        *extra,
    ]  # fmt: skip


def run(
    argv: list[str], capsys: pytest.CaptureFixture[str], stop_after_s: float = 90
) -> tuple[int, str, str, float]:
    """``mmstream ARGV`` in-process: (exit code, stdout, stderr, seconds).

    A command still running after ``stop_after_s`` gets SIGINT (the CLI's handler stops
    it at a checkpoint), so a failure that does not end the worker fails the test
    instead of hanging it.
    """
    capsys.readouterr()
    started = time.monotonic()
    guard = threading.Timer(stop_after_s, os.kill, (os.getpid(), signal.SIGINT))
    guard.start()
    try:
        rc = main(argv)
    finally:
        guard.cancel()
    seconds = time.monotonic() - started
    out, err = capsys.readouterr()
    return rc, out, err, seconds


def error_line(err: str) -> str:
    """The one ``mmstream: error:`` line, which must be the last line of stderr."""
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("mmstream: error:")]
    assert len(errors) == 1, f"expected one error line, got {errors!r}\n{err[-3000:]}"
    assert lines[-1] == errors[0], f"the error line is not the last one:\n{err[-3000:]}"
    return errors[0]


def predicted_keys(secure: SecureBroker, topic: str, count: int, **extra: Any) -> set[str]:
    return {r.key.decode() for r in secure.read(topic, count, timeout_s=30, **extra)}


def assert_failed_cleanly(
    secure: SecureBroker,
    n: Names,
    rc: int,
    err: str,
    seconds: float,
    pattern: str,
) -> str:
    line = error_line(err)
    assert rc == 1, f"exit {rc}: {line}"
    assert seconds < FAIL_WITHIN_S, f"took {seconds:.1f} s: {line}"
    assert re.search(pattern, line), f"{line!r} does not match {pattern!r}"
    assert ASSIGNED not in err, "the worker joined the group (it was ready) before failing"
    assert set(secure.committed(n.group, n.input, PARTITIONS).values()) == {None}
    assert set(secure.end_offsets(n.output, PARTITIONS).values()) == {0}
    assert set(secure.end_offsets(n.dlq, 1).values()) == {0}
    return line


# ------------------------------------------------------------------ the worker works


@pytest.mark.parametrize("listener", ["sasl", "mtls"])
@pytest.mark.parametrize("guarantee", ["at-least-once", "exactly-once"])
def test_worker_predicts_every_event_with_exactly_the_documented_acls(
    secure: SecureBroker,
    tiny_model_dir: Path,
    parts: EventFactory,
    capsys: pytest.CaptureFixture[str],
    listener: str,
    guarantee: str,
    kafka_client: str,
) -> None:
    n = new_names(secure, parts=parts)
    secure.grant("mmstream", f"worker-{guarantee}", n)
    flags = secure.sasl_flags("mmstream") if listener == "sasl" else secure.mtls_flags("mmstream")
    argv = worker_argv(
        n, tiny_model_dir, guarantee, *flags, "--max-events", str(EVENTS), kafka_client=kafka_client
    )
    rc, out, err, _ = run(argv, capsys)
    assert rc == 0, err[-3000:]
    assert ASSIGNED in err  # what the failure tests look for to tell "never ready"
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["predicted"] == EVENTS and not summary["dead_lettered"], summary
    read_committed = {"isolation_level": "read_committed"} if guarantee == "exactly-once" else {}
    keys = predicted_keys(secure, n.output, EVENTS, **read_committed)
    assert keys == {f"{n.input}-{i:04d}" for i in range(EVENTS)}
    committed = secure.committed(n.group, n.input, PARTITIONS)
    assert committed == secure.end_offsets(n.input, PARTITIONS), committed


# ------------------------------------------------------------------ replay and archive work


def test_replay_over_sasl_ssl_with_its_documented_acls(
    secure: SecureBroker,
    tiny_model_dir: Path,
    parts: EventFactory,
    capsys: pytest.CaptureFixture[str],
    kafka_client: str,
) -> None:
    backfill_id = unique("bf")
    n = new_names(secure, parts=parts)
    n = Names(input=n.input, output=n.output, dlq=n.dlq, group=f"mmstream-backfill-{backfill_id}")
    secure.grant("mmstream-replay", "replay", n)
    argv = [
        "replay",
        "--kafka-client", kafka_client,
        *secure.sasl_flags("mmstream-replay"),
        "--source-topic", n.input,
        "--output-topic", n.output,
        "--dlq-topic", n.dlq,
        "--backfill-id", backfill_id,
        "--range", ",".join(f"{p}:0-" for p in range(PARTITIONS)),
        "--model", str(tiny_model_dir),
        "--device", "cpu",
        "--max-batch-size", "8",
        "--progress", "none",
    ]  # fmt: skip
    rc, out, err, _ = run(argv, capsys)
    assert rc == 0, err[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["events_predicted"] == EVENTS, summary
    assert predicted_keys(secure, n.output, EVENTS) == {f"{n.input}-{i:04d}" for i in range(EVENTS)}
    assert secure.committed(n.group, n.input, PARTITIONS) == secure.end_offsets(n.input, PARTITIONS)


def test_archive_and_restore_over_sasl_ssl_with_their_documented_acls(
    secure: SecureBroker,
    parts: EventFactory,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    n = new_names(secure, parts=parts)
    records = sum(secure.end_offsets(n.input, PARTITIONS).values())
    secure.grant("mmstream-archive", "archive", n)
    archive = tmp_path / "archive.jsonl.gz"
    flags = secure.sasl_flags("mmstream-archive")
    argv = ["archive", *flags, "--source-topic", n.input, "--out", str(archive)]
    rc, out, err, _ = run(argv, capsys)
    assert rc == 0, err[-3000:]
    assert json.loads(out.strip().splitlines()[-1])["records"] == records

    target = Names(output=unique("restored"))
    secure.create_topics({target.output: PARTITIONS})
    secure.grant("mmstream-archive", "restore", target)
    argv = ["replay", *flags, "--source-file", str(archive), "--to-topic", target.output]
    rc, out, err, _ = run(argv, capsys)
    assert rc == 0, err[-3000:]
    assert json.loads(out.strip().splitlines()[-1])["records"] == records
    assert secure.end_offsets(target.output, PARTITIONS) == secure.end_offsets(n.input, PARTITIONS)


# ------------------------------------------------------------------ every failure: one line


CONNECT_FAILURES = {
    "wrong password": (
        "sasl",
        r"authentication failed for user 'mmstream' \(SCRAM-SHA-512\) at 127\.0\.0\.1:\d+: "
        r"wrong password or unknown user",
    ),
    "unknown user": (
        "sasl-ghost",
        r"authentication failed for user 'ghost' .*wrong password or unknown user",
    ),
    "untrusted CA": (
        "sasl-rogue-ca",
        r"TLS: broker certificate at 127\.0\.0\.1:\d+ not trusted by --ssl-cafile "
        r".*rogue-ca\.pem",
    ),
    "client certificate of another CA": (
        "mtls-rogue-cert",
        r"TLS: the broker at 127\.0\.0\.1:\d+ refused the client certificate "
        r"--ssl-certfile .*rogue-client\.pem",
    ),
}


@pytest.mark.parametrize("case", list(CONNECT_FAILURES))
def test_an_authentication_or_tls_failure_is_one_line_naming_it(
    secure: SecureBroker,
    tiny_model_dir: Path,
    parts: EventFactory,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    case: str,
    kafka_client: str,
) -> None:
    how, pattern = CONNECT_FAILURES[case]
    n = new_names(secure, parts=parts)
    secure.grant("mmstream", "worker-at-least-once", n)
    if how == "sasl":
        wrong = tmp_path / "wrong.password"
        wrong.write_text("not-the-password\n")
        flags = secure.sasl_flags("mmstream", wrong)
    elif how == "sasl-ghost":
        flags = secure.sasl_flags("mmstream")
        flags[flags.index("mmstream")] = "ghost"
    elif how == "sasl-rogue-ca":
        flags = secure.sasl_flags("mmstream")
        flags[flags.index(str(secure.ca))] = str(secure.rogue_ca)
    else:
        flags = secure.mtls_flags("mmstream")
        cert, key = secure.cert("mmstream")
        rogue_cert, rogue_key = secure.cert("rogue-client")
        flags[flags.index(str(cert))] = str(rogue_cert)
        flags[flags.index(str(key))] = str(rogue_key)
    rc, _, err, seconds = run(
        worker_argv(n, tiny_model_dir, "at-least-once", *flags, kafka_client=kafka_client), capsys
    )
    line = assert_failed_cleanly(secure, n, rc, err, seconds, pattern)
    assert "Unable to bootstrap" not in line


MISSING_ACLS = [
    ("at-least-once", "input Read", r"lacks Read on topic '{input}'"),
    ("at-least-once", "group Read", r"lacks Read on group '{group}'"),
    ("at-least-once", "output Write", r"lacks Write on topic '{output}'"),
    ("at-least-once", "dlq Write", r"lacks Write on topic '{dlq}'"),
    ("exactly-once", "transactional_id Write", r"lacks Write on transactional id '{tx}'"),
]


@pytest.mark.parametrize("listener", ["sasl", "mtls"])
@pytest.mark.parametrize(("guarantee", "missing", "pattern"), MISSING_ACLS)
def test_each_missing_acl_is_one_line_naming_it(
    secure: SecureBroker,
    tiny_model_dir: Path,
    parts: EventFactory,
    capsys: pytest.CaptureFixture[str],
    listener: str,
    guarantee: str,
    missing: str,
    pattern: str,
    kafka_client: str,
) -> None:
    assert missing in {g.what for g in MODES[f"worker-{guarantee}"]}
    n = new_names(secure, parts=parts)
    secure.grant("mmstream", f"worker-{guarantee}", n, without=[missing])
    flags = secure.sasl_flags("mmstream") if listener == "sasl" else secure.mtls_flags("mmstream")
    rc, _, err, seconds = run(
        worker_argv(n, tiny_model_dir, guarantee, *flags, kafka_client=kafka_client), capsys
    )
    who = "user 'mmstream'" if listener == "sasl" else "principal 'mmstream'"
    names = {"input": n.input, "group": n.group, "output": n.output, "dlq": n.dlq}
    regex = (
        "not authorized: "
        + re.escape(who)
        + ".* "
        + pattern.format(
            **{k: re.escape(v) for k, v in names.items()}, tx=re.escape(n.transactional_id)
        )
    )
    assert_failed_cleanly(secure, n, rc, err, seconds, regex)
