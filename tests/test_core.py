"""Pure stages: assembly, batching, offset tracking, model runner (fake session)."""

from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from worker.contract.errors import InferenceError
from worker.core.assemble import Assembler
from worker.core.batcher import Batcher
from worker.core.offsets import METADATA_MAX_CHARS, OffsetTracker, decode_done, encode_done
from worker.inference.model import ModelRunner, SessionInfo

from factories import event, part, small_manifest

# ------------------------------------------------------------------ assembler


def test_event_completes_when_every_input_arrived_in_any_order() -> None:
    asm = Assembler(frozenset({"a", "b", "c"}))
    assert asm.add(part("e1", "c", 0), now_ms=10) is None
    assert asm.add(part("e2", "a", 1), now_ms=11) is None
    assert asm.add(part("e1", "a", 2), now_ms=12) is None
    ev = asm.add(part("e1", "b", 3), now_ms=13)
    assert ev is not None and ev.event_id == "e1" and set(ev.parts) == {"a", "b", "c"}
    assert (ev.first_seen_ms, ev.completed_ms) == (10, 13)
    assert len(asm) == 1  # e2 still pending


def test_same_key_on_two_partitions_are_two_events() -> None:
    asm = Assembler(frozenset({"a", "b"}))
    asm.add(part("e", "a", 0, partition=0), 0)
    assert asm.add(part("e", "b", 0, partition=1), 0) is None
    assert len(asm) == 2


def test_duplicate_part_later_wins_and_is_kept_for_its_offset() -> None:
    asm = Assembler(frozenset({"a", "b"}))
    asm.add(part("e", "a", 0, value=1.0), 0)
    asm.add(part("e", "a", 1, value=2.0), 0)
    ev = asm.add(part("e", "b", 2), 0)
    assert ev is not None and float(ev.parts["a"].tensors["a"][0]) == 2.0
    assert [s.offset for s in ev.duplicates] == [0]
    assert sorted(s.offset for s in ev.sources) == [0, 1, 2]
    assert asm.duplicate_parts == 1


def test_drop_partitions_forgets_only_those() -> None:
    asm = Assembler(frozenset({"a", "b"}))
    asm.add(part("x", "a", 0, partition=0), 0)
    asm.add(part("y", "a", 0, partition=1), 0)
    assert asm.drop_partitions({0}) == 1 and len(asm) == 1


# ------------------------------------------------------------------ batcher


def test_batch_ready_when_full_or_oldest_waited_the_delay() -> None:
    b = Batcher(max_size=3, max_delay_ms=10)
    assert not b.ready(0) and b.wait_ms(0) is None
    b.add(event("1"), now_ms=100)
    b.add(event("2"), now_ms=105)
    assert not b.ready(109) and b.wait_ms(105) == 5
    assert b.ready(110)
    b.add(event("3"), now_ms=106)
    assert b.ready(106) and b.wait_ms(106) == 0
    assert [e.event_id for e in b.take()] == ["1", "2", "3"] and len(b) == 0


def test_take_returns_at_most_max_size_in_order() -> None:
    b = Batcher(max_size=2, max_delay_ms=0)
    for i in range(5):
        b.add(event(str(i)), 0)
    assert [[e.event_id for e in b.take()] for _ in range(3)] == [["0", "1"], ["2", "3"], ["4"]]


def test_batcher_drops_revoked_partitions() -> None:
    b = Batcher(max_size=10, max_delay_ms=10)
    b.add(event("a", partition=0), 0)
    b.add(event("b", partition=1), 0)
    assert b.drop_partitions({1}) == 1 and [e.event_id for e in b.take()] == ["a"]


# ------------------------------------------------------------------ offsets

TP = ("in", 0)


def test_commit_position_never_passes_an_open_offset() -> None:
    t = OffsetTracker()
    for o in range(5):
        t.track(TP, o)
    assert t.safe_position(TP) == 0
    t.done(TP, 1)
    t.done(TP, 2)
    assert t.safe_position(TP) == 0  # 0 still open
    t.done(TP, 0)
    assert t.safe_position(TP) == 3
    t.done(TP, 4)
    assert t.committable() == {TP: (3, "mm1:1")}  # 4 is finished beyond position 3
    t.done(TP, 3)
    assert t.committable() == {TP: (5, "")} and t.open_count() == 0


