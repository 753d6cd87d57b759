"""One line that names the cause of a Kafka security failure.

kafka-python 3.0.12 retries a failed SASL authentication or TLS handshake until its
bootstrap timeout (30 s) and then raises only ``KafkaTimeoutError: Unable to bootstrap``;
the real exception is only logged by ``kafka.net``. :class:`BootstrapWatch` is used while
a client is built (:mod:`worker.edge.kafka_python.build`): it reads those log records, stops the
bootstrap at the first failure that retrying cannot fix, closes what the failed
constructor left running (its IO thread and sockets) and turns the failure into a
:class:`~worker.contract.errors.BrokerError` with ``retriable=False`` whose message names
the cause, e.g.::

    authentication failed for user 'mmstream' (SCRAM-SHA-512) at 127.0.0.1:9192: wrong
    password or unknown user

Errors: :func:`broker_error` reads a kafka-python error into the edge's one table
(:func:`worker.edge.common.translate`); :class:`AdminProbe` answers the ACL check's
questions (:func:`worker.edge.common.check_access`) with kafka-python's admin client.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

from kafka import errors as kerrors

from worker.contract.errors import BrokerError
from worker.edge.common import (
    AUTHORIZATION,
    FENCED,
    REFUSED_COMMIT,
    Allowed,
    Failure,
    TopicAccess,
    authentication_failed,
    tls_failure,
    translate,
    untrusted,
)
from worker.edge.common import check_access as common_check_access

log = logging.getLogger(__name__)

__all__ = ["AdminProbe", "BootstrapWatch", "broker_error", "check_access", "failure"]

#: kafka-python's loggers that report connection failures.
_KAFKA_LOGGER = "kafka"


# ------------------------------------------------------------------ connecting


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


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
        self._clients: list[tuple[Any, Any, Any]] = []  # (client, its selector, its manager)
        self._lock = threading.Lock()

    # -- the kafka_client factory: remember each client, to stop or close it

    def client_factory(self, **configs: Any) -> Any:
        from kafka.net.compat import KafkaNetClient
        from kafka.net.selector import NetworkSelector

        net = NetworkSelector(**configs)
        manager = _manager_class()(net, **configs)
        client = KafkaNetClient(net=net, manager=manager, **configs)
        with self._lock:
            self._clients.append((client, net, manager))
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
        for _client, net, manager in clients:
            # The bootstrap loop ends when the manager is closed; close it from its own
            # loop (this handler may run inside that loop's connection handling).
            with contextlib.suppress(Exception):
                net.call_soon_threadsafe(manager.close)

    def close_clients(self) -> None:
        """Close the clients a failed constructor left behind (IO thread, sockets)."""
        with self._lock:
            clients, self._clients = list(self._clients), []
        for client, _net, _manager in clients:
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


# ------------------------------------------------------------------ errors


def failure(exc: BaseException) -> Failure:
    """A kafka-python error as the edge's error table reads it."""
    name = getattr(exc, "message", None) or (
        "COMMIT_FAILED" if isinstance(exc, kerrors.CommitFailedError) else type(exc).__name__
    )
    plain = str(exc) or type(exc).__name__
    text = repr(exc) if name in REFUSED_COMMIT or name in FENCED else plain
    resources = _resources(exc) if name in AUTHORIZATION else ""
    return Failure(str(name), text, bool(getattr(exc, "retriable", True)), resources)


def broker_error(
    what: str, exc: BaseException, security: Mapping[str, Any] | None = None, operation: str = ""
) -> BrokerError:
    """A kafka-python error as a BrokerError with kafka-python's retriable flag (see
    :func:`worker.edge.common.translate`); anything else keeps its repr."""
    if not isinstance(exc, kerrors.KafkaError):
        return BrokerError(f"{what}: {exc!r}")
    err = translate(what, failure(exc), security or {}, operation)
    err.__cause__ = exc
    return err


def _resources(exc: BaseException) -> str:
    names: list[str] = []
    for arg in exc.args:
        if isinstance(arg, set | frozenset | list | tuple):
            names += sorted(str(a) for a in arg)
        elif isinstance(arg, str) and arg and " " not in arg.strip():
            names.append(arg)
    return ", ".join(repr(n) for n in names)


# ------------------------------------------------------------------ access (ACLs)


class AdminProbe:
    """:class:`~worker.edge.common.AccessProbe` over kafka-python's admin client."""

    def __init__(self, admin: Any, timeout_s: float) -> None:
        self.admin = admin
        self.timeout_s = timeout_s

    def topics(self, names: list[str]) -> dict[str, Allowed]:
        try:
            described = self.admin.describe_topics(sorted(names))
        except kerrors.KafkaError as exc:
            log.debug("topic access check skipped: %r", exc)
            return {}
        out: dict[str, Allowed] = {}
        for info in described:
            code = info.get("error_code", 0)
            if code == kerrors.TopicAuthorizationFailedError.errno:
                out[info.get("name")] = "denied"
            elif code == 0 and info.get("authorized_operations"):
                out[info.get("name")] = frozenset(info["authorized_operations"])
        return out

    def group(self, name: str) -> Allowed:
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                found = self.admin.describe_groups([name])
                break
            except kerrors.GroupAuthorizationFailedError:
                return "denied"
            except kerrors.KafkaError as exc:
                # The coordinator may not be ready on a fresh cluster: try again briefly.
                if not getattr(exc, "retriable", False) or time.monotonic() >= deadline:
                    log.debug("group access check skipped: %r", exc)
                    return None
                time.sleep(0.2)
        info = found.get(name) or {}
        if "GroupAuthorizationFailed" in str(info.get("error") or ""):
            return "denied"
        ops = info.get("authorized_operations")
        return frozenset(ops) if ops else None

    def transactional_id_denied(self, name: str) -> bool:
        try:
            self.admin.describe_transactions([name])
        except kerrors.TransactionalIdAuthorizationFailedError:
            return True
        except kerrors.KafkaError as exc:  # not found yet (a new id), or cannot say
            log.debug("transactional id access check: %r", exc)
        return False


def check_access(
    bootstrap_servers: str,
    security: dict[str, Any],
    need: TopicAccess,
    *,
    timeout_s: float = 10.0,
) -> None:
    """:func:`worker.edge.common.check_access` with kafka-python's admin client, as the
    client's own principal; a broker it cannot reach is left to the client itself."""
    from kafka.admin import KafkaAdminClient

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
        common_check_access(AdminProbe(admin, timeout_s), need, security)
    finally:
        admin.close()
