"""``make soak``: the worker for a long while on the three-broker cluster, a fault a minute.

Not part of ``make test``. For each guarantee in turn:

1. start the cluster (deploy/local/kafka-cluster.sh) and a group of ``--workers`` worker
   processes, kept running by a supervisor as Kubernetes would (a worker that exits is
   started again after 2 s);
2. measure: a backlog of ``--calibrate-events`` events, drained by the group; the soak
   then streams at half that rate, with one record in 200 a poison record (no key);
3. every ``--fault-every-s`` seconds, in turn: SIGKILL a worker, SIGKILL the broker that
   leads most input partitions (restarted 8 s later), a rebalance (a worker stopped with
   SIGTERM and started again);
4. at the end, read everything back with a read_committed consumer and report: events,
   predicted, lost, duplicates, dead letters by reason, the longest stall between
   predictions, worker restarts, and each worker's RSS at start and end.

The report (Markdown) goes to stdout and to ``--report``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import signal
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from cluster_faults import LOG_APPEND_TIME, _input_leaders, _longest_gap, tiny_model
from kafka_cluster import NODE_IDS, Cluster
from resilience_tools import ASSIGNED_RE, EventFactory, WorkerProcess, worker_argv

FAULTS = ("worker SIGKILL", "broker SIGKILL", "rebalance")


@dataclass
class Slot:
    """One supervised worker: its current process, how often it was started, its RSS."""

    name: str
    argv: list[str]
    log_dir: Path
    proc: WorkerProcess | None = None
    starts: int = 0
    rss_start: int | None = None
    rss_end: int | None = None
    exits: list[int] = field(default_factory=list)

    def start(self) -> None:
        self.starts += 1
        self.proc = WorkerProcess(f"{self.name}-{self.starts}", self.argv, self.log_dir)


class Supervisor:
    """Starts every slot's worker again 2 s after it exits (what Kubernetes does)."""

    def __init__(self, slots: Sequence[Slot]) -> None:
        self.slots = list(slots)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="supervisor", daemon=True)

    def start(self) -> Supervisor:
        for s in self.slots:
            s.start()
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            for s in self.slots:
                if s.proc is not None and not s.proc.alive():
                    s.exits.append(s.proc.proc.returncode)
                    time.sleep(2.0)
                    s.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        for s in self.slots:
            if s.proc is not None:
                s.rss_end = s.proc.rss_bytes()
                s.proc.signal(signal.SIGTERM)
        for s in self.slots:
            if s.proc is not None and s.proc.wait(60) is None:
                s.proc.kill()


