"""One line that names the cause of a Kafka security failure.

kafka-python 3.0.12 retries a failed SASL authentication or TLS handshake until its
bootstrap timeout (30 s) and then raises only ``KafkaTimeoutError: Unable to bootstrap``;
the real exception is only logged by ``kafka.net``. :class:`BootstrapWatch` is used while
a client is built (:mod:`worker.edge.kafka_io`): it reads those log records, stops the
bootstrap at the first failure that retrying cannot fix, closes what the failed
constructor left running (its IO thread and sockets) and turns the failure into a
:class:`~worker.contract.errors.BrokerError` with ``retriable=False`` whose message names
the cause, e.g.::

    authentication failed for user 'mmstream' (SCRAM-SHA-512) at 127.0.0.1:9192: wrong
    password or unknown user

Authorization: :func:`check_access` asks the broker which operations the client may do
on the worker's topics and group (Metadata's and DescribeGroups' authorized operations,
KIP-430; FindCoordinator for a transactional id) before anything joins a group, and
:func:`authorization_error` words a kafka-python ``*AuthorizationFailedError`` raised later.
"""

from __future__ import annotations

import contextlib
import logging
import re
import ssl
import threading
import time
from collections.abc import Iterator
from typing import Any

from kafka import errors as kerrors

from worker.contract.errors import BrokerError

log = logging.getLogger(__name__)

__all__ = [
    "BootstrapWatch",
    "TopicAccess",
    "authentication_failed",
    "authorization_error",
    "check_access",
    "principal",
    "tls_failure",
    "untrusted",
]

#: kafka-python's loggers that report connection failures.
_KAFKA_LOGGER = "kafka"


def principal(security: dict[str, Any]) -> str:
    """Who the broker sees, for messages: ``user 'x'`` (SASL), the certificate's CN (mTLS)."""
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


# ------------------------------------------------------------------ connecting


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def authentication_failed(security: dict[str, Any], where: str) -> str:
    """The cause of a refused SASL login (``security``: kafka-python's keywords)."""
    return (
        f"authentication failed for user {security.get('sasl_plain_username', '')!r} "
        f"({security.get('sasl_mechanism')}) at {where}: wrong password or unknown user"
    )


def untrusted(security: dict[str, Any], where: str, detail: str) -> str:
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


def tls_failure(security: dict[str, Any], where: str, text: str) -> str:
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


