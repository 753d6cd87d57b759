"""What both Kafka clients share, written once and free of any client library.

* fetch limits, and the checkpoint metadata as either client reads it back;
* the ACLs a command needs (:class:`TopicAccess`) and the rules that check them
  against what the broker says (:func:`check_access`, over a client's
  :class:`AccessProbe`), before any group is joined;
* one error-translation table, by Kafka's error names, that turns a client's
  failure into the right :class:`~worker.contract.errors.BrokerError`
  (:func:`translate`), and the one-line wording of security failures;
* the range reader's no-progress rule (:class:`Progress`).
"""

from __future__ import annotations

import functools
import logging
import re
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, ParamSpec, Protocol, TypeVar

from worker.contract.errors import BrokerError
from worker.edge.client import CommitFailed, Fenced

if TYPE_CHECKING:
    from worker.config import WorkerConfig

log = logging.getLogger(__name__)

# ------------------------------------------------------------------ fetching

#: The most one fetch request may bring back (capped by the worker's --max-pending-bytes).
FETCH_MAX_BYTES = 64 * 1024 * 1024
#: The most one partition may add to a fetch: the clients' own default, which keeps a
#: fetch of several partitions quick to arrive (docs/benchmarks.md).
PARTITION_FETCH_BYTES = 1024 * 1024


def checkpoint_metadata(found: str | None) -> str:
    """Commit metadata as read back: librdkafka commits it with a trailing NUL."""
    return (found or "").rstrip("\x00")


# ------------------------------------------------------------------ errors

#: Kafka's error names (and the clients' own) of a commit the group refused, and whether
#: the refusal is a rebalance (expected: logged quietly, retried at the next interval).
REFUSED_COMMIT: Mapping[str, bool] = {
    "REBALANCE_IN_PROGRESS": True,
    "ILLEGAL_GENERATION": True,
    "UNKNOWN_MEMBER_ID": True,
    "_ASSIGNMENT_LOST": True,
    "COMMIT_FAILED": False,  # kafka-python's own, after a rebalance it already handled
}
# A static member fenced by a newer one with its group.instance.id (FENCED_INSTANCE_ID) is
# not in the table: it cannot rejoin, so it keeps the client's flag (not retriable).
#: A newer producer with this transactional id is active.
FENCED = frozenset({"PRODUCER_FENCED", "INVALID_PRODUCER_EPOCH", "_FENCED"})
#: Authorization failures, by the resource they are about.
AUTHORIZATION: Mapping[str, str] = {
    "TOPIC_AUTHORIZATION_FAILED": "topic",
    "GROUP_AUTHORIZATION_FAILED": "group",
    "TRANSACTIONAL_ID_AUTHORIZATION_FAILED": "transactional id",
    "CLUSTER_AUTHORIZATION_FAILED": "cluster",
}


@dataclass(frozen=True)
class Failure:
    """A client's error, as the table reads it."""

    name: str  # Kafka's error name, e.g. "REBALANCE_IN_PROGRESS"
    text: str  # the client's own words
    retriable: bool
    resources: str = ""  # the names an authorization failure is about, when known


def translate(
    what: str, failure: Failure, security: Mapping[str, Any], operation: str = ""
) -> BrokerError:
    """``failure`` as a :class:`BrokerError`: a refused commit is :class:`CommitFailed`, a
    fenced producer :class:`Fenced`, an authorization failure one non-retriable line
    naming the principal and the resource; else the client's retriable flag."""
    kind = AUTHORIZATION.get(failure.name)
    if kind is not None:
        return not_authorized(what, security, kind, failure.resources, operation, failure.text)
    if failure.name in REFUSED_COMMIT:
        return CommitFailed(f"{what}: {failure.text}", rebalancing=REFUSED_COMMIT[failure.name])
    if failure.name in FENCED:
        return Fenced(
            f"{what}: {failure.text} (a newer producer with this transactional id is active)"
        )
    return BrokerError(f"{what}: {failure.text}", retriable=failure.retriable)