def test_committable_only_reports_progress() -> None:
    t = OffsetTracker()
    t.track(TP, 7)
    t.done(TP, 7)
    assert t.committable() == {TP: (8, "")}
    t.mark_committed({TP: (8, "")})
    assert t.committable() == {}
    t.track(TP, 8)
    assert t.committable() == {}


def test_forget_drops_state_and_ignores_late_acks() -> None:
    t = OffsetTracker()
    t.track(TP, 0)
    t.forget({TP})
    t.done(TP, 0)
    assert t.committable() == {} and t.safe_position(TP) is None


# ------------------------------------------------------------------ model runner


class FakeSession:
    def __init__(self, fail_on: float | None = None) -> None:
        self.fail_on = fail_on
        self.feeds: list[dict[str, Any]] = []

    def run(self, output_names: Sequence[str] | None, input_feed: dict[str, Any]) -> list[Any]:
        self.feeds.append(input_feed)
        audio = input_feed["audio"]
        if self.fail_on is not None and (audio == self.fail_on).any():
            raise ValueError("poison")
        n = audio.shape[0]
        probs = np.zeros((n, 10), dtype=np.float32)
        probs[np.arange(n), np.arange(n) % 10] = 0.9
        return [probs]


def full_event(event_id: str, fill: float = 0.0) -> Any:
    from worker.contract.records import Event, Part

    from factories import source

    m = small_manifest()
    parts = {
        i.name: Part(event_id, i.name, {i.name: np.full(i.shape, fill, dtype=i.dtype)}, source(n))
        for n, i in enumerate(m.inputs)
    }
    return Event(event_id, 0, parts, first_seen_ms=1, completed_ms=2)


def test_runner_feeds_by_name_with_manifest_dtypes_and_labels_argmax() -> None:
    session = FakeSession()
    runner = ModelRunner(small_manifest(), session, SessionInfo("CPUExecutionProvider", ()))
    preds = runner.predict([full_event("a"), full_event("b")], clock=lambda: 99)
    feed = session.feeds[0]
    assert set(feed) == {"audio", "image", "text"}
    assert feed["text"].dtype == np.int32 and feed["image"].shape == (2, 16, 16, 3)
    assert [p.label for p in preds] == ["0", "1"] and preds[1].score == pytest.approx(0.9)
    assert preds[0].timing["inferred_ms"] == 99 and preds[0].timing["batch_size"] == 2
    assert preds[0].modalities == ("audio", "image", "text")


def test_runner_wraps_ort_failures_in_inference_error() -> None:
    runner = ModelRunner(small_manifest(), FakeSession(fail_on=5.0), SessionInfo("CPU", ()))
    with pytest.raises(InferenceError, match="poison"):
        runner.predict([full_event("a", 5.0)], clock=lambda: 0)


def test_done_offsets_round_trip_through_commit_metadata() -> None:
    done = {12, 13, 14, 20, 31, 32}
    meta = encode_done(10, done)
    assert meta == "mm1:2-4,10,21-22"
    assert decode_done(10, meta) == done
    assert decode_done(10, "") == set() and decode_done(10, "garbage") == set()
    assert decode_done(10, "mm1:0-3") == set()  # offsets at or before the position are invalid


def test_metadata_is_capped_and_the_cut_is_only_lost_work() -> None:
    done = set(range(1, 20_000, 2))  # 10k single offsets
    meta = encode_done(0, done)
    assert len(meta) <= METADATA_MAX_CHARS
    decoded = decode_done(0, meta)
    assert decoded and decoded < done  # a prefix: the rest is re-processed, never skipped wrongly


def test_seeded_partition_skips_what_the_last_commit_finished() -> None:
    t = OffsetTracker()
    t.seed(TP, 5, "mm1:2-3")  # offsets 7 and 8 were finished beyond position 5
    assert t.finished_before(TP, 7) and t.finished_before(TP, 8)
    assert not t.finished_before(TP, 5) and not t.finished_before(TP, 6)
    for o in range(5, 9):
        t.track(TP, o)
    t.done(TP, 7)
    t.done(TP, 8)
    # 5 and 6 still open: position and metadata are what was committed: nothing to do
    assert t.committable() == {}
    t.done(TP, 5)
    t.done(TP, 6)
    assert t.committable() == {TP: (9, "")}


