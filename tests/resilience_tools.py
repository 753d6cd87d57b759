"""Helpers for ``test_resilience.py``: worker subprocesses, traffic, output readers, metrics.

Workers run as real processes (``python -m worker.cli worker ...``) with their stderr in a
log file each; :class:`ProcessPool` kills whatever is still running when a test ends and
prints the tail of every log (pytest shows it only for failed tests). Traffic comes from an
independent kafka-python producer; :class:`TopicReader` reads outputs with its own consumer.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from worker.contract.manifest import load_manifest
from worker.contract.reference_data import samples
from worker.tools.produce import encode_sample

from kafka_broker import KAFKA_SH, _free_ports, wait_ready

REPO_ROOT = Path(__file__).resolve().parent.parent

Record = tuple[str, str, bytes, str]  # key (event id), modality, value, content type

#: Both clients log this when the worker is given at least one partition.
ASSIGNED_RE = re.compile(r"partitions assigned: \[\(")
PRODUCING_RE = re.compile(r"producing \d+ events")


def free_port() -> int:
    return _free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports."""
    return _free_ports(n)


# ------------------------------------------------------------------------ processes


class WorkerProcess:
    """One ``mmstream`` subprocess (worker or producer); stderr -> ``<name>.log``, stdout ->
    ``<name>.out``."""

    def __init__(self, name: str, argv: Sequence[str], log_dir: Path) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_dir / f"{name}.log"
        self.out_path = log_dir / f"{name}.out"
        # MMSTREAM_* variables that match no flag are an error in the worker: pass none.
        env = {k: v for k, v in os.environ.items() if not k.startswith("MMSTREAM_")}
        env["PYTHONUNBUFFERED"] = "1"
        with self.log_path.open("wb") as err, self.out_path.open("wb") as out:
            self.proc = subprocess.Popen(
                self.argv,
                cwd=REPO_ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
            )
        self.started = time.monotonic()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL and reap."""
        self.signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)

    def wait(self, timeout_s: float) -> int | None:
        """The exit code, or None if still running after ``timeout_s``."""
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stdout(self) -> str:
        try:
            return self.out_path.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, lines: int = 25) -> str:
        body = "\n".join(self.log().splitlines()[-lines:])
        state = "running" if self.alive() else f"exit {self.proc.returncode}"
        head = f"---- {self.name} (pid {self.pid}, {state}): last {lines} lines of stderr ----"
        return f"{head}\n{body}"

    def wait_for_log(self, pattern: re.Pattern[str], timeout_s: float) -> bool:
        """True once the log matches ``pattern``; False on timeout; raises if the worker exits."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if pattern.search(self.log()):
                return True
            if not self.alive():
                raise AssertionError(
                    f"{self.name} exited (code {self.proc.returncode}) while waiting for "
                    f"{pattern.pattern!r}\n{self.tail()}"
                )
            time.sleep(0.05)
        return False

    def rss_bytes(self) -> int | None:
        """Resident set size from /proc/<pid>/status (None once gone or without /proc)."""
        try:
            status = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return None
        m = re.search(r"^VmRSS:\s+(\d+)\s+kB", status, re.MULTILINE)
        return int(m.group(1)) * 1024 if m else None


