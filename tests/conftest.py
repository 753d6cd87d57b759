"""Shared fixtures: a real Kafka broker for the integration tests (see kafka_broker.py) and a
three-broker cluster for the failover tests (kafka_cluster.py)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from worker.config import KAFKA_CLIENTS

from kafka_broker import bootstrap_servers, create_topic, wait_ready

if TYPE_CHECKING:
    from kafka_cluster import Cluster


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """Tests that call the CLI in-process get its log handler (on pytest's captured
    stderr, closed after the test); later tests must not log into it."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    kafka_level = logging.getLogger("kafka").level
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    for h in handlers:
        if h not in root.handlers:
            root.addHandler(h)
    root.setLevel(level)
    logging.getLogger("kafka").setLevel(kafka_level)


@pytest.fixture(params=KAFKA_CLIENTS)
def kafka_client(request: pytest.FixtureRequest) -> str:
    """Each ``--kafka-client`` behind the edge seam: a test that takes it runs on both."""
    return str(request.param)


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Bootstrap servers of a ready broker: KAFKA_BOOTSTRAP_SERVERS, testcontainers or jars."""
    bootstrap, stop = bootstrap_servers(tmp_path_factory.mktemp("kafka"))
    try:
        wait_ready(bootstrap)
        yield bootstrap
    finally:
        stop()


@pytest.fixture(scope="session")
def kafka_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Three brokers on loopback (deploy/local/kafka-cluster.sh), started at first use;
    tests that kill nodes leave restarting them to the next user (``Cluster.start``)."""
    from kafka_cluster import Cluster

    cluster = Cluster(tmp_path_factory.mktemp("kafka-cluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def topic_factory(kafka_bootstrap: str) -> Callable[..., str]:
    """``topic_factory(partitions=3)`` creates a fresh, uniquely named topic and returns it."""

    def make(partitions: int = 3) -> str:
        return create_topic(kafka_bootstrap, partitions)

    return make


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small model of the reference family (16x16 images), trained briefly and exported.

    Built once per session with the real export path (Keras -> tf2onnx -> manifest).
    """
    from model_fixture import build_tiny_model_dir

    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny-model"))
