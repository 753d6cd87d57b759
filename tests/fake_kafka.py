"""An in-memory Kafka behind the :mod:`worker.edge.client` interfaces, for unit tests of
the loop and its parts (integration tests use a real broker).

``FakeBroker`` holds topic logs and the groups' committed offsets. Its consumer
assigns every partition of a subscribed topic at once and returns records in
offset order; its producer acknowledges on send (or fails, when told to) and,
transactional, makes records and offsets visible only on commit.
``FakeClock`` is the worker's injected clock (ms); the consumer advances it by
the poll timeout when it has nothing to return, as a real poll would wait.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from worker.config import WorkerConfig
from worker.contract.errors import BrokerError
from worker.contract.records import OutRecord, RawRecord, SourceRef
from worker.edge.client import TP, Positions
from worker.tools.produce import npy_bytes


@dataclass
class FakeClock:
    """The worker's clock in ms; ``tick`` ms pass on every read."""

    now_ms: int = 1_000_000
    tick: int = 0

    def __call__(self) -> int:
        self.now_ms += self.tick
        return self.now_ms


@dataclass
class FakeBroker:
    logs: dict[str, list[list[RawRecord]]] = field(default_factory=dict)
    committed: dict[str, dict[TP, tuple[int, str]]] = field(default_factory=dict)
    clock: FakeClock = field(default_factory=FakeClock)
    #: set to an exception to make the next delivery fail (at-least-once) or commit fail
    fail_next_send: BaseException | None = None
    fail_next_commit: BrokerError | None = None
    transactions: list[str] = field(default_factory=list)  # "committed" / "aborted"
    #: True: deliveries wait in ``held`` until :meth:`release` (a frozen output broker)
    hold_acks: bool = False
    held: list[tuple[OutRecord, Callable[[], None]]] = field(default_factory=list)
    #: how many more init_transactions calls fail (retriably)
    failing_inits: int = 0

    def release(self) -> None:
        """The broker thaws: write and acknowledge what it held, hold nothing more."""
        self.hold_acks = False
        held, self.held = self.held, []
        for record, on_ack in held:
            self.create(record.topic, 1)
            self.append(record.topic, 0, record.key, record.value, record.headers)
            on_ack()

    def create(self, topic: str, partitions: int) -> None:
        self.logs.setdefault(topic, [[] for _ in range(partitions)])

    def append(
        self,
        topic: str,
        partition: int,
        key: bytes | None,
        value: bytes | None,
        headers: Iterable[tuple[str, bytes]] = (),
        ts: int | None = None,
    ) -> RawRecord:
        log = self.logs[topic][partition]
        src = SourceRef(topic, partition, len(log), self.clock.now_ms if ts is None else ts)
        rec = RawRecord(src, key, value, tuple(headers))
        log.append(rec)
        return rec

    def records(self, topic: str) -> list[RawRecord]:
        return [r for part in self.logs.get(topic, []) for r in part]


class FakeConsumer:
    def __init__(self, broker: FakeBroker, group: str) -> None:
        self.broker = broker
        self.group = group
        self.positions: dict[TP, int] = {}
        self._paused: set[TP] = set()
        self._owned: set[TP] = set()
        self._revoked: list[frozenset[TP]] = []
        self._joined = False
        self.closed = False
        self.out_of_group = False  # test control: the member was lost and does not rejoin

    # test controls
    def revoke(self, tps: set[TP]) -> None:
        self._revoked.append(frozenset(tps))
        self._owned -= tps
        for tp in tps:
            self.positions.pop(tp, None)

    # the interface
    def subscribe(self, topic: str) -> None:
        self.assign((topic, p) for p in range(len(self.broker.logs[topic])))
        self._owned = set(self.positions)

    def assign(self, tps: Iterable[TP]) -> None:
        for tp in tps:
            pos, _meta = self.committed(tp)
            self.positions[tp] = pos or 0
        self._joined = True

    def poll(self, timeout_ms: int, max_records: int) -> list[RawRecord]:
        out: list[RawRecord] = []
        for tp in sorted(self.positions):
            if tp in self._paused:
                continue
            log = self.broker.logs[tp[0]][tp[1]]
            while self.positions[tp] < len(log) and len(out) < max_records:
                out.append(log[self.positions[tp]])
                self.positions[tp] += 1
        if not out:
            self.broker.clock.now_ms += timeout_ms
        return out

    def revocations(self) -> list[frozenset[TP]]:
        out, self._revoked = self._revoked, []
        return out

    def revocation_pending(self) -> bool:
        return bool(self._revoked)

    def joined(self) -> bool:
        return self._joined

    def in_group(self) -> bool:
        return self._joined and not self.out_of_group

    def owned(self) -> set[TP]:
        return set(self._owned) if self._owned else set(self.positions)

    def assignment(self) -> set[TP]:
        return set(self.positions)

    def pause(self, tps: Iterable[TP]) -> None:
        self._paused |= set(tps)

    def resume(self, tps: Iterable[TP]) -> None:
        self._paused -= set(tps)

    def paused(self) -> set[TP]:
        return set(self._paused)

    def caught_up(self, tp: TP) -> bool:
        return tp in self.positions and self.positions[tp] >= len(self.broker.logs[tp[0]][tp[1]])

    def seek(self, tp: TP, offset: int) -> None:
        self.positions[tp] = offset

    def seek_to_beginning(self, tp: TP) -> None:
        self.positions[tp] = 0

    def seek_to_end(self, tp: TP) -> None:
        self.positions[tp] = len(self.broker.logs[tp[0]][tp[1]])

    def position(self, tp: TP) -> int:
        return self.positions[tp]

    def committed(self, tp: TP) -> tuple[int | None, str]:
        found = self.broker.committed.get(self.group, {}).get(tp)
        return (None, "") if found is None else found

    def commit(self, positions: Positions) -> None:
        if self.broker.fail_next_commit is not None:
            exc, self.broker.fail_next_commit = self.broker.fail_next_commit, None
            raise exc
        self.broker.committed.setdefault(self.group, {}).update(positions)

    def group_metadata(self) -> object:
        return self.group

    def partitions_for(self, topic: str) -> set[int]:
        return set(range(len(self.broker.logs.get(topic, []))))

    def close(self) -> None:
        self.closed = True


