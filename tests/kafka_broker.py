"""A real Kafka broker for the integration tests, wherever they run.

``bootstrap_servers(tmp_dir)`` picks, in this order:

1. ``KAFKA_BOOTSTRAP_SERVERS`` from the environment (a broker someone else runs);
2. a testcontainers ``KafkaContainer`` when a Docker engine answers;
3. the local jar broker of ``deploy/local/kafka.sh`` (Java 17+, Maven for the first fetch),
   on two free ports with its data in ``tmp_dir``.

It returns the bootstrap string and a function that stops what it started (a no-op for 1).
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import logging
import os
import socket
import subprocess
import threading
import time
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka.errors import KafkaError

from worker.edge.kafka_python.admin import ensure_topics

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
KAFKA_SH = REPO_ROOT / "deploy" / "local" / "kafka.sh"
# Used only when a Docker engine answers; KRaft mode needs Confluent Platform >= 7.
KAFKA_IMAGE = "confluentinc/cp-kafka:7.6.0"
DOCKER_CHECK_S = 2.0
# The first run fetches the jars with Maven; later starts take a few seconds.
KAFKA_SH_TIMEOUT_S = 600.0


def bootstrap_servers(tmp_dir: Path) -> tuple[str, Callable[[], None]]:
    """Return ``(bootstrap, stop)`` for a usable broker; ``stop`` is idempotent."""
    env = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "").strip()
    if env:
        log.info("kafka: using KAFKA_BOOTSTRAP_SERVERS=%s", env)
        return env, _no_op
    if _docker_answers():
        return _start_container()
    return _start_local(tmp_dir)


def wait_ready(bootstrap: str, timeout_s: float = 60) -> None:
    """Block until the broker answers a metadata request, or raise ``TimeoutError``.

    Waits for a TCP listener first: kafka-python 3.0.12's KafkaAdminClient leaks its IO
    thread and sockets when it cannot bootstrap, so it is only built once a port answers.
    """
    deadline = time.monotonic() + timeout_s
    while not _any_port_accepts(bootstrap):
        if time.monotonic() >= deadline:
            raise TimeoutError(f"Kafka at {bootstrap}: no listener after {timeout_s:.0f} s")
        time.sleep(0.2)
    remaining_ms = max(1000, int((deadline - time.monotonic()) * 1000))
    try:
        client = KafkaAdminClient(
            bootstrap_servers=bootstrap,
            client_id="mmstream-tests",
            bootstrap_timeout_ms=remaining_ms,
            request_timeout_ms=5000,
        )
    except KafkaError as exc:
        raise TimeoutError(f"Kafka at {bootstrap}: cannot bootstrap: {exc!r}") from exc
    last: Exception | None = None
    with contextlib.closing(client) as admin:
        while True:
            try:
                admin.list_topics()
                return
            except KafkaError as exc:
                last = exc
            if time.monotonic() >= deadline:
                break
            time.sleep(0.5)
    raise TimeoutError(f"Kafka at {bootstrap} not ready after {timeout_s:.0f} s: {last!r}")


def create_topic(bootstrap: str, partitions: int = 3) -> str:
    """Create a fresh topic (replication 1); return once every partition has a leader."""
    if partitions < 1:
        raise ValueError(f"partitions must be >= 1, got {partitions}")
    name = f"mm-test-{uuid.uuid4().hex}"
    ensure_topics(bootstrap, {name: partitions})
    return name


def committed_offsets(bootstrap: str, group: str, topic: str, partitions: int) -> dict[int, Any]:
    """The group's committed offset of each partition (None where nothing is committed)."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        return {p: consumer.committed(TopicPartition(topic, p)) for p in range(partitions)}
    finally:
        consumer.close()


