"""The worker as the bench runs it: its own processes (or a thread, for the profile),
the open-loop producer process, and RSS sampling from ``/proc``."""

from __future__ import annotations

import contextlib
import cProfile
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from worker.config import WorkerConfig
from worker.contract.errors import BrokerError, MMStreamError
from worker.core.pipeline import Worker, WorkerStats
from worker.tools.bench.config import BenchConfig
from worker.tools.bench.results import RssPeaks
from worker.tools.demo import read_predictions

#: A prediction's value and its record timestamp, as read from the output topic.
Preds = list[tuple[dict[str, Any], int]]


def _proc_rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError):
        pass
    return 0.0


def _descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (Linux /proc; just ``pid`` elsewhere)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        for task in Path(f"/proc/{p}/task").glob("*/children"):
            with contextlib.suppress(OSError, ValueError):
                todo.extend(int(c) for c in task.read_text().split())
    return found


class TreeRssSampler:
    """Samples the RSS of a process and its descendants; keeps per-process and total peaks."""

    def __init__(self, pid: int, interval_s: float = 0.2) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.peaks: dict[int, float] = {}
        self.total_peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bench-rss-tree", daemon=True)

    def sample(self) -> None:
        total = 0.0
        for p in _descendants(self.pid):
            rss = _proc_rss_mb(p)
            total += rss
            self.peaks[p] = max(self.peaks.get(p, 0.0), rss)
        self.total_peak = max(self.total_peak, total)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def __enter__(self) -> TreeRssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


class WorkerThread:
    """The real Worker on a thread (optionally under cProfile), as ``mmstream demo`` runs it."""

    def __init__(self, worker: Worker, profile: cProfile.Profile | None = None) -> None:
        self.worker = worker
        self.profile = profile
        self.stop = threading.Event()
        self.stats: WorkerStats | None = None
        self.error: MMStreamError | None = None
        self.thread = threading.Thread(target=self._run, name="mmstream-worker", daemon=True)

    def _run(self) -> None:
        try:
            if self.profile is not None:
                self.stats = self.profile.runcall(self.worker.run, self.stop)
            else:
                self.stats = self.worker.run(self.stop)
        except MMStreamError as exc:
            self.error = exc

    def start(self, ready_timeout_s: float = 30.0) -> None:
        self.thread.start()
        if not self.worker.ready.wait(timeout=ready_timeout_s):
            self.stop.set()
            self.thread.join(timeout=30)
            raise BrokerError(
                f"the worker did not join its consumer group within {ready_timeout_s} s"
            )

    def join(self, timeout_s: float) -> WorkerStats:
        self.thread.join(timeout=timeout_s)
        if self.thread.is_alive():
            self.stop.set()
            self.thread.join(timeout=30)
            raise BrokerError(
                f"the worker predicted {self.worker.stats.predicted} events "
                f"within {timeout_s} s and was stopped"
            )
        if self.error is not None:
            raise self.error
        if self.stats is None:
            raise BrokerError("the worker thread ended without stats")
        return self.stats


def worker_config(
    config: BenchConfig, run: str, topic_in: str, topic_out: str, max_events: int
) -> WorkerConfig:
    """The settings of an in-process worker (:class:`WorkerThread`) for one bench run."""
    return WorkerConfig(
        bootstrap_servers=config.bootstrap_servers,
        input_topic=topic_in,
        output_topic=topic_out,
        dlq_topic=f"{topic_out}.dlq",
        group_id=f"mm-bench-{run}-{uuid.uuid4().hex[:6]}",
        model=config.model,
        device=config.device,
        max_batch_size=config.max_batch_size,
        max_batch_delay_ms=config.max_batch_delay_ms,
        inference_queue=config.inference_queue,
        max_events=max_events,
        kafka_client=config.kafka_client,
    )