def not_authorized(
    what: str,
    security: Mapping[str, Any],
    kind: str,
    names: str = "",
    operation: str = "",
    detail: str = "",
) -> BrokerError:
    """``<what>: not authorized: <principal> lacks [<operation> on] <kind> [<names>]``."""
    op = f"{operation} on " if operation else ""
    if names:
        target = f"{op}{kind} {names}"
    elif op:
        target = f"{op}{kind}"
    else:
        target = f"access to the {kind}"
    why = f"{detail}; see" if detail and not names else "see"
    prefix = f"{what}: " if what else ""
    return BrokerError(
        f"{prefix}not authorized: {principal(security)} lacks {target} ({why} 'Security and "
        "ACLs' in docs/operations.md)",
        retriable=False,
    )


P = ParamSpec("P")
R = TypeVar("R")
ToError = Callable[[str, Any, Any], BrokerError]


def wrapping(
    catch: type[BaseException], to_error: ToError
) -> Callable[[str], Callable[[Callable[P, R]], Callable[P, R]]]:
    """A client's method decorator: ``@wrapped("what")`` turns the client library's
    ``catch`` errors into ``to_error(what, exc, self.security)``."""

    def wrapped(what: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
        def deco(fn: Callable[P, R]) -> Callable[P, R]:
            @functools.wraps(fn)
            def inner(*args: P.args, **kwargs: P.kwargs) -> R:
                try:
                    return fn(*args, **kwargs)
                except catch as exc:
                    security = getattr(args[0], "security", None) if args else None
                    raise to_error(what, exc, security) from exc

            return inner

        return deco

    return wrapped


# ------------------------------------------------------------------ security wording


def principal(security: Mapping[str, Any]) -> str:
    """Who the broker sees, for messages: ``user 'x'`` (SASL), the certificate's CN (mTLS).
    ``security``: the ``--security-*``/``--sasl-*``/``--ssl-*`` settings as keywords."""
    protocol = security.get("security_protocol", "PLAINTEXT")
    if str(protocol).startswith("SASL"):
        return f"user {security.get('sasl_plain_username', '')!r}"
    certfile = security.get("ssl_certfile")
    if protocol == "SSL" and certfile:
        cn = _cert_cn(str(certfile))
        return f"principal {cn!r} (CN of --ssl-certfile)" if cn else "the --ssl-certfile principal"
    return "principal ANONYMOUS"


def _cert_cn(path: str) -> str:
    try:  # the stdlib's own PEM decoder (private, but present since Python 3.2)
        decoded = ssl._ssl._test_decode_cert(path)  # type: ignore[attr-defined]
    except Exception:
        return ""
    for rdn in decoded.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return ""


def authentication_failed(security: Mapping[str, Any], where: str) -> str:
    """The cause of a refused SASL login."""
    return (
        f"authentication failed for user {security.get('sasl_plain_username', '')!r} "
        f"({security.get('sasl_mechanism')}) at {where}: wrong password or unknown user"
    )


def untrusted(security: Mapping[str, Any], where: str, detail: str) -> str:
    """The cause of a broker certificate the client does not trust (or that names
    another host)."""
    cafile = security.get("ssl_cafile")
    trust = f"--ssl-cafile {cafile}" if cafile else "the system CAs (no --ssl-cafile)"
    if "hostname" in detail.lower() or "ip address mismatch" in detail.lower():
        return f"TLS: the broker certificate at {where} does not name that host: {detail}"
    return f"TLS: broker certificate at {where} not trusted by {trust}: {detail}"


#: TLS alerts a broker sends when it refuses (or wants) the client's certificate.
_CLIENT_CERT_ALERTS = (
    "ALERT_CERTIFICATE_UNKNOWN",
    "ALERT_UNKNOWN_CA",
    "ALERT_BAD_CERTIFICATE",
    "ALERT_CERTIFICATE_REQUIRED",
    "ALERT_CERTIFICATE_EXPIRED",
    "ALERT_CERTIFICATE_REVOKED",
)


def tls_failure(security: Mapping[str, Any], where: str, text: str) -> str:
    """The cause named by a TLS error's text (Python's ssl module or OpenSSL through
    librdkafka), or "" when it names none."""
    upper = text.upper().replace(" ", "_")
    if "CERTIFICATE_VERIFY_FAILED" in upper:
        detail = re.split("certificate verify failed:?", text, maxsplit=1, flags=re.I)[-1]
        detail = detail.split("(_ssl.c", 1)[0].strip(" :")
        return untrusted(security, where, detail or "certificate verify failed")
    if any(alert in upper for alert in _CLIENT_CERT_ALERTS):
        certfile = security.get("ssl_certfile")
        if not certfile:
            return (
                f"TLS: the broker at {where} requires a client certificate (mTLS): give "
                "--ssl-certfile and --ssl-keyfile"
            )
        return (
            f"TLS: the broker at {where} refused the client certificate --ssl-certfile "
            f"{certfile}: not signed by a CA it trusts, or expired or revoked"
        )
    if "WRONG_VERSION_NUMBER" in upper or "RECORD_LAYER_FAILURE" in upper:
        return (
            f"TLS: {where} does not speak TLS (a PLAINTEXT listener? check "
            "--security-protocol and the port)"
        )
    return ""


# ------------------------------------------------------------------ access (ACLs)


class TopicAccess:
    """What a command needs: operation -> topics, the group it reads, its transactional id."""

    def __init__(
        self,
        read: tuple[str, ...] = (),
        write: tuple[str, ...] = (),
        group: str = "",
        transactional_id: str = "",
    ) -> None:
        self.read = tuple(t for t in read if t)
        self.write = tuple(t for t in write if t)
        self.group = group
        self.transactional_id = transactional_id


def worker_access(config: WorkerConfig) -> TopicAccess:
    """The ACLs a worker (or a replay) with ``config`` needs (docs/operations.md)."""
    return TopicAccess(
        read=(config.input_topic,),
        write=(config.output_topic, config.dlq_topic),
        group=config.group_id,
        transactional_id=config.transactional_id if config.guarantee == "exactly-once" else "",
    )


#: What a probe learnt about one resource: refused outright, the operations the broker
#: says the principal may do (upper-case ACL names), or None (it cannot say).
Allowed = Literal["denied"] | frozenset[str] | None


class AccessProbe(Protocol):
    """A client's questions to the broker, as the principal itself (KIP-430)."""

    def topics(self, names: list[str]) -> dict[str, Allowed]: ...

    def group(self, name: str) -> Allowed: ...

    def transactional_id_denied(self, name: str) -> bool:
        """True only when the broker refuses to find the id's coordinator."""


def check_access(probe: AccessProbe, need: TopicAccess, security: Mapping[str, Any]) -> None:
    """Raise one non-retriable line naming the first ACL ``need`` lacks. What the broker
    does not say (a topic that does not exist, a lookup that failed) is left to the
    client itself: this check only ever adds a clearer error."""
    wanted = list(dict.fromkeys([*need.read, *need.write]))
    found = probe.topics(wanted) if wanted else {}
    for topic in wanted:
        allowed = found.get(topic)
        op = "Read" if topic in need.read else "Write"
        if allowed == "denied" or (allowed and not _may(allowed, op)):
            raise not_authorized("", security, "topic", repr(topic), op)
        if allowed and topic in need.read and topic in need.write and not _may(allowed, "Write"):
            raise not_authorized("", security, "topic", repr(topic), "Write")
    if need.group:
        allowed = probe.group(need.group)
        if allowed == "denied" or (allowed and not _may(allowed, "Read")):
            raise not_authorized("", security, "group", repr(need.group), "Read")
    if need.transactional_id and probe.transactional_id_denied(need.transactional_id):
        raise not_authorized("", security, "transactional id", repr(need.transactional_id), "Write")


def _may(allowed: frozenset[str], operation: str) -> bool:
    return operation.upper() in allowed or "ALL" in allowed


# ------------------------------------------------------------------ reading a range


class Progress:
    """A range reader's rule: fail once the position has not moved for ``timeout_s``."""

    def __init__(self, where: str, position: int, timeout_s: float) -> None:
        self.where = where
        self.position = position
        self.timeout_s = timeout_s
        self._moved = time.monotonic()

    def at(self, position: int) -> None:
        """The reader is at ``position`` now; raises if it has not moved for too long."""
        if position > self.position:
            self.position, self._moved = position, time.monotonic()
        elif time.monotonic() - self._moved > self.timeout_s:
            raise BrokerError(
                f"reading {self.where}: no progress for {self.timeout_s:g} s at offset "
                f"{self.position}"
            )
