""":class:`~worker.edge.client.Consumer` over librdkafka: rebalance and error callbacks run
inside its ``poll``, on the loop's thread; revocations are queued for the loop."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, cast

from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_END,
    Consumer,
    KafkaError,
    KafkaException,
    TopicPartition,
)

from worker.contract.errors import BrokerError
from worker.contract.records import RawRecord, SourceRef
from worker.edge.client import TP, Positions
from worker.edge.common import (
    checkpoint_metadata,
)
from worker.edge.confluent.errors import (
    LOOKUP_TIMEOUT_S,
    Errors,
    broker_error,
    connect,
    denied,
    offsets,
    record_headers,
    topic_partition,
    wrapped,
)

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)


#: librdkafka's consumer group state and join state of a member in a stable group.
GROUP_UP = ("up", "steady")


def group_state(stats: str) -> tuple[str, str] | None:
    """The ``cgrp`` state and join state in librdkafka's statistics JSON (e.g. ``("up",
    "steady")``, ``("query-coord", "init")`` once the member was lost while its
    coordinator is away); None for a consumer with no group, or statistics it cannot read."""
    try:
        group = json.loads(stats).get("cgrp")
        return (str(group["state"]), str(group["join_state"])) if group else None
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


class ConfluentConsumer:
    """:class:`~worker.edge.client.Consumer` over a librdkafka ``Consumer``."""

    def __init__(
        self, conf: dict[str, Any], security: dict[str, Any], what: str, *, earliest: bool = True
    ) -> None:
        self.security = security
        self._earliest = earliest  # auto.offset.reset, for a position nothing set yet
        self._errors = Errors(conf["bootstrap.servers"], security)
        try:
            self._c = Consumer({**conf, "error_cb": self._errors, "stats_cb": self._stats})
        except KafkaException as exc:
            raise broker_error(what, exc, security) from exc
        #: the group's state in librdkafka's last statistics (None: none came yet)
        self._group_up: bool | None = None
        try:
            connect(self._c, self._errors, what)
        except BaseException:
            self._c.close()
            raise
        #: revoked or lost partitions, queued by the callbacks; librdkafka runs those inside
        #: poll() and close(), on the caller's thread, so no lock is needed
        self._events: list[frozenset[TP]] = []
        self._assigned: set[TP] = set()
        self._paused: set[TP] = set()
        #: next offset per partition: what was returned or sought (librdkafka's position
        #: is unknown until a record came)
        self._next: dict[TP, int] = {}
        self._joined = False
        self._direct = False

    # -- rebalance callbacks (run inside poll, on the loop's thread)

    def _on_assign(self, _c: Any, parts: list[TopicPartition]) -> None:
        tps = {(p.topic, p.partition) for p in parts}
        log.info("partitions assigned: %s", sorted(tps))
        self._assigned |= tps
        self._joined = True

    def _on_revoke(self, _c: Any, parts: list[TopicPartition]) -> None:
        tps = frozenset((p.topic, p.partition) for p in parts)
        if tps:
            log.info("partitions revoked: %s", sorted(tps))
            self._events.append(tps)
        self._assigned -= tps
        self._paused -= tps
        for tp in tps:
            self._next.pop(tp, None)

    def _stats(self, stats: str) -> None:
        # Served inside poll(), on the loop's thread, every statistics.interval.ms.
        state = group_state(stats)
        if state is not None:
            self._group_up = state == GROUP_UP

    @wrapped("cannot subscribe")
    def subscribe(self, topic: str) -> None:
        self._c.subscribe(
            [topic], on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_revoke
        )

    @wrapped("cannot assign partitions")
    def assign(self, tps: Iterable[TP]) -> None:
        wanted = sorted(tps)
        self._c.assign([topic_partition(tp) for tp in wanted])
        self._assigned = set(wanted)
        self._direct = self._joined = True

    def poll(self, timeout_ms: int, max_records: int) -> list[RawRecord]:
        try:
            # consume(n, t) waits for n records or the whole of t: wait for the first
            # only, then take what is there.
            first = self._c.poll(timeout_ms / 1000)
            if first is None:
                return []
            messages = [first]
            if max_records > 1:
                messages += self._c.consume(max_records - 1, 0)
        except KafkaException as exc:
            raise broker_error("Kafka poll failed", exc, self.security) from exc
        out: list[RawRecord] = []
        owned, nxt = self._assigned, self._next
        for m in messages:
            err = m.error()
            if err is not None:
                self._message_error(err)
                continue
            tp = (m.topic(), m.partition())
            if tp not in owned:
                continue  # revoked during this poll: its new owner reads it
            offset = cast(int, m.offset())
            nxt[tp] = offset + 1
            out.append(
                RawRecord(
                    source=SourceRef(tp[0], tp[1], offset, m.timestamp()[1]),
                    key=m.key(),
                    value=m.value(),
                    headers=record_headers(m.headers()),
                )
            )
        return out

    def _message_error(self, err: KafkaError) -> None:
        if err.code() == KafkaError._PARTITION_EOF:
            return
        failure = broker_error("Kafka poll failed", err, self.security)
        # A fatal error reaches the consumer as a message whose code is _FATAL (its own
        # fatal flag unset): the instance is unusable (e.g. a static member fenced).
        if err.fatal() or err.code() == KafkaError._FATAL or denied(err):
            raise failure
        log.warning("%s", failure)

    def revocations(self) -> list[frozenset[TP]]:
        out, self._events = self._events, []
        return out

    def revocation_pending(self) -> bool:
        return bool(self._events)

    def joined(self) -> bool:
        return self._joined

    def in_group(self) -> bool:
        return self._direct or (self._joined and self._group_up is not False)

    def owned(self) -> set[TP]:
        return set(self._assigned)

    def assignment(self) -> set[TP]:
        return set(self._assigned)

    @wrapped("cannot pause")
    def pause(self, tps: Iterable[TP]) -> None:
        wanted = [tp for tp in tps if tp in self._assigned]
        if wanted:
            self._c.pause([topic_partition(tp) for tp in wanted])
            self._paused.update(wanted)

    @wrapped("cannot resume")
    def resume(self, tps: Iterable[TP]) -> None:
        wanted = [tp for tp in tps if tp in self._paused]
        if wanted:
            self._c.resume([topic_partition(tp) for tp in wanted])
            self._paused.difference_update(wanted)

    def paused(self) -> set[TP]:
        return set(self._paused)

    def caught_up(self, tp: TP) -> bool:
        # The high watermark of the last fetch response (cached: no request).
        _low, high = self._c.get_watermark_offsets(topic_partition(tp), cached=True)
        pos = self._next.get(tp)
        return pos is not None and high >= 0 and pos >= high

    @wrapped("cannot seek")
    def _seek(self, tp: TP, offset: int) -> None:
        # Not Consumer.seek(), which waits without a timeout for a fetcher whose leader may
        # be down (docs/architecture.md): re-assigning the one partition locally does not.
        if tp not in self._assigned:
            raise BrokerError(f"cannot seek {tp}: it is not assigned", retriable=False)
        self._c.incremental_unassign([topic_partition(tp)])
        self._c.incremental_assign([topic_partition(tp, offset)])
        if tp in self._paused:
            self._c.pause([topic_partition(tp)])

    def seek(self, tp: TP, offset: int) -> None:
        self._seek(tp, offset)
        self._next[tp] = offset

    def seek_to_beginning(self, tp: TP) -> None:
        self._seek(tp, OFFSET_BEGINNING)
        self._next.pop(tp, None)

    def seek_to_end(self, tp: TP) -> None:
        self._seek(tp, OFFSET_END)
        self._next.pop(tp, None)

    @wrapped("cannot read the position")
    def position(self, tp: TP) -> int:
        if tp in self._next:
            return self._next[tp]
        (found,) = self._c.position([topic_partition(tp)])
        if found.offset >= 0:
            return int(found.offset)
        committed, _meta = self.committed(tp)
        if committed is not None:
            return committed
        low, high = self._c.get_watermark_offsets(topic_partition(tp), timeout=LOOKUP_TIMEOUT_S)
        return int(low if self._earliest else high)

    @wrapped("cannot read the committed offset")
    def committed(self, tp: TP) -> tuple[int | None, str]:
        (found,) = self._c.committed([topic_partition(tp)], timeout=LOOKUP_TIMEOUT_S)
        if found.error is not None:
            raise broker_error("cannot read the committed offset", found.error, self.security)
        if found.offset < 0:
            return None, ""
        return int(found.offset), checkpoint_metadata(found.metadata)

    @wrapped("commit failed")
    def commit(self, positions: Positions) -> None:
        if not positions:
            return
        done = self._c.commit(offsets=offsets(positions), asynchronous=False)
        for tp in done or ():
            if tp.error is not None:
                raise broker_error("commit failed", tp.error, self.security)

    def group_metadata(self) -> object:
        return self._c.consumer_group_metadata()

    def partitions_for(self, topic: str) -> set[int]:
        try:
            found = self._c.list_topics(topic, timeout=LOOKUP_TIMEOUT_S).topics.get(topic)
        except KafkaException as exc:
            log.debug("no metadata for %s yet: %s", topic, exc)
            return set()
        if found is None or found.error is not None:
            return set()
        return set(found.partitions)

    def close(self) -> None:
        try:
            self._c.close()
        except (KafkaException, RuntimeError) as exc:
            log.warning("closing the consumer failed: %r", exc)
