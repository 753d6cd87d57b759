"""Probe and metrics HTTP server: ``/metrics``, ``/healthz``, ``/readyz``.

Routes (GET and HEAD)::

    /metrics   200, Prometheus text exposition of the worker's registry
    /healthz   200 "ok" while the worker is alive (its poll loop keeps turning), else 503
    /readyz    200 "ok" once the worker can do work (model loaded, group joined), else 503
    other      404

One server per pod: a single worker process serves its own (worker/ops/serve.py); with
``--processes N`` the launcher serves the same routes for all N processes and the
children serve none (worker/ops/processes.py).

A 503's body is the reason, one line. A probe callback that raises gives 503 with the
exception's text; the server keeps running. The server runs on a daemon thread
(stdlib ``ThreadingHTTPServer``); request logs go to this module's logger at DEBUG.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol, cast

from prometheus_client import CONTENT_TYPE_LATEST

from worker.contract.errors import ConfigError
from worker.ops.metrics import WorkerMetrics

logger = logging.getLogger(__name__)

Probe = Callable[[], tuple[bool, str]]
"""A probe callback: ``(ok, reason)``; ``reason`` is the 503 body when not ok."""


class MetricsSource(Protocol):
    """What ``/metrics`` serves: :class:`~worker.ops.metrics.WorkerMetrics` (one process)
    or :class:`~worker.ops.metrics.PoolMetrics` (the ``--processes`` launcher)."""

    def render(self) -> bytes: ...


_TEXT = "text/plain; charset=utf-8"
#: ``/readyz`` reasons before a worker is ready (one process's and the launcher's).
LOADING = "loading the model"
JOINING = "joining the consumer group"


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_port = False  # a second worker on the same port must fail, not share it
    probe: ProbeServer


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    timeout = 10.0  # seconds a client may take to send its request

    def do_GET(self) -> None:
        self._respond(head=False)

    def do_HEAD(self) -> None:
        self._respond(head=True)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s - " + format, self.address_string(), *args)

    def _respond(self, *, head: bool) -> None:
        probe = cast(_Server, self.server).probe
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            try:
                body = probe.metrics.render()
            except Exception as e:
                logger.exception("rendering metrics failed")
                self._send(500, f"{type(e).__name__}: {e}\n".encode(), _TEXT, head)
                return
            self._send(200, body, CONTENT_TYPE_LATEST, head)
        elif path == "/healthz":
            self._send_probe(probe.healthy, head)
        elif path == "/readyz":
            self._send_probe(probe.ready, head)
        else:
            self._send(404, b"not found\n", _TEXT, head)

    def _send_probe(self, check: Probe, head: bool) -> None:
        try:
            ok, reason = check()
        except Exception as e:
            logger.warning("probe %s raised: %s", self.path, e)
            ok, reason = False, f"{type(e).__name__}: {e}"
        if ok:
            self._send(200, b"ok\n", _TEXT, head)
        else:
            self._send(503, f"{reason}\n".encode(), _TEXT, head)

    def _send(self, status: int, body: bytes, content_type: str, head: bool) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if not head:
            self.wfile.write(body)


class ProbeServer:
    """Serves ``/metrics``, ``/healthz`` and ``/readyz`` on ``host:port`` (0 = a free port)."""

    def __init__(
        self,
        host: str,
        port: int,
        metrics: MetricsSource,
        healthy: Probe,
        ready: Probe,
    ) -> None:
        if not 0 <= port <= 65535:
            raise ConfigError(f"HTTP port must be within 0..65535, got {port}")
        self.host = host
        self.port = port
        self.metrics = metrics
        self.healthy = healthy
        self.ready = ready
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> int:
        """Bind and serve on a daemon thread; returns the bound port (idempotent)."""
        if self._server is not None:
            return self.bound_port
        cls = _Server6 if ":" in self.host else _Server
        try:
            server = cls((self.host, self.port), _Handler)
        except OSError as e:
            raise ConfigError(f"cannot listen on {self.host}:{self.port}: {e}") from e
        server.probe = self
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name=f"mmstream-http-{self.bound_port}",
            daemon=True,
        )
        self._thread.start()
        logger.info("HTTP probes and metrics on %s:%d", self.host, self.bound_port)
        return self.bound_port

    @property
    def bound_port(self) -> int:
        """The port actually bound (differs from ``port`` when that was 0)."""
        if self._server is None:
            return 0
        return int(self._server.server_address[1])

    def stop(self) -> None:
        """Stop serving and close the listening socket (idempotent)."""
        server, thread = self._server, self._thread
        if server is None:
            return
        self._server = self._thread = None
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5.0)
        logger.info("HTTP server stopped")

    def __enter__(self) -> ProbeServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def loop_health(
    metrics: WorkerMetrics, max_stall_s: float, clock: Callable[[], float] = time.time
) -> Probe:
    """A ``/healthz`` callback: unhealthy once the poll loop has not beaten for ``max_stall_s``.

    Before the first :meth:`WorkerMetrics.beat` it reports healthy ("starting") for
    ``max_stall_s`` after this call, then unhealthy. ``clock`` must be the clock whose
    unix time the loop passes to ``beat``.
    """
    if not max_stall_s > 0:
        raise ConfigError(f"max_stall_s must be > 0, got {max_stall_s}")
    started = clock()

    def check() -> tuple[bool, str]:
        return beat_health(metrics.last_beat, started, clock(), max_stall_s)

    return check


def beat_health(
    last_beat: float | None, started: float, now: float, max_stall_s: float
) -> tuple[bool, str]:
    """The liveness rule of one poll loop: healthy ("starting") for ``max_stall_s`` after
    ``started`` until the first beat, then while the last beat is at most ``max_stall_s``
    old. All times in seconds on one clock."""
    if last_beat is None:
        if now - started <= max_stall_s:
            return True, "starting"
        return False, f"poll loop has not run in the {max_stall_s:g}s since start"
    stall = now - last_beat
    if stall > max_stall_s:
        return False, f"poll loop stalled for {stall:.1f}s (limit {max_stall_s:g}s)"
    return True, "ok"