def child_env() -> dict[str, str]:
    """This environment without ``MMSTREAM_*``: the bench's own settings are not the
    child's (each command rejects variables it does not know)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("MMSTREAM_")}


def free_port_block(n: int) -> int:
    """A port P with P..P+n-1 free now (for ``--http-port P`` with ``--processes n``)."""
    for _ in range(50):
        with socket.socket() as s0:
            s0.bind(("127.0.0.1", 0))
            base = int(s0.getsockname()[1])
        if base + n > 65535:
            continue
        try:
            with contextlib.ExitStack() as stack:
                for i in range(1, n):
                    sock = stack.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", base + i))
        except OSError:
            continue
        return base
    raise BrokerError(f"no block of {n} free local ports for the worker probes")


def _worker_argv(config: BenchConfig, run: str, topics: tuple[str, str], port: int) -> list[str]:
    topic_in, topic_out = topics
    return [
        sys.executable, "-m", "worker.cli", "worker",
        "--bootstrap-servers", config.bootstrap_servers,
        "--input-topic", topic_in,
        "--output-topic", topic_out,
        "--dlq-topic", f"{topic_out}.dlq",
        "--group-id", f"mm-bench-{run}-{uuid.uuid4().hex[:6]}",
        "--model", str(config.model),
        "--device", config.device,
        "--max-batch-size", str(config.max_batch_size),
        "--max-batch-delay-ms", str(config.max_batch_delay_ms),
        "--inference-queue", str(config.inference_queue),
        "--processes", str(config.processes),
        "--kafka-client", config.kafka_client,
        "--http-host", "127.0.0.1",
        "--http-port", str(port),
        "--log-level", "WARNING",
    ]  # fmt: skip


class WorkerProcesses:
    """``mmstream worker --processes N`` as a real deployment runs it: its own
    interpreter(s), so neither the bench's GIL nor its memory is the worker's."""

    def __init__(self, config: BenchConfig, run: str, topic_in: str, topic_out: str) -> None:
        self.config = config
        self.port = free_port_block(1)  # one port per pod, whatever --processes
        self.argv = _worker_argv(config, run, (topic_in, topic_out), self.port)
        self.proc: subprocess.Popen[bytes] | None = None
        self.rss: TreeRssSampler | None = None
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in __exit__

    def __enter__(self) -> WorkerProcesses:
        self.proc = subprocess.Popen(
            self.argv, env=child_env(), stdout=self._log, stderr=subprocess.STDOUT
        )
        self.rss = TreeRssSampler(self.proc.pid).__enter__()
        return self

    def wait_ready(self, timeout_s: float) -> None:
        """``/readyz`` answers 200: every process loaded the model and joined the group
        (with --processes N the launcher answers for all of them on the one port)."""
        deadline = time.monotonic() + timeout_s
        pending = {self.port}
        while pending:
            if self.proc is not None and self.proc.poll() is not None:
                raise BrokerError(f"the worker exited with {self.proc.returncode}: {self.tail()}")
            if time.monotonic() > deadline:
                raise BrokerError(f"the worker was not ready within {timeout_s} s: {self.tail()}")
            for port in sorted(pending):
                url = f"http://127.0.0.1:{port}/readyz"
                with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2):
                    pending.discard(port)  # 200; a 503 raises HTTPError (an OSError)
            time.sleep(0.2)

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM (drain, commit, exit 0); the exit code."""
        if self.proc is None:
            return -1
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise BrokerError(f"the worker did not stop within {timeout_s} s") from None

    def collect(self, topic_out: str, n: int) -> Preds:
        """Read until ``n`` events have a prediction, then stop the worker (it must exit 0)."""
        preds = read_predictions(self.config.bootstrap_servers, topic_out, n, self.config.timeout_s)
        rc = self.stop()
        if rc != 0:
            raise BrokerError(f"the worker exited with {rc}: {self.tail()}")
        return preds

    def tail(self, lines: int = 5) -> str:
        self._log.seek(0)
        text = self._log.read().decode("utf-8", "replace").strip().splitlines()
        return " | ".join(text[-lines:])

    def rss_peaks(self) -> RssPeaks:
        """The peaks sampled so far (zeros before the worker started)."""
        procs = self.config.processes
        if self.rss is None or self.proc is None:
            return RssPeaks(
                processes=procs, peak_per_worker_process=0.0, peak_total=0.0, launcher=None
            )
        peaks = self.rss.peaks
        own = peaks.get(self.proc.pid, 0.0)
        # With --processes N > 1 the workers are the launcher's children (a small
        # multiprocessing resource tracker among them is counted too).
        workers = [v for p, v in peaks.items() if p != self.proc.pid] or [own]
        return RssPeaks(
            processes=procs,
            peak_per_worker_process=round(max(workers), 1),
            peak_total=round(self.rss.total_peak, 1),
            launcher=round(own, 1) if procs > 1 else None,
        )

    def __exit__(self, *exc: object) -> None:
        if self.rss is not None:
            self.rss.__exit__()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


def _producer_argv(config: BenchConfig, topic_in: str, rate: float) -> list[str]:
    return [
        sys.executable, "-m", "worker.cli", "produce",
        "--bootstrap-servers", config.bootstrap_servers,
        "--topic", topic_in,
        "--count", str(config.events),
        "--rate", f"{rate:.3f}",
        "--content", config.content,
        "--model", str(config.model),
        "--media", config.media,
        "--image-type", config.image_type,
        "--audio-type", config.audio_type,
        "--seed", str(config.seed + 1),
        "--key-prefix", f"bench-open-{uuid.uuid4().hex[:6]}-",
    ]  # fmt: skip


def run_open_loop_producer(config: BenchConfig, topic_in: str, rate: float) -> dict[str, Any]:
    """``mmstream produce --rate`` in a separate process, so that its GIL is not the
    worker's; its JSON summary (``ms``: how long producing took)."""
    argv = _producer_argv(config, topic_in, rate)
    try:
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=config.timeout_s, env=child_env()
        )
    except subprocess.TimeoutExpired as exc:
        raise BrokerError(f"the open-loop producer ran past {config.timeout_s} s") from exc
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:]
        raise BrokerError(f"the open-loop producer failed: {tail}")
    summary: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return summary
