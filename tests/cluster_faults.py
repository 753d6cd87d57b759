"""Failover harness: the real worker against the three-broker cluster while brokers die.

:func:`run_fault` starts ``python -m worker.cli worker`` (a subprocess, as in
resilience_tools) on fresh topics of a healthy :class:`~kafka_cluster.Cluster`, streams
``events`` npy events at ``rate`` events/s, applies one fault once part of the stream is
in, and reads the output with a ``read_committed`` consumer that runs for the whole run.
It returns a :class:`FaultResult`: the longest gap between consecutive predictions as
that live reader saw them arrive (the stall), whether the worker is still alive, and
events, lost and duplicates as a fresh ``read_committed`` reader finds the output once the
worker has exited (what any consumer of it gets; the live reader went through the fault
itself, and how many records it missed is reported beside). A lost event comes with a
diagnosis: its input parts, the group's committed offsets, and any output record for it
that a ``read_uncommitted`` reader finds (one written in an aborted transaction). Not
collected by pytest; the figures are for people (``python tests/cluster_faults.py --help``).

Faults (:data:`FAULTS`):

* ``leader-kill``: SIGKILL the broker leading most input partitions, restart it 8 s later;
* ``coordinator-kill``: SIGKILL the transaction coordinator of the worker's transactional
  id (at-least-once has none: the group coordinator instead), restart it 8 s later;
* ``rolling-restart``: restart nodes 1, 2, 3 in turn (SIGTERM, start), each once the
  previous one is back in every ISR;
* ``two-down``: SIGKILL the two brokers leading most input partitions (the survivor alone
  has no controller quorum: acks=all cannot succeed), restart both 20 s later.

Predictions are timed by the reader's clock when it first sees them (so an exactly-once
commit that is late shows as a gap even if the records were written earlier); topics use
``LogAppendTime``, so the input's own longest gap (the test producer stalls too while
leaders move) is reported beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import re
import signal
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kafka import KafkaConsumer, TopicPartition

from kafka_cluster import NODE_IDS, Cluster
from resilience_tools import ASSIGNED_RE, EventFactory, StreamSender, WorkerProcess, worker_argv

FAULTS = ("leader-kill", "coordinator-kill", "rolling-restart", "two-down")
GUARANTEES = ("at-least-once", "exactly-once")
LOG_APPEND_TIME = {"message.timestamp.type": "LogAppendTime"}
#: While waiting for the live reader, how often (s) a fresh reader checks the topic.
TOPIC_CHECK_S = 15.0
#: Worker log lines worth showing: warnings, errors, and the rebalances around a fault.
_NOTABLE = re.compile(r"WARNING|ERROR|CRITICAL|Traceback|partitions (revoked|assigned|lost)")


@dataclass
class FaultResult:
    fault: str
    guarantee: str
    events: int
    predicted: int = 0
    lost: int = 0
    duplicates: int = 0
    dead_letters: int = 0
    #: Longest gap (s) between consecutive predictions as the reader saw them arrive.
    stall_s: float = 0.0
    #: When (s after the stream started) that gap began and ended.
    stall_from_s: float = 0.0
    stall_to_s: float = 0.0
    #: True when the last prediction came before the end of the run and events were left.
    stalled_to_end: bool = False
    #: Longest gap (s) between consecutive input records' append times (the producer's own).
    input_gap_s: float = 0.0
    #: Seconds from the stream's start to the last prediction seen.
    last_prediction_s: float = 0.0
    worker_alive: bool = False
    worker_exit: int | None = None
    #: Exit code after SIGTERM at the end (None: still running after the grace, SIGKILLed).
    worker_exit_after_sigterm: int | None = None
    #: Events in the output topic (read afresh at the end) that the live reader never saw.
    live_reader_missed: int = 0
    #: For lost events: where their parts are, whether an output was written (and
    #: aborted), and the group's committed offsets (see :func:`_diagnose`).
    diagnosis: list[str] = field(default_factory=list)
    timeline: list[str] = field(default_factory=list)
    notable_log: list[str] = field(default_factory=list)
    log_path: str = ""

    def row(self) -> str:
        alive = "yes" if self.worker_alive else f"no (exit {self.worker_exit})"
        stall = f"{self.stall_s:.1f}" + (" (to end)" if self.stalled_to_end else "")
        return (
            f"| {self.fault} | {self.guarantee} | {self.events} | {self.lost} | "
            f"{self.duplicates} | {stall} | {self.input_gap_s:.1f} | {alive} | "
            f"{self.worker_exit_after_sigterm} |"
        )


TABLE_HEAD = (
    "| fault | guarantee | events | lost | duplicates | stall s | input gap s | "
    "worker alive | exit after SIGTERM |\n|---|---|---|---|---|---|---|---|---|"
)


class LiveReader:
    """Reads a topic (read_committed) on a thread from the start; keeps (arrival, record)."""

    def __init__(self, bootstrap: str, topic: str, partitions: int, isolation: str) -> None:
        self.consumer = KafkaConsumer(
            bootstrap_servers=bootstrap.split(","),
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level=isolation,
            reconnect_backoff_max_ms=500,
        )
        self.tps = [TopicPartition(topic, p) for p in range(partitions)]
        self.consumer.assign(self.tps)
        self.consumer.seek_to_beginning(*self.tps)
        self.arrivals: list[tuple[float, Any]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="live-reader", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                batch = self.consumer.poll(timeout_ms=200)
            except Exception as exc:  # a broker away: keep polling
                print(f"reader: {exc!r}", file=sys.stderr)
                time.sleep(0.5)
                continue
            now = time.monotonic()
            with self._lock:
                for recs in batch.values():
                    self.arrivals.extend((now, r) for r in recs)

    def snapshot(self) -> list[tuple[float, Any]]:
        with self._lock:
            return list(self.arrivals)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.consumer.close()


def _read_all(
    bootstrap: str, topic: str, partitions: int, isolation: str = "read_uncommitted"
) -> list[Any]:
    """Every record of ``topic`` up to its end offsets now; with ``read_committed``, up to
    the last stable offset and the records of committed transactions only."""
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap.split(","),
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level=isolation,
    )
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        ends = consumer.end_offsets(tps)
        out: list[Any] = []
        deadline = time.monotonic() + 60
        while any(consumer.position(tp) < ends[tp] for tp in tps):
            if time.monotonic() > deadline:
                break
            for recs in consumer.poll(timeout_ms=300).values():
                out.extend(recs)
        return out
    finally:
        consumer.close()


def _event_id(record: Any) -> str:
    return str(json.loads(record.value)["event_id"])


def _event_ids(records: Iterable[Any]) -> set[str]:
    return {_event_id(r) for r in records}


def _diagnose(
    bootstrap: str, lost: list[str], inputs: list[Any], t_out: str, group: str
) -> list[str]:
    """Lines that tell where a lost event went: its input parts (partition, offset), the
    group's committed offset of that partition, and every output record for it with a
    read_uncommitted reader (written inside a transaction that was then aborted?)."""
    uncommitted = _read_all(bootstrap, t_out, 1)
    topic = inputs[0].topic if inputs else ""
    # A consumer of the group that joins nothing: it only reads the committed offsets.
    reader = KafkaConsumer(
        bootstrap_servers=bootstrap.split(","), group_id=group, enable_auto_commit=False
    )
    try:
        found = {
            p: reader.committed(TopicPartition(topic, p), metadata=True)
            for p in {r.partition for r in inputs}
        }
        # The offset and its metadata (the offsets finished beyond it, worker.core.offsets).
        committed = {p: om and (om.offset, om.metadata) for p, om in found.items()}
    finally:
        reader.close(autocommit=False)
    lines = []
    for event_id in lost[:10]:
        parts = [(r.partition, r.offset) for r in inputs if r.key and r.key.decode() == event_id]
        outs = [r.offset for r in uncommitted if _event_id(r) == event_id]
        marks = {p: committed.get(p) for p, _ in parts}
        lines.append(
            f"{event_id}: input parts at {parts}, committed offsets {marks}; "
            f"output records (read_uncommitted) at {outs or 'none'}"
        )
    return lines


def _longest_gap(times: list[float]) -> tuple[float, float, float]:
    """(gap, from, to) of the longest gap between consecutive sorted ``times``."""
    ts = sorted(times)
    best = (0.0, ts[0] if ts else 0.0, ts[0] if ts else 0.0)
    for a, b in itertools.pairwise(ts):
        if b - a > best[0]:
            best = (b - a, a, b)
    return best


def _input_leaders(cluster: Cluster, topic: str) -> Counter[int]:
    return Counter(p["leader"] for p in cluster.partitions(topic).values() if p["leader"] >= 0)


def run_fault(
    cluster: Cluster,
    model_dir: Path,
    work_dir: Path,
    fault: str,
    guarantee: str,
    *,
    events: int = 600,
    rate: float = 40.0,
    partitions: int = 6,
    fault_after_events: int | None = None,
    drain_timeout_s: float = 150.0,
    restart_after_s: float = 8.0,
    two_down_s: float = 20.0,
    worker_args: tuple[str, ...] = (),
    note: Callable[[str], None] = print,
) -> FaultResult:
    """Run the worker through one fault; see the module docstring."""
    if fault not in FAULTS:
        raise ValueError(f"fault must be one of {FAULTS}, got {fault!r}")
    if guarantee not in GUARANTEES:
        raise ValueError(f"guarantee must be one of {GUARANTEES}, got {guarantee!r}")
    work_dir.mkdir(parents=True, exist_ok=True)
    result = FaultResult(fault=fault, guarantee=guarantee, events=events)
    t0 = time.monotonic()

    def mark(what: str) -> None:
        line = f"{time.monotonic() - t0:7.1f} s  {what}"
        result.timeline.append(line)
        note(f"[{fault}/{guarantee}] {line}")

    # A healthy cluster to start from (an earlier fault may have left a node down).
    if cluster.up != set(NODE_IDS):
        cluster.start()
    cluster.wait_fully_replicated([], timeout_s=120)

    t_in = cluster.create_topic(partitions, "mm-fault-in-", LOG_APPEND_TIME)
    t_out = cluster.create_topic(1, "mm-fault-out-", LOG_APPEND_TIME)
    t_dlq = cluster.create_topic(1, "mm-fault-dlq-", LOG_APPEND_TIME)
    group = f"mm-fault-{uuid.uuid4().hex[:12]}"
    tid = f"{group}-tx"
    argv = worker_argv(
        cluster.bootstrap,
        (t_in, t_out, t_dlq),
        group,
        model_dir,
        "--guarantee",
        guarantee,
        "--transactional-id",
        tid,
        # Parts held up by a fault must still meet their event (the default is 30 s).
        "--assembly-timeout-ms",
        "180000",
        *worker_args,
    )
    name = f"worker-{fault}-{guarantee}"
    worker = WorkerProcess(name, argv, work_dir)
    result.log_path = str(worker.log_path)
    reader: LiveReader | None = None
    sender: StreamSender | None = None
    try:
        if not worker.wait_for_log(ASSIGNED_RE, 90):
            raise RuntimeError(f"the worker got no partitions in 90 s\n{worker.tail()}")
        mark("worker has its partitions")
        # read_committed for both: at-least-once output is not transactional, all visible.
        reader = LiveReader(cluster.bootstrap, t_out, 1, "read_committed")
        ids = [f"ev-{i:06d}" for i in range(events)]
        factory = EventFactory(model_dir)
        sender = StreamSender(cluster.bootstrap, t_in, factory.events(ids), rate=rate).start()
        t_stream = time.monotonic()
        mark(f"stream started: {events} events at {rate:g}/s into {partitions} partitions")
        threshold = events // 3 if fault_after_events is None else fault_after_events
        sender.wait_sent(threshold, timeout_s=120)
        mark(f"{sender.events_sent} events sent; fault {fault} begins")
        _apply(cluster, fault, t_in, tid, group, guarantee, restart_after_s, two_down_s, mark)
        mark("fault over: all three nodes up")

        sender.join(300)
        mark("test producer done (every event acknowledged)")
        want = set(ids)
        deadline = time.monotonic() + drain_timeout_s
        next_check = time.monotonic() + TOPIC_CHECK_S
        while time.monotonic() < deadline:
            if want <= _event_ids(r for _, r in reader.snapshot()) or not worker.alive():
                break
            if time.monotonic() >= next_check:
                # The live reader went through the fault too: if it missed a record the
                # topic has, a fresh read_committed reader says so without the full wait.
                if want <= _event_ids(_read_all(cluster.bootstrap, t_out, 1, "read_committed")):
                    mark("a fresh reader has every event; the live reader does not")
                    break
                next_check = time.monotonic() + TOPIC_CHECK_S
            time.sleep(0.5)
        time.sleep(2.0)  # late duplicates
        mark("reading done")
        read_done = time.monotonic()
        result.worker_alive = worker.alive()
        result.worker_exit = worker.proc.returncode

        inputs = _read_all(cluster.bootstrap, t_in, partitions)
        result.input_gap_s = _longest_gap([r.timestamp / 1000 for r in inputs])[0]
        result.dead_letters = len(_read_all(cluster.bootstrap, t_dlq, 1))

        if worker.alive():
            worker.signal(signal.SIGTERM)
            result.worker_exit_after_sigterm = worker.wait(45)
            mark(f"SIGTERM -> exit {result.worker_exit_after_sigterm}")

        arrivals = reader.snapshot()
        live = _event_ids(r for _, r in arrivals)
        # What a consumer of the output reads once the worker is gone (its last
        # transaction committed or aborted): the figures that count.
        final = _read_all(cluster.bootstrap, t_out, 1, "read_committed")
        counts = Counter(_event_id(r) for r in final)
        result.predicted = len(set(counts) & want)
        result.lost = len(want - set(counts))
        result.duplicates = sum(n - 1 for n in counts.values() if n > 1)
        result.live_reader_missed = len(set(counts) - live)
        firsts: dict[str, float] = {}
        for at, r in arrivals:
            firsts.setdefault(_event_id(r), at)
        times = sorted(firsts.values())
        if result.lost and times:
            times_with_end = [*times, read_done]
            result.stalled_to_end = read_done - times[-1] >= _longest_gap(times)[0]
        else:
            times_with_end = times
        gap, a, b = _longest_gap(times_with_end)
        result.stall_s, result.stall_from_s, result.stall_to_s = gap, a - t_stream, b - t_stream
        result.last_prediction_s = (times[-1] - t_stream) if times else 0.0
        if result.lost:
            result.diagnosis = _diagnose(
                cluster.bootstrap, sorted(want - set(counts)), inputs, t_out, group
            )
    finally:
        if sender is not None:
            with contextlib.suppress(AssertionError):
                sender.join(5)
        worker.kill()
        if reader is not None:
            reader.close()
    result.notable_log = notable_lines(worker.log())
    return result


def _apply(
    cluster: Cluster,
    fault: str,
    t_in: str,
    tid: str,
    group: str,
    guarantee: str,
    restart_after_s: float,
    two_down_s: float,
    mark: Callable[[str], None],
) -> None:
    if fault == "leader-kill":
        leaders = _input_leaders(cluster, t_in)
        node = leaders.most_common(1)[0][0]
        cluster.kill(node, "KILL")
        mark(f"SIGKILL node {node} (led {leaders[node]} of {sum(leaders.values())} partitions)")
        time.sleep(restart_after_s)
        cluster.restart(node)
        mark(f"node {node} restarted")
    elif fault == "coordinator-kill":
        if guarantee == "exactly-once":
            node, what = cluster.coordinator_of_transactional_id(tid), f"txn coordinator of {tid}"
        else:
            node, what = cluster.coordinator_of_group(group), f"group coordinator of {group}"
        leaders = _input_leaders(cluster, t_in)
        cluster.kill(node, "KILL")
        mark(f"SIGKILL node {node}: {what} (it led {leaders[node]} input partitions)")
        time.sleep(restart_after_s)
        cluster.restart(node)
        mark(f"node {node} restarted")
    elif fault == "rolling-restart":
        for node in NODE_IDS:
            cluster.restart(node)
            mark(f"node {node} restarted (SIGTERM + start)")
            cluster.wait_fully_replicated([t_in], timeout_s=120)
            mark("every partition back to ISR 3")
    elif fault == "two-down":
        leaders = _input_leaders(cluster, t_in)
        order = sorted(NODE_IDS, key=lambda n: -leaders[n])
        victims = order[:2]
        for node in victims:
            cluster.kill(node, "KILL")
        mark(f"SIGKILL nodes {victims} (leaders: {dict(leaders)}); node {order[2]} left alone")
        time.sleep(two_down_s)
        cluster.start()
        mark(f"nodes {victims} restarted")


def notable_lines(log: str, limit: int = 40) -> list[str]:
    """Warnings/errors/rebalances of a worker log, repeated messages folded with a count."""
    seen: Counter[str] = Counter()
    order: list[str] = []
    for line in log.splitlines():
        if not _NOTABLE.search(line):
            continue
        key = re.sub(r"\d+", "N", line.split(" ", 2)[-1])[:200]
        if key not in seen:
            order.append(line[:400])
        seen[key] += 1
    out = []
    for line in order[:limit]:
        key = re.sub(r"\d+", "N", line.split(" ", 2)[-1])[:200]
        out.append(f"{line}  [x{seen[key]}]" if seen[key] > 1 else line)
    if len(order) > limit:
        out.append(f"... {len(order) - limit} more distinct lines")
    return out


def tiny_model(work: Path) -> Path:
    """The tests' tiny model under ``work`` (built with TensorFlow the first time)."""
    model = work / "tiny-model" / "model"
    if not (model / "manifest.json").exists():
        from model_fixture import build_tiny_model_dir

        model = build_tiny_model_dir(work / "tiny-model")
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", type=Path, default=Path(".cache/cluster-faults"))
    parser.add_argument("--model", type=Path, help="model dir (default: build the tiny one)")
    parser.add_argument("--faults", default=",".join(FAULTS))
    parser.add_argument("--guarantees", default=",".join(GUARANTEES))
    parser.add_argument("--events", type=int, default=600)
    parser.add_argument("--rate", type=float, default=40.0)
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument("--drain-timeout-s", type=float, default=150.0)
    parser.add_argument("--json", type=Path, help="append each result as a JSON line here")
    parser.add_argument("--kafka-client", default="kafka-python", help="the worker's client")
    args = parser.parse_args(argv)

    work = args.work_dir.resolve()
    model = args.model or tiny_model(work)
    cluster = Cluster(work / "cluster")
    results = []
    try:
        cluster.start()
        for fault in args.faults.split(","):
            for guarantee in args.guarantees.split(","):
                res = run_fault(
                    cluster,
                    model,
                    work / "logs",
                    fault,
                    guarantee,
                    events=args.events,
                    rate=args.rate,
                    partitions=args.partitions,
                    drain_timeout_s=args.drain_timeout_s,
                    worker_args=("--kafka-client", args.kafka_client),
                )
                results.append(res)
                print(TABLE_HEAD)
                print(res.row())
                print("\n".join(res.notable_log))
                if args.json:
                    with args.json.open("a") as f:
                        f.write(json.dumps(asdict(res)) + "\n")
    finally:
        cluster.stop()
    print(TABLE_HEAD)
    for res in results:
        print(res.row())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
