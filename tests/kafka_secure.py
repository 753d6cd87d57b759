"""A secured Kafka broker for the security tests: ``deploy/local/kafka-secure.sh`` in a tmp dir.

One KRaft node with a SASL_SSL listener (SCRAM-SHA-512) and an mTLS listener (client
certificates of the local CA; the CN is the principal), ACLs enforced
(``allow.everyone.if.no.acl.found=false``), super user ``admin``. :class:`SecureBroker`
knows the ports, the CA, each user's password file and certificate, makes kafka-python
keyword arguments (:meth:`SecureBroker.sasl`, :meth:`SecureBroker.mtls`) and, as admin,
creates topics and the ACLs of one mode (:meth:`SecureBroker.grant`, :data:`MODES`).
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka.admin import (
    ACL,
    ACLFilter,
    ACLOperation,
    ACLPermissionType,
    ACLResourcePatternType,
    NewTopic,
    ResourcePattern,
    ResourcePatternFilter,
    ResourceType,
)

from kafka_broker import _free_ports

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
KAFKA_SECURE_SH = REPO_ROOT / "deploy" / "local" / "kafka-secure.sh"
USERS = ("mmstream", "mmstream-replay", "mmstream-archive")
SH_TIMEOUT_S = 600.0  # the first start may fetch the jars with Maven

Op = ACLOperation
TOPIC, GROUP, TXN, CLUSTER = (
    ResourceType.TOPIC,
    ResourceType.GROUP,
    ResourceType.TRANSACTIONAL_ID,
    ResourceType.CLUSTER,
)


@dataclass(frozen=True)
class Names:
    """The resources one run of a command uses (any may be empty)."""

    input: str = ""
    output: str = ""
    dlq: str = ""
    group: str = ""
    transactional_id: str = ""


@dataclass(frozen=True)
class Grant:
    """One ACL: ``operation`` on the resource ``kind`` of :class:`Names` (``cluster``: the
    cluster). ``what`` names it in test ids: e.g. ``input Read``."""

    kind: str  # input, output, dlq, group, transactional_id, cluster
    operation: ACLOperation

    @property
    def what(self) -> str:
        return f"{self.kind} {self.operation.name.title().replace('_', '')}"


#: The least-privilege ACLs of each mode (docs/operations.md, "Security and ACLs").
#: Read and Write imply Describe; no Create, no cluster ACL (idempotent producers need
#: only Write on their topics since Kafka 3.0, KIP-679).
_WORKER = (
    Grant("input", Op.READ),
    Grant("group", Op.READ),
    Grant("output", Op.WRITE),
    Grant("dlq", Op.WRITE),
)
MODES: dict[str, tuple[Grant, ...]] = {
    "worker-at-least-once": _WORKER,
    "worker-exactly-once": (*_WORKER, Grant("transactional_id", Op.WRITE)),
    # A replay of a topic range: its checkpoint group is mmstream-backfill-<id>.
    "replay": _WORKER,
    "replay-exactly-once": (*_WORKER, Grant("transactional_id", Op.WRITE)),
    "archive": (Grant("input", Op.READ),),
    "restore": (Grant("output", Op.WRITE),),
}


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def _sh(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(KAFKA_SECURE_SH), *args],
        capture_output=True,
        text=True,
        timeout=SH_TIMEOUT_S,
        check=False,
    )


@dataclass
class SecureBroker:
    """A running secured broker (start with :meth:`start`, stop with :meth:`stop`)."""

    data_dir: Path
    env: dict[str, str]
    _admin: KafkaAdminClient | None = field(default=None, repr=False)

    # ------------------------------------------------------------------ life cycle

    @classmethod
    def start(cls, data_dir: Path) -> SecureBroker:
        port, mtls_port, controller_port = _free_ports(3)
        started = time.monotonic()
        args = ["start", "--data-dir", str(data_dir), "--port", str(port)]
        args += ["--mtls-port", str(mtls_port), "--controller-port", str(controller_port)]
        args += ["--initial-rebalance-delay-ms", "0", "--users", " ".join(USERS)]
        proc = _sh(*args)
        if proc.returncode != 0:
            _sh("stop", "--data-dir", str(data_dir))
            raise RuntimeError(
                f"kafka-secure.sh start failed (exit {proc.returncode}):\n"
                f"{proc.stdout}{proc.stderr}"
            )
        log.info("%s [%.1f s]", proc.stdout.strip(), time.monotonic() - started)
        broker = cls(data_dir, cls._read_env(data_dir))
        try:
            broker._wait_ready()
        except BaseException:
            broker.stop()
            raise
        return broker

    @staticmethod
    def _read_env(data_dir: Path) -> dict[str, str]:
        proc = _sh("env", "--data-dir", str(data_dir))
        if proc.returncode != 0:
            raise RuntimeError(f"kafka-secure.sh env failed: {proc.stderr}")
        out = {}
        for line in proc.stdout.splitlines():
            key, _, value = line.partition("=")
            # printf %q quoting: only the users list has spaces (escaped with backslashes).
            out[key] = value.replace("\\ ", " ")
        return out

    def _wait_ready(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                self.admin().list_topics()
                return
            except Exception as exc:  # the broker is still loading its metadata
                last = exc
                self._close_admin()
                time.sleep(0.5)
        raise TimeoutError(f"secured broker not ready after {timeout_s:.0f} s: {last!r}")

    def stop(self) -> None:
        self._close_admin()
        done = _sh("stop", "--data-dir", str(self.data_dir))
        if done.returncode != 0:
            log.warning("kafka-secure.sh stop failed: %s%s", done.stdout, done.stderr)

    # ------------------------------------------------------------------ where things are

    @property
    def sasl_bootstrap(self) -> str:
        return self.env["KAFKA_SECURE_SASL_BOOTSTRAP"]

    @property
    def mtls_bootstrap(self) -> str:
        return self.env["KAFKA_SECURE_MTLS_BOOTSTRAP"]

    @property
    def ca(self) -> Path:
        return Path(self.env["KAFKA_SECURE_CA"])

    @property
    def tls_dir(self) -> Path:
        return Path(self.env["KAFKA_SECURE_TLS_DIR"])

    def password_file(self, user: str) -> Path:
        return Path(self.env["KAFKA_SECURE_SECRETS_DIR"]) / f"{user}.password"

    def password(self, user: str) -> str:
        return self.password_file(user).read_text().strip()

    def cert(self, user: str) -> tuple[Path, Path]:
        """(certificate, key) of ``user`` (``rogue-client``: signed by the rogue CA)."""
        return self.tls_dir / f"{user}.pem", self.tls_dir / f"{user}.key"

    @property
    def rogue_ca(self) -> Path:
        return self.tls_dir / "rogue-ca.pem"

    # ------------------------------------------------------------------ client settings

    def sasl(self, user: str, password: str | None = None) -> dict[str, Any]:
        """kafka-python keyword arguments for ``user`` over SASL_SSL (bootstrap included)."""
        return {
            "bootstrap_servers": self.sasl_bootstrap,
            "security_protocol": "SASL_SSL",
            "sasl_mechanism": "SCRAM-SHA-512",
            "sasl_plain_username": user,
            "sasl_plain_password": self.password(user) if password is None else password,
            "ssl_cafile": str(self.ca),
        }

    def mtls(self, user: str) -> dict[str, Any]:
        """kafka-python keyword arguments for ``user``'s certificate on the mTLS listener."""
        cert, key = self.cert(user)
        return {
            "bootstrap_servers": self.mtls_bootstrap,
            "security_protocol": "SSL",
            "ssl_cafile": str(self.ca),
            "ssl_certfile": str(cert),
            "ssl_keyfile": str(key),
        }

    def sasl_flags(self, user: str, password_file: Path | None = None) -> list[str]:
        """``mmstream`` flags for ``user`` over SASL_SSL (password by file)."""
        return [
            "--bootstrap-servers", self.sasl_bootstrap,
            "--security-protocol", "SASL_SSL",
            "--sasl-mechanism", "SCRAM-SHA-512",
            "--sasl-username", user,
            "--sasl-password-file", str(password_file or self.password_file(user)),
            "--ssl-cafile", str(self.ca),
        ]  # fmt: skip

    def mtls_flags(self, user: str) -> list[str]:
        cert, key = self.cert(user)
        return [
            "--bootstrap-servers", self.mtls_bootstrap,
            "--security-protocol", "SSL",
            "--ssl-cafile", str(self.ca),
            "--ssl-certfile", str(cert),
            "--ssl-keyfile", str(key),
        ]  # fmt: skip

    # ------------------------------------------------------------------ admin (super user)

    def admin(self) -> KafkaAdminClient:
        if self._admin is None:
            self._admin = KafkaAdminClient(
                client_id="mmstream-tests-admin", request_timeout_ms=10_000, **self.sasl("admin")
            )
        return self._admin

    def _close_admin(self) -> None:
        if self._admin is not None:
            with contextlib.suppress(Exception):
                self._admin.close()
            self._admin = None

    def create_topics(self, topics: dict[str, int]) -> None:
        """Create the topics (name -> partitions); return once every partition has a leader."""
        admin = self.admin()
        admin.create_topics([NewTopic(n, p, 1) for n, p in topics.items()])
        deadline = time.monotonic() + 30
        while True:
            described = {t["name"]: t for t in admin.describe_topics(list(topics))}
            if all(
                t.get("error_code", 0) == 0
                and len([p for p in t.get("partitions") or [] if p.get("leader_id", -1) >= 0])
                == topics[n]
                for n, t in described.items()
            ) and set(described) == set(topics):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"topics {sorted(topics)} have no leaders after 30 s")
            time.sleep(0.1)

    def acls(self, principal: str, names: Names, grants: Iterable[Grant]) -> list[ACL]:
        """The ACL objects of ``grants`` for ``User:<principal>`` on ``names``."""
        out = []
        for g in grants:
            if g.kind == "cluster":
                rtype, rname = CLUSTER, "kafka-cluster"
            else:
                rname = getattr(names, g.kind)
                rtype = {"group": GROUP, "transactional_id": TXN}.get(g.kind, TOPIC)
            if not rname:
                raise ValueError(f"grant {g.what}: no {g.kind} name in {names}")
            out.append(
                ACL(
                    principal=f"User:{principal}",
                    host="*",
                    operation=g.operation,
                    permission_type=ACLPermissionType.ALLOW,
                    resource_pattern=ResourcePattern(rtype, rname, ACLResourcePatternType.LITERAL),
                )
            )
        return out

    def grant(
        self,
        principal: str,
        mode: str,
        names: Names,
        *,
        without: Iterable[str] = (),
    ) -> list[Grant]:
        """Give ``principal`` the ACLs of ``mode`` (:data:`MODES`) on ``names``, except
        those whose :attr:`Grant.what` is in ``without``; returns what was granted.

        Returns once the authorizer shows every new ACL (they apply a moment after
        CreateAcls returns, when the metadata log reaches the broker).
        """
        skip = set(without)
        unknown = skip - {g.what for g in MODES[mode]}
        if unknown:
            raise ValueError(f"{mode} has no grants {sorted(unknown)}")
        grants = [g for g in MODES[mode] if g.what not in skip]
        acls = self.acls(principal, names, grants)
        result = self.admin().create_acls(acls)
        if result["failed"]:
            raise RuntimeError(f"create_acls failed: {result['failed']}")
        self._wait_acls(principal, acls)
        return grants

    def _wait_acls(self, principal: str, acls: list[ACL], timeout_s: float = 15) -> None:
        flt = ACLFilter(
            principal=f"User:{principal}",
            host="*",
            operation=ACLOperation.ANY,
            permission_type=ACLPermissionType.ANY,
            resource_pattern=ResourcePatternFilter(
                ResourceType.ANY, None, ACLResourcePatternType.ANY
            ),
        )
        want = {
            (a.resource_pattern.resource_type, a.resource_pattern.resource_name, a.operation)
            for a in acls
        }
        deadline = time.monotonic() + timeout_s
        while True:
            found, _error = self.admin().describe_acls(flt)
            have = {
                (a.resource_pattern.resource_type, a.resource_pattern.resource_name, a.operation)
                for a in found
            }
            if want <= have:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"ACLs not visible after {timeout_s} s: {sorted(want - have)}")
            time.sleep(0.1)

    # ------------------------------------------------------------------ reading back (admin)

    def committed(self, group: str, topic: str, partitions: int) -> dict[int, Any]:
        """The group's committed offset of each partition (None where nothing is)."""
        with self._consumer(group_id=group, enable_auto_commit=False) as c:
            return {p: c.committed(TopicPartition(topic, p)) for p in range(partitions)}

    def end_offsets(self, topic: str, partitions: int) -> dict[int, int]:
        with self._consumer() as c:
            ends = c.end_offsets([TopicPartition(topic, p) for p in range(partitions)])
            return {tp.partition: off for tp, off in ends.items()}

    def read(self, topic: str, count: int, timeout_s: float = 30, **extra: Any) -> list[Any]:
        """Records of ``topic`` from the start until ``count`` were read or ``timeout_s``."""
        out: list[Any] = []
        with self._consumer(topic, auto_offset_reset="earliest", **extra) as c:
            deadline = time.monotonic() + timeout_s
            while len(out) < count and time.monotonic() < deadline:
                for recs in c.poll(timeout_ms=300).values():
                    out.extend(recs)
        return out

    @contextlib.contextmanager
    def _consumer(self, *topics: str, **extra: Any) -> Iterator[KafkaConsumer]:
        extra.setdefault("group_id", None)
        consumer = KafkaConsumer(
            *topics, client_id="mmstream-tests-admin", **self.sasl("admin"), **extra
        )
        try:
            yield consumer
        finally:
            consumer.close()