class BootstrapWatch(logging.Handler):
    """Watches kafka-python build a client; see the module docstring.

    Use::

        with BootstrapWatch(bootstrap, security) as watch:
            try:
                consumer = KafkaConsumer(..., kafka_client=watch.client_factory)
            except KafkaError as exc:
                raise watch.error("cannot connect consumer", exc) from exc
    """

    def __init__(self, bootstrap_servers: str, security: dict[str, Any]) -> None:
        super().__init__(level=logging.WARNING)
        self.bootstrap_servers = bootstrap_servers
        self.security = dict(security)
        self.cause = ""  # the one-line cause, once a fatal failure was seen
        self.disconnects = 0
        self._clients: list[Any] = []
        self._lock = threading.Lock()

    # -- the kafka_client factory: remember each client, to stop or close it

    def client_factory(self, **configs: Any) -> Any:
        from kafka.net.compat import KafkaNetClient
        from kafka.net.selector import NetworkSelector

        net = NetworkSelector(**configs)
        client = KafkaNetClient(net=net, manager=_manager_class()(net, **configs), **configs)
        with self._lock:
            self._clients.append(client)
        return client

    # -- context: the log handler is attached while the client is built

    def __enter__(self) -> BootstrapWatch:
        logging.getLogger(_KAFKA_LOGGER).addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger(_KAFKA_LOGGER).removeHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            excs: list[BaseException] = []
            if record.exc_info and record.exc_info[1] is not None:
                excs.append(record.exc_info[1])
            excs += [a for a in (record.args or ()) if isinstance(a, BaseException)]
            cause = ""
            for exc in excs:
                cause = cause or self._classify(exc)
            text = record.getMessage()
            cause = cause or self._classify_text(text)
            if not cause and "disconnected" in text:
                self.disconnects += 1
            if cause and not self.cause:
                self.cause = cause
                self._stop_bootstrap()
        except Exception:  # a log handler must never raise into kafka-python
            self.handleError(record)

    def _stop_bootstrap(self) -> None:
        """End the bootstrap loops now: retrying cannot fix the cause."""
        with self._lock:
            clients = list(self._clients)
        for client in clients:
            manager = getattr(client, "_manager", None)
            if manager is None:
                continue
            # The bootstrap loop ends when the manager is closed; close it from its own
            # loop (this handler may run inside that loop's connection handling).
            with contextlib.suppress(Exception):
                client._net.call_soon_threadsafe(manager.close)

    def close_clients(self) -> None:
        """Close the clients a failed constructor left behind (IO thread, sockets)."""
        with self._lock:
            clients, self._clients = list(self._clients), []
        for client in clients:
            with contextlib.suppress(Exception):
                client.close()

    # -- classification

    def _where(self) -> str:
        return self.bootstrap_servers

    def _classify(self, exc: BaseException) -> str:
        sec, where = self.security, self._where()
        for e in _chain(exc):
            if isinstance(e, kerrors.SaslAuthenticationFailedError):
                return authentication_failed(sec, where)
            if isinstance(e, kerrors.UnsupportedSaslMechanismError):
                return (
                    f"the broker at {where} does not offer SASL mechanism "
                    f"{sec.get('sasl_mechanism')} (--sasl-mechanism)"
                )
            if isinstance(e, ssl.SSLCertVerificationError):
                return untrusted(sec, where, e.verify_message or str(e))
            if isinstance(e, ssl.SSLError):
                cause = self._classify_text(str(e))
                if cause:
                    return cause
        return ""

    def _classify_text(self, text: str) -> str:
        if "SASLAUTHENTICATIONFAILED" in text.upper().replace("_", ""):
            return authentication_failed(self.security, self._where())
        return tls_failure(self.security, self._where(), text)

    def error(self, what: str, exc: BaseException) -> BrokerError:
        """The BrokerError for a failed constructor (closes what it left running)."""
        self.close_clients()
        if self.cause:
            err = BrokerError(f"{what}: {self.cause}", retriable=False)
        else:
            err = BrokerError.wrap(f"{what} to {self.bootstrap_servers}", exc)
            if self.disconnects and isinstance(exc, kerrors.KafkaTimeoutError):
                err = BrokerError(
                    f"{err} (the broker closed every connection: does --security-protocol "
                    f"{self.security.get('security_protocol', 'PLAINTEXT')} match the "
                    "listener?)",
                    retriable=err.retriable,
                )
        err.__cause__ = exc
        return err


_MANAGER: list[type] = []


def _manager_class() -> type:
    """kafka-python's connection manager, closing what a failed TLS handshake leaves open.

    kafka-python 3.0.12 drops the TLS socket of a handshake that failed (an untrusted
    broker certificate) without closing it: a ResourceWarning per attempt.
    """
    if not _MANAGER:
        from kafka.net.manager import KafkaConnectionManager

        class _Manager(KafkaConnectionManager):  # type: ignore[misc]
            async def _build_transport(self, node: Any, timeout_at: Any = None) -> Any:
                try:
                    return await super()._build_transport(node, timeout_at=timeout_at)
                except Exception as exc:
                    _close_left_open(exc)
                    raise

        _MANAGER.append(_Manager)
    return _MANAGER[0]


def _close_left_open(exc: BaseException) -> None:
    """Close the transports and sockets of the frames ``exc`` passed through."""
    tb = exc.__traceback__
    while tb is not None:
        for name in ("transport", "sock"):
            obj = tb.tb_frame.f_locals.get(name)
            close = getattr(obj, "close", None)
            if callable(close):
                with contextlib.suppress(Exception):
                    close()
        tb = tb.tb_next


# ------------------------------------------------------------------ authorization

#: kafka-python authorization errors -> the resource type they are about.
_AUTHZ: tuple[tuple[type[BaseException], str], ...] = (
    (kerrors.TopicAuthorizationFailedError, "topic"),
    (kerrors.GroupAuthorizationFailedError, "group"),
    (kerrors.TransactionalIdAuthorizationFailedError, "transactional id"),
    (kerrors.ClusterAuthorizationFailedError, "cluster"),
)


def _resources(exc: BaseException) -> str:
    names: list[str] = []
    for arg in exc.args:
        if isinstance(arg, set | frozenset | list | tuple):
            names += sorted(str(a) for a in arg)
        elif isinstance(arg, str) and arg and " " not in arg.strip():
            names.append(arg)
    return ", ".join(repr(n) for n in names)