def test_uncommitted_counts_records_past_the_commit() -> None:
    t = OffsetTracker()
    t.seed(TP, 0, "")
    for o in range(4):
        t.track(TP, o)
    assert t.uncommitted() == 4
    t.done(TP, 0)
    t.mark_committed({TP: (1, "")})
    assert t.uncommitted() == 3


def test_expire_goes_by_stream_time_per_partition_oldest_first() -> None:
    asm = Assembler(frozenset({"a", "b"}))
    asm.add(part("old", "a", 0, ts=0), now_ms=5_000)  # the worker's clock plays no part
    asm.add(part("new", "a", 1, ts=500), now_ms=5_000)
    asm.add(part("other", "a", 0, partition=1, ts=0), now_ms=5_000)
    assert asm.pending_bytes > 0 and asm.partitions() == {0, 1}
    assert asm.expire(0, stream_ms=999, timeout_ms=1000) == []
    expired = asm.expire(0, stream_ms=1000, timeout_ms=1000)
    assert [e.event_id for e in expired] == ["old"] and expired[0].missing == ("b",)
    assert expired[0].first_ts_ms == 0 and expired[0].first_seen_ms == 5_000
    assert len(asm) == 2  # partition 1 has its own stream time
    asm.expire(0, stream_ms=1500, timeout_ms=1000)
    assert asm.partitions() == {1}
    assert [e.event_id for e in asm.expire_all()] == ["other"]
    assert len(asm) == 0 and asm.pending_bytes == 0


def test_evict_oldest_takes_the_oldest_first_part_of_any_partition() -> None:
    asm = Assembler(frozenset({"a", "b"}))
    asm.add(part("p0-late", "a", 0, partition=0, ts=300), now_ms=0)
    asm.add(part("p1-early", "a", 0, partition=1, ts=100), now_ms=0)
    asm.add(part("p1-late", "a", 1, partition=1, ts=400), now_ms=0)
    evicted = [asm.evict_oldest() for _ in range(3)]
    assert [e.event_id for e in evicted if e] == ["p1-early", "p0-late", "p1-late"]
    assert asm.evict_oldest() is None and asm.pending_bytes == 0


def test_stream_time_moves_with_records_and_with_the_wall_clock_only_when_idle() -> None:
    from worker.core.streamtime import StreamTime

    st = StreamTime()
    assert st.time(0) == -1 and st.idle(0, now_ms=10) == -1  # nothing read there yet
    assert st.observe(0, 1_000, now_ms=50_000) == 1_000
    assert st.observe(0, 900, now_ms=50_000) == 1_000  # never goes back
    st.busy(0)
    assert st.time(0) == 1_000  # a stall (paused, behind, leader away) does not move it
    assert st.idle(0, now_ms=60_000) == 1_000  # idle from now on
    assert st.idle(0, now_ms=60_250) == 1_250
    assert st.observe(0, 1_100, now_ms=60_300) == 1_250  # records end the idle spell
    assert st.idle(0, now_ms=61_000) == 1_250
    assert st.observe(1, -1, now_ms=7) == 7  # no timestamp: counts as written now
    st.forget({0})
    assert st.time(0) == -1 and st.time(1) == 7
    st.clear()
    assert st.time(1) == -1


def test_runner_blanks_missing_inputs_of_an_incomplete_event() -> None:
    from worker.contract.records import Event

    session = FakeSession()
    runner = ModelRunner(small_manifest(), session, SessionInfo("CPU", ()))
    full = full_event("x", fill=1.0)
    partial = Event("x", 0, {"image": full.parts["image"]}, 0, 0, missing=("audio", "text"))
    preds = runner.predict([partial], clock=lambda: 0)
    feed = session.feeds[0]
    assert (feed["text"] == 0).all() and feed["audio"].shape == (1, 48, 40)
    assert np.isfinite(feed["audio"]).all() and (feed["image"] == 1.0).all()
    assert preds[0].missing == ("audio", "text") and preds[0].modalities == ("image",)