class FakeProducer:
    def __init__(self, broker: FakeBroker, transactional: bool) -> None:
        self.broker = broker
        self.transactional = transactional
        # A transaction's records and their acks: written and acknowledged by the commit,
        # as a real producer's commit flushes them (acks arrive before it returns).
        self._txn: list[tuple[OutRecord, Callable[[], None]]] | None = None
        self._offsets: tuple[str, Positions] | None = None
        self.sent = 0
        #: test control: a producer that lost its coordinator (commit and abort time out)
        self.wedged = False
        self.closed = False

    def _write(self, record: OutRecord) -> None:
        self.broker.create(record.topic, 1)
        self.broker.append(record.topic, 0, record.key, record.value, record.headers)

    def send(
        self,
        record: OutRecord,
        on_ack: Callable[[], None],
        on_error: Callable[[BaseException], None],
    ) -> None:
        self.sent += 1
        if self.broker.fail_next_send is not None:
            exc, self.broker.fail_next_send = self.broker.fail_next_send, None
            on_error(exc)
            return
        if self.transactional:
            if self._txn is None:
                raise BrokerError("send outside a transaction")
            self._txn.append((record, on_ack))
            return
        if self.broker.hold_acks:
            self.broker.held.append((record, on_ack))
            return
        self._write(record)
        on_ack()

    def flush(self, timeout_s: float) -> None:
        pass

    def init_transactions(self) -> None:
        if self.broker.failing_inits > 0:  # e.g. no controller quorum: no producer id yet
            self.broker.failing_inits -= 1
            raise BrokerError("initialising transactions: timed out", retriable=True)

    def begin_transaction(self) -> None:
        if self._txn is not None:
            raise BrokerError("a transaction is already open")
        self._txn = []

    def send_offsets_to_transaction(self, positions: Positions, group_metadata: object) -> None:
        self._offsets = (str(group_metadata), dict(positions))

    def commit_transaction(self) -> None:
        if self._txn is None:
            raise BrokerError("no open transaction")
        if self.wedged:
            raise BrokerError("committing the transaction: no answer", retriable=True)
        if self.broker.fail_next_commit is not None:
            exc, self.broker.fail_next_commit = self.broker.fail_next_commit, None
            raise exc
        for record, on_ack in self._txn:
            self._write(record)
            on_ack()
        if self._offsets is not None:
            group, positions = self._offsets
            self.broker.committed.setdefault(group, {}).update(positions)
        self._txn, self._offsets = None, None
        self.broker.transactions.append("committed")

    def abort_transaction(self) -> None:
        if self.wedged:
            raise BrokerError("aborting the transaction: no answer", retriable=True)
        self._txn, self._offsets = None, None
        self.broker.transactions.append("aborted")

    def close(self, timeout_s: float) -> None:
        self.closed = True


class FakeClients:
    """The :class:`~worker.edge.client.Clients` factory over a :class:`FakeBroker`."""

    def __init__(self, broker: FakeBroker) -> None:
        self.broker = broker
        self.consumers: list[FakeConsumer] = []
        self.producers: list[FakeProducer] = []

    def consumer(self, config: WorkerConfig) -> FakeConsumer:
        c = FakeConsumer(self.broker, config.group_id)
        self.consumers.append(c)
        return c

    def producer(self, config: WorkerConfig) -> FakeProducer:
        p = FakeProducer(self.broker, config.guarantee == "exactly-once")
        self.producers.append(p)
        return p


class FakeSession:
    """An ONNX Runtime session stand-in: 10 class scores per row, from the image's mean."""

    def __init__(self, fail_when: Callable[[dict[str, Any]], bool] = lambda feed: False) -> None:
        self.fail_when = fail_when
        self.calls = 0

    def run(self, output_names: Any, input_feed: dict[str, Any]) -> list[Any]:
        self.calls += 1
        if self.fail_when(input_feed):
            raise ValueError("poison in the batch")
        n = len(next(iter(input_feed.values())))
        probs = np.full((n, 10), 0.01, dtype=np.float32)
        probs[:, 3] = 0.91
        return [probs]


def npy_part(
    broker: FakeBroker,
    topic: str,
    event_id: str,
    name: str,
    shape: tuple[int, ...],
    dtype: str,
    *,
    partition: int = 0,
    fill: float = 0.0,
    ts: int | None = None,
) -> RawRecord:
    """Append one ``.npy`` part of ``event_id`` for input ``name``."""
    value = npy_bytes(np.full(shape, fill, dtype=dtype))
    headers = (("mm-modality", name.encode()), ("content-type", b"application/x-npy"))
    return broker.append(topic, partition, event_id.encode(), value, headers, ts)


def spy_on_pacing(monkeypatch: Any) -> list[float]:
    """Record the rate of every :meth:`Pacer.pace` call (the pacing still happens), so a
    test checks that a command paces at its rate without timing it."""
    from worker.core.pacing import Pacer

    rates: list[float] = []
    real = Pacer.pace

    def pace(self: Pacer, n: float = 1.0, sleep: Any = None) -> None:
        rates.append(self.rate)
        real(self, n) if sleep is None else real(self, n, sleep)

    monkeypatch.setattr(Pacer, "pace", pace)
    return rates