def authorization_error(
    what: str, exc: BaseException, security: dict[str, Any], operation: str = ""
) -> BrokerError | None:
    """A kafka-python ``*AuthorizationFailedError`` as a one-line, non-retriable
    BrokerError naming the resource (None for any other error).

    ``operation``: what the client was doing (``Read``, ``Write``), when the caller knows.
    """
    for cls, kind in _AUTHZ:
        if isinstance(exc, cls):
            names = _resources(exc)
            op = f"{operation} on " if operation else ""
            target = f"{kind} {names}" if names else kind
            err = BrokerError(
                f"{what}: not authorized: {principal(security)} lacks {op}{target} "
                "(see 'Security and ACLs' in docs/operations.md)",
                retriable=False,
            )
            err.__cause__ = exc
            return err
    return None


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


def check_access(
    bootstrap_servers: str,
    security: dict[str, Any],
    need: TopicAccess,
    *,
    timeout_s: float = 10.0,
) -> None:
    """Raise a one-line BrokerError (``retriable=False``) naming the first ACL ``need``
    lacks, before any group is joined or anything is sent.

    Asks the broker (as the client's own principal) for its authorized operations on
    each topic (Metadata, KIP-430) and on the group (DescribeGroups), and whether it may
    find the transactional id's coordinator (needs Describe, implied by Write). A topic
    that does not exist, a broker that does not say, or a lookup that fails for another
    reason is left to the client itself: this check only ever adds a clearer error.
    """
    from kafka.admin import KafkaAdminClient

    who = principal(security)
    try:
        admin = KafkaAdminClient(
            bootstrap_servers=bootstrap_servers.split(","),
            client_id="mmstream-access-check",
            request_timeout_ms=int(timeout_s * 1000),
            **security,
        )
    except kerrors.KafkaError as exc:
        log.debug("access check skipped: %r", exc)
        return
    try:
        _check_topics(admin, need, who)
        if need.group:
            _check_group(admin, need.group, who, timeout_s)
        if need.transactional_id:
            _check_transactional_id(admin, need.transactional_id, who)
    finally:
        admin.close()


def _denied(who: str, operation: str, kind: str, name: str) -> BrokerError:
    return BrokerError(
        f"not authorized: {who} lacks {operation} on {kind} {name!r} (see 'Security and "
        "ACLs' in docs/operations.md)",
        retriable=False,
    )


def _check_topics(admin: Any, need: TopicAccess, who: str) -> None:
    wanted = {t: "READ" for t in need.read}
    for t in need.write:
        wanted.setdefault(t, "WRITE")
    if not wanted:
        return
    try:
        described = {t.get("name"): t for t in admin.describe_topics(sorted(wanted))}
    except kerrors.KafkaError as exc:
        log.debug("topic access check skipped: %r", exc)
        return
    for topic in [*need.read, *need.write]:
        op = "READ" if topic in need.read else "WRITE"
        info = described.get(topic)
        if info is None:
            continue
        code = info.get("error_code", 0)
        if code == kerrors.TopicAuthorizationFailedError.errno:
            raise _denied(who, op.title(), "topic", topic)
        if code != 0:
            continue  # e.g. it does not exist: the client reports that itself
        ops = info.get("authorized_operations")
        if not ops:
            continue  # the broker did not say
        if op not in ops and "ALL" not in ops:
            raise _denied(who, op.title(), "topic", topic)
        if topic in need.read and topic in need.write and "WRITE" not in ops and "ALL" not in ops:
            raise _denied(who, "Write", "topic", topic)


def _check_group(admin: Any, group: str, who: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            found = admin.describe_groups([group])
            break
        except kerrors.GroupAuthorizationFailedError:
            raise _denied(who, "Read", "group", group) from None
        except kerrors.KafkaError as exc:
            # The coordinator may not be ready on a fresh cluster: try again briefly.
            if not getattr(exc, "retriable", False) or time.monotonic() >= deadline:
                log.debug("group access check skipped: %r", exc)
                return
            time.sleep(0.2)
    info = found.get(group) or {}
    error = str(info.get("error") or "")
    if "GroupAuthorizationFailed" in error:
        raise _denied(who, "Read", "group", group)
    ops = info.get("authorized_operations")
    if ops and "READ" not in ops and "ALL" not in ops:
        raise _denied(who, "Read", "group", group)


def _check_transactional_id(admin: Any, transactional_id: str, who: str) -> None:
    try:
        admin.describe_transactions([transactional_id])
    except kerrors.TransactionalIdAuthorizationFailedError:
        raise _denied(who, "Write", "transactional id", transactional_id) from None
    except kerrors.KafkaError as exc:  # not found yet (a new id), or cannot say
        log.debug("transactional id access check: %r", exc)
