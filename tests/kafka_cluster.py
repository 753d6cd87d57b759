"""A three-broker KRaft cluster on loopback for failover tests (deploy/local/kafka-cluster.sh).

``Cluster(data_dir).start()`` starts nodes 1..3 (each broker+controller, RF 3,
``min.insync.replicas=2``) on free ports; :meth:`Cluster.kill` and :meth:`Cluster.restart`
take a node by id. :meth:`Cluster.leader_of`, :meth:`Cluster.coordinator_of_transactional_id`
and :meth:`Cluster.coordinator_of_group` ask the cluster (kafka-python's admin client) who
holds what right now.

kafka-python 3.0.12 leaks a socket per refused connection (a ResourceWarning when it is
collected, an error under ``filterwarnings=error``). So every admin client here bootstraps
from the nodes this object believes are up, retries when metadata still names a dead node,
and is closed and collected inside a block that ignores ResourceWarning; produce attempts
that may meet a dead broker run in a subprocess (:meth:`Cluster.try_produce`).
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import json
import subprocess
import sys
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError
from kafka.protocol.metadata import CoordinatorType

REPO_ROOT = Path(__file__).resolve().parent.parent
CLUSTER_SH = REPO_ROOT / "deploy" / "local" / "kafka-cluster.sh"
NODE_IDS = (1, 2, 3)
# A cold start of three JVMs on two cores takes ~15 s; the first run also fetches jars.
SCRIPT_TIMEOUT_S = 600.0

T = TypeVar("T")


class ClusterError(RuntimeError):
    pass


class Cluster:
    """Three local brokers whose files live in ``data_dir`` (see kafka-cluster.sh)."""

    def __init__(self, data_dir: Path, initial_rebalance_delay_ms: int = 0) -> None:
        self.data_dir = Path(data_dir)
        self.initial_rebalance_delay_ms = initial_rebalance_delay_ms
        self.ports: dict[int, int] = {}
        #: Nodes this object has not killed (or has restarted): what clients bootstrap from.
        self.up: set[int] = set()
        self._stop_registered = False

    # ------------------------------------------------------------------ the script

    def _sh(self, *args: str, timeout_s: float = SCRIPT_TIMEOUT_S) -> str:
        proc = subprocess.run(
            ["bash", str(CLUSTER_SH), *args, "--data-dir", str(self.data_dir)],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        if proc.returncode != 0:
            raise ClusterError(
                f"kafka-cluster.sh {' '.join(args)} failed (exit {proc.returncode}):\n"
                f"{proc.stdout}{proc.stderr}"
            )
        return proc.stdout

    def start(self) -> str:
        """Start every node that is down; return the bootstrap string of all three."""
        if not self._stop_registered:
            atexit.register(self.stop)  # backstop for sessions that skip finalizers
            self._stop_registered = True
        out = self._sh(
            "start", "--initial-rebalance-delay-ms", str(self.initial_rebalance_delay_ms)
        )
        self._read_ports()
        self.up = set(NODE_IDS)
        return out.strip().splitlines()[-1]

    def stop(self) -> None:
        if (self.data_dir / "ports").exists():
            self._sh("stop")
        self.up.clear()

    def kill(self, node: int, sig: str = "KILL") -> None:
        """Send ``sig`` (KILL, TERM, STOP, CONT) to node ``node``; KILL/TERM wait for its exit."""
        self._sh("kill", "--id", str(node), "--signal", sig)
        if sig in ("KILL", "TERM", "STOP"):
            self.up.discard(node)
        elif sig == "CONT":
            self.up.add(node)

    def restart(self, node: int) -> None:
        """(Stop and) start node ``node`` on its data; return once it logged its start."""
        self._sh("restart", "--id", str(node))
        self.up.add(node)

    def status(self) -> tuple[int, str]:
        proc = subprocess.run(
            ["bash", str(CLUSTER_SH), "status", "--data-dir", str(self.data_dir)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        return proc.returncode, proc.stdout

    def _read_ports(self) -> None:
        props = {}
        for line in (self.data_dir / "ports").read_text().splitlines():
            key, _, value = line.partition("=")
            props[key] = value
        self.ports = {n: int(props[f"node.{n}.port"]) for n in NODE_IDS}

    @property
    def bootstrap(self) -> str:
        """All three brokers (what a worker is given)."""
        return ",".join(f"127.0.0.1:{self.ports[n]}" for n in NODE_IDS)

    def bootstrap_up(self) -> str:
        """Only the brokers believed up (for this process's own clients)."""
        up = sorted(self.up) or list(NODE_IDS)
        return ",".join(f"127.0.0.1:{self.ports[n]}" for n in up)

    def server_log(self, node: int) -> Path:
        return self.data_dir / f"node-{node}" / "server.log"

    # ------------------------------------------------------------------ admin queries

    @contextlib.contextmanager
    def admin(self, timeout_s: float = 30) -> Iterator[KafkaAdminClient]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            client = KafkaAdminClient(
                bootstrap_servers=self.bootstrap_up().split(","),
                client_id="mmstream-cluster-tests",
                bootstrap_timeout_ms=int(timeout_s * 1000),
                request_timeout_ms=5000,
                reconnect_backoff_max_ms=500,
            )
            try:
                yield client
            finally:
                client.close()
                del client
                gc.collect()

    def query(self, fn: Callable[[KafkaAdminClient], T], timeout_s: float = 30) -> T:
        """``fn(admin)`` with a fresh admin client (no cached coordinators), retried on
        KafkaError (a dead node still in metadata, a coordinator moving) until ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with self.admin(max(1.0, deadline - time.monotonic())) as admin:
                    return fn(admin)
            except (KafkaError, ValueError) as exc:
                if time.monotonic() >= deadline:
                    raise ClusterError(
                        f"admin query failed for {timeout_s:.0f} s: {exc!r}"
                    ) from exc
            time.sleep(0.3)

    def describe_cluster(self) -> dict[str, Any]:
        result: dict[str, Any] = self.query(lambda a: a.describe_cluster())
        return result

    def partitions(self, topic: str) -> dict[int, dict[str, Any]]:
        """partition -> {'leader': id (-1 when none), 'replicas': [...], 'isr': [...]}."""

        def describe(admin: KafkaAdminClient) -> dict[int, dict[str, Any]]:
            (desc,) = admin.describe_topics([topic])
            if desc["error_code"] != 0:
                raise ValueError(f"describe_topics({topic}): error {desc['error_code']}")
            return {
                p["partition_index"]: {
                    "leader": p["leader_id"],
                    "replicas": list(p["replica_nodes"]),
                    "isr": list(p["isr_nodes"]),
                }
                for p in desc["partitions"]
            }

        return self.query(describe)

    def leader_of(self, topic: str, partition: int) -> int:
        """The node leading ``topic``/``partition`` now (-1 when it has none)."""
        leader: int = self.partitions(topic)[partition]["leader"]
        return leader

    def _coordinator(self, key: str, key_type: Any, timeout_s: float) -> int:
        def find(admin: KafkaAdminClient) -> int:
            node: int = admin._manager.run(admin._find_coordinator_id, key, key_type)
            return node

        # COORDINATOR_NOT_AVAILABLE while the internal topic is created or moves: retried.
        return self.query(find, timeout_s)

    def coordinator_of_transactional_id(self, tid: str, timeout_s: float = 30) -> int:
        """The node coordinating transactional id ``tid`` (FindCoordinator, key type 1)."""
        return self._coordinator(tid, CoordinatorType.TRANSACTION, timeout_s)

    def coordinator_of_group(self, group: str, timeout_s: float = 30) -> int:
        """The node coordinating consumer group ``group`` (FindCoordinator, key type 0)."""
        return self._coordinator(group, CoordinatorType.GROUP, timeout_s)

    def create_topic(
        self,
        partitions: int = 3,
        prefix: str = "mm-cluster-",
        configs: dict[str, str] | None = None,
    ) -> str:
        """A fresh uuid-named topic with replication factor 3 (``configs``: topic configs);
        returns once every partition has a leader and a full ISR."""
        name = f"{prefix}{uuid.uuid4().hex}"
        topic = NewTopic(name, partitions, 3, topic_configs=dict(configs or {}))

        def create(admin: KafkaAdminClient) -> None:
            # A retry after a create that did happen (its answer lost) finds the topic.
            with contextlib.suppress(TopicAlreadyExistsError):
                admin.create_topics([topic])

        self.query(create)
        self.wait_isr(name, 3, timeout_s=60, partitions=partitions)
        return name

    def wait_isr(
        self, topic: str, size: int, timeout_s: float, partitions: int | None = None
    ) -> dict[int, dict[str, Any]]:
        """Poll until every partition has a leader and an ISR of ``size``; raise on timeout."""
        deadline = time.monotonic() + timeout_s
        last: dict[int, dict[str, Any]] = {}
        while True:
            with contextlib.suppress(ClusterError):
                last = self.partitions(topic)
                if (partitions is None or len(last) == partitions) and all(
                    p["leader"] >= 0 and len(p["isr"]) == size for p in last.values()
                ):
                    return last
            if time.monotonic() >= deadline:
                raise ClusterError(f"{topic}: no ISR of {size} after {timeout_s:.0f} s: {last}")
            time.sleep(0.3)

    def wait_fully_replicated(self, topics: list[str], timeout_s: float = 120) -> None:
        """Every partition of ``topics`` and of the internal topics has an ISR of 3."""
        deadline = time.monotonic() + timeout_s
        for t in [*topics, "__consumer_offsets", "__transaction_state"]:
            remaining = max(1.0, deadline - time.monotonic())
            try:
                self.wait_isr(t, 3, remaining)
            except ClusterError:
                if t.startswith("__") and not self._topic_exists(t):
                    continue
                raise

    def _topic_exists(self, topic: str) -> bool:
        return topic in self.query(lambda a: a.list_topics())

    # ------------------------------------------------------------------ produce probes

    def try_produce(
        self,
        topic: str,
        *,
        retries: int | None = None,
        delivery_timeout_ms: int = 30_000,
        request_timeout_ms: int = 5_000,
        timeout_s: float = 120,
    ) -> str:
        """Send one record with ``acks=all`` from a subprocess; ``"ok"`` or the error's class
        name (``NotEnoughReplicasError``, ``KafkaTimeoutError``, ...).

        ``retries=0`` turns idempotence off and reports the broker's first error as it is.
        """
        config: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_up().split(","),
            "acks": "all",
            "delivery_timeout_ms": delivery_timeout_ms,
            "request_timeout_ms": request_timeout_ms,
            "reconnect_backoff_max_ms": 500,
        }
        if retries is not None:
            config["retries"] = retries
            if retries == 0:
                config["enable_idempotence"] = False
        proc = subprocess.run(
            [sys.executable, "-c", _PRODUCE_ONE, json.dumps(config), topic],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        lines = proc.stdout.strip().splitlines()
        if proc.returncode != 0 or not lines:
            raise ClusterError(f"produce probe failed (exit {proc.returncode}):\n{proc.stderr}")
        return lines[-1]


_PRODUCE_ONE = """
import json, sys, warnings
warnings.simplefilter("ignore")
from kafka import KafkaProducer
producer = KafkaProducer(**json.loads(sys.argv[1]))
try:
    producer.send(sys.argv[2], key=b"probe", value=b"probe").get(timeout=600)
    print("ok")
except Exception as exc:
    print(type(exc).__name__)
finally:
    producer.close(timeout=2)
"""