class ProcessPool:
    """Starts worker processes; :meth:`close` kills leftovers and prints every log's tail."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[WorkerProcess] = []

    def start(self, name: str, argv: Sequence[str]) -> WorkerProcess:
        proc = WorkerProcess(name, argv, self.log_dir)
        self.procs.append(proc)
        return proc

    def tails(self, lines: int = 25) -> str:
        return "\n".join(p.tail(lines) for p in self.procs)

    def close(self) -> None:
        for p in self.procs:
            if p.alive():
                p.kill()
        if self.procs:
            print(self.tails(40))


def worker_argv(
    bootstrap: str,
    topics: tuple[str, str, str],
    group: str,
    model: Path,
    *extra: str,
) -> list[str]:
    t_in, t_out, t_dlq = topics
    return [
        sys.executable,
        "-m",
        "worker.cli",
        "worker",
        "--bootstrap-servers",
        bootstrap,
        "--input-topic",
        t_in,
        "--output-topic",
        t_out,
        "--dlq-topic",
        t_dlq,
        "--group-id",
        group,
        "--model",
        str(model),
        "--device",
        "cpu",
        "--intra-op-threads",
        "1",
        *extra,
    ]


def client_argv(kafka_client: str, *args: Any) -> list[str]:
    """:func:`worker_argv` with ``--kafka-client``: the same worker on that client."""
    return [*worker_argv(*args), "--kafka-client", kafka_client]


def produce_argv(
    bootstrap: str, topic: str, model: Path, count: int, rate: float, prefix: str, seed: int = 0
) -> list[str]:
    """``mmstream produce`` (npy parts): event ids are ``<prefix><i:06d>``."""
    return [
        sys.executable,
        "-m",
        "worker.cli",
        "produce",
        "--bootstrap-servers",
        bootstrap,
        "--topic",
        topic,
        "--count",
        str(count),
        "--rate",
        str(rate),
        "--content",
        "npy",
        "--model",
        str(model),
        "--key-prefix",
        prefix,
        "--seed",
        str(seed),
    ]


# ------------------------------------------------------------------------ traffic


class EventFactory:
    """npy part records of reference events: a few real samples encoded once, reused by id."""

    def __init__(self, model_dir: Path, distinct: int = 24, seed: int = 0) -> None:
        manifest = load_manifest(model_dir, verify=False)
        batch = samples(distinct, np.random.default_rng(seed), split="test")
        self._pool = [encode_sample("x", s, "npy", manifest) for s in batch]
        self.modalities = tuple(m for _, m, _, _ in self._pool[0])

    def event(self, event_id: str, index: int, keep: Iterable[str] | None = None) -> list[Record]:
        """The parts of one event; ``keep`` = only these modalities (an incomplete event)."""
        wanted = set(self.modalities if keep is None else keep)
        return [
            (event_id, m, v, c) for _, m, v, c in self._pool[index % len(self._pool)] if m in wanted
        ]

    def events(self, ids: Sequence[str]) -> list[list[Record]]:
        return [self.event(eid, i) for i, eid in enumerate(ids)]


def interleave(events: Sequence[list[Record]], window: int, seed: int) -> list[list[Record]]:
    """Per window of ``window`` events, their parts shuffled together (one list per window)."""
    rng = random.Random(seed)
    out = []
    for start in range(0, len(events), window):
        chunk = [r for ev in events[start : start + window] for r in ev]
        rng.shuffle(chunk)
        out.append(chunk)
    return out


def _headers(modality: str, ctype: str) -> list[tuple[str, bytes]]:
    headers = []
    if modality:
        headers.append(("mm-modality", modality.encode()))
    if ctype:
        headers.append(("content-type", ctype.encode()))
    return headers


def send_records(bootstrap: str, topic: str, records: Iterable[Record]) -> int:
    """Send, wait for every acknowledgement, close; return how many were sent."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    try:
        futures = [
            producer.send(topic, key=k.encode() if k else None, value=v, headers=_headers(m, c))
            for k, m, v, c in records
        ]
        producer.flush(60)
        for f in futures:
            f.get(timeout=30)
        return len(futures)
    finally:
        producer.close(timeout=5)