class Reader:
    """read_committed, from the start, on a thread: first arrival time per event id."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.consumer = KafkaConsumer(
            bootstrap_servers=bootstrap.split(","),
            group_id=None,
            enable_auto_commit=False,
            isolation_level="read_committed",
            reconnect_backoff_max_ms=500,
        )
        tp = TopicPartition(topic, 0)
        self.consumer.assign([tp])
        self.consumer.seek_to_beginning(tp)
        self.counts: Counter[str] = Counter()
        self.arrivals: list[float] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="reader", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                batch = self.consumer.poll(timeout_ms=200)
            except Exception as exc:  # a broker away: keep reading
                print(f"reader: {exc!r}", file=sys.stderr)
                time.sleep(0.5)
                continue
            now = time.monotonic()
            with self._lock:
                for recs in batch.values():
                    for r in recs:
                        eid = json.loads(r.value)["event_id"]
                        if not self.counts[eid]:
                            self.arrivals.append(now)
                        self.counts[eid] += 1

    def seen(self) -> set[str]:
        with self._lock:
            return set(self.counts)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.consumer.close()


def stream(
    bootstrap: str, topic: str, factory: EventFactory, prefix: str, n: int, rate: float
) -> tuple[list[str], int]:
    """Send ``n`` events (and a poison record per 200 records) at ``rate`` events/s; return
    their ids and the number of poison records. Blocks until every record is acknowledged."""
    producer = KafkaProducer(
        bootstrap_servers=bootstrap.split(","),
        acks="all",
        linger_ms=5,
        delivery_timeout_ms=300_000,
        reconnect_backoff_max_ms=500,
    )
    failures: list[BaseException] = []
    ids, poison, records = [], 0, 0
    start = time.monotonic()
    try:
        for i in range(n):
            eid = f"{prefix}-{i:07d}"
            ids.append(eid)
            for _k, m, v, c in factory.event(eid, i):
                headers = [("mm-modality", m.encode()), ("content-type", c.encode())]
                f = producer.send(topic, key=eid.encode(), value=v, headers=headers)
                f.add_errback(failures.append)
                records += 1
                if records % 200 == 0:
                    producer.send(topic, key=None, value=b"?", headers=headers)
                    poison += 1
            delay = start + (i + 1) / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        producer.flush(300)
    finally:
        producer.close(timeout=10)
    if failures:
        raise RuntimeError(f"{len(failures)} sends failed, first: {failures[0]!r}")
    return ids, poison


def count_dead_letters(bootstrap: str, topic: str) -> Counter[str]:
    consumer = KafkaConsumer(  # read_committed: dead letters of aborted transactions never count
        bootstrap_servers=bootstrap.split(","),
        group_id=None,
        enable_auto_commit=False,
        isolation_level="read_committed",
    )
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        end = consumer.end_offsets([tp])[tp]
        reasons: Counter[str] = Counter()
        deadline = time.monotonic() + 120
        while consumer.position(tp) < end and time.monotonic() < deadline:
            for recs in consumer.poll(timeout_ms=500).values():
                for r in recs:
                    reasons[dict(r.headers).get("mm-error", b"?").decode()] += 1
        return reasons
    finally:
        consumer.close()


def soak(
    cluster: Cluster, model: Path, work: Path, guarantee: str, args: argparse.Namespace
) -> dict[str, Any]:
    t_in = cluster.create_topic(args.partitions, "mm-soak-in-", LOG_APPEND_TIME)
    t_out = cluster.create_topic(1, "mm-soak-out-", LOG_APPEND_TIME)
    t_dlq = cluster.create_topic(1, "mm-soak-dlq-", LOG_APPEND_TIME)
    group = f"mm-soak-{uuid.uuid4().hex[:8]}"
    factory = EventFactory(model)

    def argv(i: int) -> list[str]:
        return worker_argv(
            cluster.bootstrap, (t_in, t_out, t_dlq), group, model,
            "--guarantee", guarantee,
            "--client-id", f"soak-{i}", "--transactional-id", f"{group}-tx-{i}",
            "--session-timeout-ms", "10000",
        )  # fmt: skip

    slots = [Slot(f"{guarantee}-w{i}", argv(i), work) for i in range(args.workers)]
    supervisor = Supervisor(slots).start()
    for s in slots:
        assert s.proc is not None and s.proc.wait_for_log(ASSIGNED_RE, 120), s.proc.tail()
    reader = Reader(cluster.bootstrap, t_out)
    try:
        # Calibration: a backlog drained by the group.
        t0 = time.monotonic()
        calib, _ = stream(cluster.bootstrap, t_in, factory, "calib", args.calibrate_events, 1e9)
        while not set(calib) <= reader.seen():
            if time.monotonic() - t0 > 600:
                raise RuntimeError("calibration backlog not drained in 10 minutes")
            time.sleep(0.2)
        measured = len(calib) / (time.monotonic() - t0)
        rate = measured / 2
        print(f"[{guarantee}] measured {measured:.0f} events/s; soaking at {rate:.0f}/s")
        time.sleep(2)
        for s in slots:
            s.rss_start = s.proc.rss_bytes() if s.proc else None

        n = int(rate * args.minutes * 60)
        faults: list[str] = []
        done = threading.Event()

        def inject() -> None:
            rng = random.Random(0)
            for k in itertools.count():
                if done.wait(args.fault_every_s):
                    return
                kind = FAULTS[k % len(FAULTS)]
                faults.append(f"{time.monotonic() - t_stream:6.0f} s {kind}")
                print(f"[{guarantee}] fault: {faults[-1]}")
                if kind == "worker SIGKILL":
                    proc = rng.choice(slots).proc
                    if proc is not None:
                        proc.signal(signal.SIGKILL)
                elif kind == "broker SIGKILL":
                    try:
                        node = _input_leaders(cluster, t_in).most_common(1)[0][0]
                        cluster.kill(node, "KILL")
                        time.sleep(8)
                        cluster.restart(node)
                    except Exception as exc:  # reported; the next fault still comes
                        print(f"[{guarantee}] broker fault failed: {exc!r}", file=sys.stderr)
                else:
                    proc = rng.choice(slots).proc
                    if proc is not None:
                        proc.signal(signal.SIGTERM)

        t_stream = time.monotonic()
        injector = threading.Thread(target=inject, name="faults", daemon=True)
        injector.start()
        ids, poison = stream(cluster.bootstrap, t_in, factory, "soak", n, rate)
        done.set()
        injector.join(60)
        if cluster.up != set(NODE_IDS):
            cluster.start()
        deadline = time.monotonic() + 300
        while not set(ids) <= reader.seen() and time.monotonic() < deadline:
            time.sleep(1)
        time.sleep(5)  # late duplicates
    finally:
        supervisor.stop()
        reader.close()
    with reader._lock:
        got = {e: c for e, c in reader.counts.items() if e.startswith("soak-")}
    stall, _, _ = _longest_gap(reader.arrivals[len(calib) :])
    return {
        "guarantee": guarantee,
        "minutes": args.minutes,
        "measured_events_per_s": round(measured),
        "rate_events_per_s": round(rate),
        "events": len(ids),
        "predicted": len(set(ids) & set(got)),
        "lost": len(set(ids) - set(got)),
        "duplicates": sum(c - 1 for c in got.values() if c > 1),
        "poison_sent": poison,
        "dead_letters": dict(count_dead_letters(cluster.bootstrap, t_dlq)),
        "longest_stall_s": round(stall, 1),
        "faults": len(faults),
        "worker_restarts": sum(s.starts - 1 for s in slots),
        "worker_exit_codes": sorted({c for s in slots for c in s.exits}),
        "rss_mib": {
            s.name: [round((s.rss_start or 0) / 2**20), round((s.rss_end or 0) / 2**20)]
            for s in slots
        },
    }


def report(results: list[dict[str, Any]]) -> str:
    lines = [
        "| guarantee | minutes | events/s | events | lost | duplicates | dead letters | "
        "longest stall s | faults | worker restarts | RSS MiB start -> end |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        rss = "; ".join(f"{a} -> {b}" for a, b in r["rss_mib"].values())
        dl = ", ".join(f"{k} {v}" for k, v in sorted(r["dead_letters"].items())) or "0"
        lines.append(
            f"| {r['guarantee']} | {r['minutes']:g} | {r['rate_events_per_s']} (half of "
            f"{r['measured_events_per_s']}) | {r['events']} | {r['lost']} | {r['duplicates']} "
            f"| {dl} (poison sent {r['poison_sent']}) | {r['longest_stall_s']} | {r['faults']} "
            f"| {r['worker_restarts']} (exit codes {r['worker_exit_codes']}) | {rss} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", type=Path, default=Path(".cache/soak"))
    parser.add_argument("--model", type=Path, help="model dir (default: build the tiny one)")
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--guarantees", default="at-least-once,exactly-once")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument("--fault-every-s", type=float, default=60.0)
    parser.add_argument("--calibrate-events", type=int, default=6000)
    parser.add_argument("--report", type=Path, default=Path(".cache/soak/report.md"))
    args = parser.parse_args(argv)
    work = args.work_dir.resolve()
    model = args.model or tiny_model(work)
    cluster = Cluster(work / "cluster")
    (work / "logs").mkdir(parents=True, exist_ok=True)
    results = []
    try:
        cluster.start()
        for guarantee in args.guarantees.split(","):
            if cluster.up != set(NODE_IDS):
                cluster.start()
            results.append(soak(cluster, model, work / "logs", guarantee, args))
            print(json.dumps(results[-1]))
    finally:
        cluster.stop()
    text = report(results)
    print(text)
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(text + "\n")
    return 0 if all(r["lost"] == 0 for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