def end_offsets(bootstrap: str, topic: str, partitions: int) -> dict[int, int]:
    """The log-end offset of each partition."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap)
    try:
        ends = consumer.end_offsets([TopicPartition(topic, p) for p in range(partitions)])
        return {tp.partition: off for tp, off in ends.items()}
    finally:
        consumer.close()


def read_topic(
    bootstrap: str, topic: str, until: Callable[[list[Any]], bool], timeout_s: float
) -> list[Any]:
    """Records of ``topic`` from the start, until ``until(records)`` or ``timeout_s``."""
    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    out: list[Any] = []
    deadline = time.monotonic() + timeout_s
    try:
        while not until(out) and time.monotonic() < deadline:
            for recs in consumer.poll(timeout_ms=300).values():
                out.extend(recs)
    finally:
        consumer.close()
    return out


# --- internals ---------------------------------------------------------------------------------


def _no_op() -> None:
    return None


def _admin(bootstrap: str, **configs: Any) -> contextlib.closing[KafkaAdminClient]:
    return contextlib.closing(
        KafkaAdminClient(bootstrap_servers=bootstrap, client_id="mmstream-tests", **configs)
    )


def _any_port_accepts(bootstrap: str) -> bool:
    for server in bootstrap.split(","):
        hostport = server.strip().rpartition("://")[2]
        host, _, port = hostport.rpartition(":")
        if not port.isdigit():
            continue
        try:
            with socket.create_connection((host.strip("[]") or "localhost", int(port)), 1.0):
                return True
        except OSError:
            continue
    return False


def _docker_answers() -> bool:
    """True when a Docker engine answers a ping within DOCKER_CHECK_S; never raises or hangs."""
    if not os.environ.get("DOCKER_HOST") and not Path("/var/run/docker.sock").exists():
        return False
    result: list[bool] = []

    def ping() -> None:
        try:
            import docker

            client = docker.from_env(timeout=DOCKER_CHECK_S)
            try:
                result.append(bool(client.ping()))
            finally:
                client.close()
        except Exception as exc:  # any failure means "no usable engine"
            log.debug("kafka: no Docker engine: %r", exc)

    # docker-py can leave an unclosed socket behind when the engine is absent; its
    # ResourceWarning would turn into a test error under filterwarnings=error.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        thread = threading.Thread(target=ping, name="docker-ping", daemon=True)
        thread.start()
        thread.join(DOCKER_CHECK_S + 1)
        gc.collect()
    return bool(result and result[0])


def _start_container() -> tuple[str, Callable[[], None]]:
    from testcontainers.community.kafka import KafkaContainer

    log.info("kafka: starting %s with testcontainers", KAFKA_IMAGE)
    container = KafkaContainer(KAFKA_IMAGE).with_kraft()
    try:
        container.start()
    except Exception:
        with contextlib.suppress(Exception):
            container.stop()
        raise
    return container.get_bootstrap_server(), _once(container.stop)


def _free_ports(n: int) -> list[int]:
    """n distinct ports that are free on 127.0.0.1 right now (bound together, then released)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def _kafka_sh(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(KAFKA_SH), *args],
        capture_output=True,
        text=True,
        timeout=KAFKA_SH_TIMEOUT_S,
        check=False,
    )


def _start_local(tmp_dir: Path) -> tuple[str, Callable[[], None]]:
    port, controller_port = _free_ports(2)
    data_dir = str(tmp_dir)
    started = time.monotonic()
    # No initial rebalance delay (Kafka's default is 3 s): every test joins a new group.
    cmd = ["start", "--port", str(port), "--controller-port", str(controller_port)]
    cmd += ["--initial-rebalance-delay-ms", "0"]
    proc = _kafka_sh(*cmd, "--data-dir", data_dir)
    if proc.returncode != 0:
        raise RuntimeError(
            f"deploy/local/kafka.sh start failed (exit {proc.returncode}):\n"
            f"{proc.stdout}{proc.stderr}"
        )
    log.info("%s [%.1f s]", proc.stdout.strip(), time.monotonic() - started)

    def stop() -> None:
        done = _kafka_sh("stop", "--data-dir", data_dir)
        if done.returncode != 0:
            log.warning("kafka.sh stop failed: %s%s", done.stdout, done.stderr)

    stop_once = _once(stop)
    # Backstop for sessions that end without running fixture finalizers.
    atexit.register(stop_once)
    return f"127.0.0.1:{port}", stop_once


def _once(fn: Callable[[], object]) -> Callable[[], None]:
    lock = threading.Lock()
    done = False

    def call() -> None:
        nonlocal done
        with lock:
            if done:
                return
            done = True
        fn()

    return call