class StreamSender:
    """Sends events on a thread at ``rate`` events/s (parts shuffled within windows of 8).

    ``events_sent`` is how many events have been handed to the producer so far;
    :meth:`join` waits for the acknowledgements and re-raises a failure of the thread.
    """

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        events: Sequence[list[Record]],
        rate: float,
        seed: int = 0,
        window: int = 8,
    ) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.windows = interleave(events, window, seed)
        self.window = window
        self.total = len(events)
        self.rate = rate
        self.events_sent = 0
        self.error: BaseException | None = None
        self.finished = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stream-sender", daemon=True)

    def start(self) -> StreamSender:
        # Its producer must not outlive the broker: kafka-python 3.0.12 leaks a socket per
        # refused reconnect (a ResourceWarning, an error under filterwarnings=error).
        self._thread.start()
        return self

    def _run(self) -> None:
        producer = KafkaProducer(
            bootstrap_servers=self.bootstrap,
            acks="all",
            linger_ms=5,
            delivery_timeout_ms=180_000,
            request_timeout_ms=10_000,
            reconnect_backoff_max_ms=500,
        )
        try:
            futures = []
            start = time.monotonic()
            for chunk in self.windows:
                for k, m, v, c in chunk:
                    futures.append(
                        producer.send(self.topic, key=k.encode(), value=v, headers=_headers(m, c))
                    )
                self.events_sent = min(self.total, self.events_sent + self.window)
                delay = start + self.events_sent / self.rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            producer.flush(180)
            for f in futures:
                f.get(timeout=30)
        except BaseException as exc:  # surfaced by join()
            self.error = exc
        finally:
            producer.close(timeout=5)
            self.finished.set()

    def wait_sent(self, events: int, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while self.events_sent < events and time.monotonic() < deadline:
            if self.finished.is_set():
                break
            time.sleep(0.05)
        return self.events_sent >= events

    def join(self, timeout_s: float) -> None:
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise AssertionError(f"the test producer did not finish within {timeout_s} s")
        if self.error is not None:
            raise AssertionError(f"the test producer failed: {self.error!r}") from self.error


# ------------------------------------------------------------------------ reading outputs


class TopicReader:
    """Reads a whole topic from the beginning with its own (group-less) consumer."""

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        partitions: int = 1,
        isolation_level: str = "read_uncommitted",
    ) -> None:
        self.consumer = KafkaConsumer(
            bootstrap_servers=bootstrap,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level=isolation_level,
        )
        self.tps = [TopicPartition(topic, p) for p in range(partitions)]
        self.consumer.assign(self.tps)
        self.consumer.seek_to_beginning(*self.tps)
        self.records: list[Any] = []

    def close(self) -> None:
        self.consumer.close()

    def __enter__(self) -> TopicReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def poll(self, timeout_ms: int = 200) -> int:
        got = 0
        for recs in self.consumer.poll(timeout_ms=timeout_ms).values():
            self.records.extend(recs)
            got += len(recs)
        return got

    def read_until(self, done: Callable[[], bool], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while not done():
            if time.monotonic() >= deadline:
                return False
            self.poll(200)
        return True

    def read_to_end(self, timeout_s: float = 30) -> bool:
        """Read up to the end offsets as of now (the LSO for read_committed)."""
        ends = self.consumer.end_offsets(self.tps)
        return self.read_until(
            lambda: all(self.consumer.position(tp) >= ends[tp] for tp in self.tps), timeout_s
        )


class PredictionReader(TopicReader):
    """The output topic as a count of predictions per event id (from the JSON value)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._counts: Counter[str] = Counter()

    def poll(self, timeout_ms: int = 200) -> int:
        before = len(self.records)
        got = super().poll(timeout_ms)
        self._counts.update(json.loads(r.value)["event_id"] for r in self.records[before:])
        return got

    def counts(self) -> Counter[str]:
        return Counter(self._counts)

    def seen(self) -> set[str]:
        return set(self._counts)

    def wait_all(self, ids: Iterable[str], timeout_s: float) -> bool:
        want = set(ids)
        return self.read_until(lambda: want <= self.seen(), timeout_s)


def summarize(counts: Counter[str], ids: Sequence[str]) -> tuple[list[str], int, list[str]]:
    """(missing ids, duplicate predictions, unexpected ids)."""
    want = set(ids)
    missing = sorted(want - set(counts))
    duplicates = sum(n - 1 for n in counts.values() if n > 1)
    unexpected = sorted(set(counts) - want)
    return missing, duplicates, unexpected


# ------------------------------------------------------------------------ HTTP and metrics


def http_get(port: int, path: str, timeout_s: float = 2.0) -> tuple[int | None, str]:
    """(status, body) of GET http://127.0.0.1:port/path; (None, reason) when nothing answers."""
    url = f"http://127.0.0.1:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return resp.status, resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as err:
        with err:
            return err.code, err.read().decode("utf-8", "replace")
    except (urllib.error.URLError, OSError) as exc:
        return None, repr(exc)


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


class Metrics:
    """A parsed Prometheus text exposition."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: list[tuple[str, dict[str, str], float]] = []
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            m = _SAMPLE.match(line)
            if m is None:
                continue
            labels = dict(_LABEL.findall(m.group(2) or ""))
            with contextlib.suppress(ValueError):
                self.samples.append((m.group(1), labels, float(m.group(3))))

    def has(self, name: str) -> bool:
        return any(n == name for n, _, _ in self.samples)

    def value(self, name: str, **labels: str) -> float | None:
        """Sum of the samples of ``name`` whose labels include ``labels``; None if none."""
        found = [
            v
            for n, lab, v in self.samples
            if n == name and all(lab.get(k) == want for k, want in labels.items())
        ]
        return sum(found) if found else None

    def get(self, name: str, **labels: str) -> float:
        """Like :meth:`value`, but 0 when absent (a counter not yet incremented)."""
        v = self.value(name, **labels)
        return 0.0 if v is None else v


def scrape(port: int) -> Metrics | None:
    status, body = http_get(port, "/metrics")
    return Metrics(body) if status == 200 else None


def wait_http(port: int, path: str, want: int, timeout_s: float, proc: WorkerProcess) -> str:
    """Poll until ``path`` answers ``want``; fail clearly if the worker exits or it never does."""
    deadline = time.monotonic() + timeout_s
    last: tuple[int | None, str] = (None, "")
    while time.monotonic() < deadline:
        last = http_get(port, path)
        if last[0] == want:
            return last[1]
        if not proc.alive():
            break
        time.sleep(0.1)
    raise AssertionError(
        f"GET {path} on --http-port {port} never answered {want} within {timeout_s} s "
        f"(last: {last[0]} {last[1][:200]!r}; is the HTTP server implemented?)\n{proc.tail()}"
    )


class MetricsSampler:
    """Scrapes /metrics and the worker's RSS every ``interval_s`` on a thread."""

    def __init__(self, port: int, proc: WorkerProcess, interval_s: float = 0.1) -> None:
        self.port = port
        self.proc = proc
        self.interval_s = interval_s
        self.samples: list[tuple[float, Metrics]] = []
        self.peak_rss = 0
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="metrics-sampler", daemon=True)

    def __enter__(self) -> MetricsSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = self.proc.rss_bytes()
            if rss is not None:
                self.peak_rss = max(self.peak_rss, rss)
            m = scrape(self.port)
            if m is None:
                self.failures += 1
            else:
                self.samples.append((time.monotonic(), m))
            self._stop.wait(self.interval_s)

    def series(self, name: str, **labels: str) -> list[float]:
        return [v for _, m in self.samples if (v := m.value(name, **labels)) is not None]


# ------------------------------------------------------------------------ a dedicated broker


class LocalBroker:
    """A broker of its own (deploy/local/kafka.sh) on free ports, to stop and restart."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.port, self.controller_port = _free_ports(2)
        self.bootstrap = f"127.0.0.1:{self.port}"

    def _sh(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", str(KAFKA_SH), *args, "--data-dir", str(self.data_dir)],
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )

    def start(self) -> None:
        proc = self._sh(
            "start", "--port", str(self.port), "--controller-port", str(self.controller_port)
        )
        if proc.returncode != 0:
            raise AssertionError(
                f"kafka.sh start failed (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}"
            )
        wait_ready(self.bootstrap)

    def stop(self) -> None:
        proc = self._sh("stop")
        if proc.returncode != 0:
            raise AssertionError(f"kafka.sh stop failed:\n{proc.stdout}{proc.stderr}")
