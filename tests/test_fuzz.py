"""Fuzz the decode -> assemble path with random and mutated records.

Property: the worker's pure core never raises anything but RecordError, and
every record ends up in exactly one place: a completed event (as a part or a
replaced duplicate), an incomplete event handed back at the timeout, or the
dead-letter list. Nothing is lost, nothing is counted twice.
"""

from collections import Counter

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.contract.errors import Reason, RecordError
from worker.contract.records import RawRecord, SourceRef
from worker.contract.reference_data import Sample
from worker.core.assemble import Assembler
from worker.core.decode import Limits, decode_record
from worker.tools.produce import encode_sample, png_bytes

from factories import small_manifest

M = small_manifest(16)
LIMITS = Limits(max_part_bytes=200_000, max_image_pixels=256 * 256)
RNG = np.random.default_rng(0)
SAMPLE = Sample(
    image=RNG.integers(0, 255, (8, 8)).astype(np.uint8),
    text="the number 7",
    audio=RNG.normal(0, 0.1, 8000).astype(np.float32),
    label=7,
)
VALID = {m: (v, c) for _, m, v, c in encode_sample("x", SAMPLE, "npy", M)}
VALID["image_png"] = (png_bytes(SAMPLE.image), "image/png")
VALID["text_raw"] = (b"seven", "text/plain; charset=utf-8")


def mutate(value: bytes, data: st.DataObject) -> bytes:
    kind = data.draw(st.sampled_from(["keep", "flip", "truncate", "append", "replace"]))
    if kind == "keep" or not value:
        return value
    if kind == "flip":
        i = data.draw(st.integers(0, len(value) - 1))
        return value[:i] + bytes([value[i] ^ data.draw(st.integers(1, 255))]) + value[i + 1 :]
    if kind == "truncate":
        return value[: data.draw(st.integers(0, len(value) - 1))]
    if kind == "append":
        return value + data.draw(st.binary(min_size=1, max_size=64))
    return data.draw(st.binary(max_size=256))


@st.composite
def record_stream(draw: st.DrawFn) -> list[RawRecord]:
    data = draw(st.data())
    n = draw(st.integers(1, 40))
    out = []
    for offset in range(n):
        key = draw(st.sampled_from([b"a", b"b", b"c", b"d", b"", b"\xff"]))
        choice = draw(st.sampled_from([*VALID, "junk"]))
        if choice == "junk":
            modality = draw(st.sampled_from(["image", "text", "audio", "video", ""]))
            value, ctype = (
                draw(st.binary(max_size=128)),
                draw(
                    st.sampled_from(
                        ["application/x-npy", "image/png", "text/plain", "audio/wav", "x/y"]
                    )
                ),
            )
        else:
            modality = choice.split("_")[0]
            value, ctype = VALID[choice]
            if draw(st.booleans()):
                value = mutate(value, data)
        headers = ((("mm-modality", modality.encode()),) if modality else ()) + (
            ("content-type", ctype.encode()),
        )
        partition = draw(st.integers(0, 1))
        out.append(RawRecord(SourceRef("in", partition, offset, 0), key, value, headers))
    return out


@settings(max_examples=250, deadline=None)
@given(stream=record_stream(), timeout_ms=st.integers(1, 50))
def test_every_record_ends_up_in_exactly_one_place(
    stream: list[RawRecord], timeout_ms: int
) -> None:
    asm = Assembler(frozenset(i.name for i in M.inputs))
    placed: Counter[int] = Counter()
    now = 0
    for rec in stream:
        now += 7
        try:
            part = decode_record(rec, M, LIMITS)
        except RecordError as err:
            assert isinstance(err.reason, Reason)
            placed[rec.source.offset] += 1
            continue
        for name, tensor in part.tensors.items():
            info = M.input(name)
            assert info is not None and tensor.shape == info.shape
            assert tensor.dtype == np.dtype(info.dtype)
        event = asm.add(part, now)
        if event is not None:
            assert set(event.parts) == asm.required
            placed.update(s.offset for s in event.sources)
        for inc in asm.expire(rec.source.partition, now, timeout_ms):
            placed.update(p.source.offset for p in inc.all_parts)
        if now % 5 == 0 and (oldest := asm.evict_oldest()) is not None:
            placed.update(p.source.offset for p in oldest.all_parts)
    for inc in asm.expire_all():
        placed.update(p.source.offset for p in inc.all_parts)
    assert len(asm) == 0 and asm.pending_bytes == 0
    assert placed == Counter(r.source.offset for r in stream)
