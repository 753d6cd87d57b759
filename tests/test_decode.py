"""Decode stage: every content type, and every way a record can be refused (with its reason)."""

import io
import wave

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from worker.contract.errors import Reason, RecordError
from worker.contract.records import CONTENT_NPY
from worker.core.decode import Limits, decode_record
from worker.tools.produce import npy_bytes, png_bytes, wav_bytes

from factories import raw, small_manifest

M = small_manifest(16)
LIMITS = Limits(max_part_bytes=1_000_000, max_image_pixels=512 * 512)


def reason_of(record) -> Reason:  # type: ignore[no-untyped-def]
    with pytest.raises(RecordError) as info:
        decode_record(record, M, LIMITS)
    return info.value.reason


def test_npy_part_is_taken_as_is() -> None:
    arr = np.random.default_rng(0).random((16, 16, 3)).astype(np.float32)
    part = decode_record(raw(npy_bytes(arr), modality="image", ctype=CONTENT_NPY), M, LIMITS)
    assert part.event_id == "ev-1" and part.name == "image"
    assert np.array_equal(part.tensors["image"], arr)


@pytest.mark.parametrize(
    ("arr", "reason"),
    [
        (np.zeros((16, 16, 3), dtype=np.float64), Reason.SHAPE_MISMATCH),
        (np.zeros((8, 8, 3), dtype=np.float32), Reason.SHAPE_MISMATCH),
        (np.full((16, 16, 3), np.nan, dtype=np.float32), Reason.DECODE_ERROR),
    ],
)
def test_npy_with_wrong_dtype_shape_or_nan_is_refused(arr: np.ndarray, reason: Reason) -> None:
    assert reason_of(raw(npy_bytes(arr), modality="image", ctype=CONTENT_NPY)) == reason


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_one_non_finite_value_among_finite_ones_is_refused(bad: float) -> None:
    arr = np.random.default_rng(1).random((16, 16, 3)).astype(np.float32)
    arr[7, 3, 1] = bad
    assert reason_of(raw(npy_bytes(arr), modality="image", ctype=CONTENT_NPY)) == (
        Reason.DECODE_ERROR
    )


def test_the_largest_finite_values_are_taken() -> None:
    arr = np.full((16, 16, 3), np.finfo(np.float32).max, dtype=np.float32)
    arr[0, 0, 0] = -np.finfo(np.float32).max
    part = decode_record(raw(npy_bytes(arr), modality="image", ctype=CONTENT_NPY), M, LIMITS)
    assert np.array_equal(part.tensors["image"], arr)


def test_pickled_npy_is_refused_without_unpickling() -> None:
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    record = raw(buf.getvalue(), modality="image", ctype=CONTENT_NPY)
    with pytest.raises(RecordError, match="dtype object") as info:
        decode_record(record, M, LIMITS)
    assert info.value.reason == Reason.SHAPE_MISMATCH


def test_forged_npy_header_cannot_make_the_worker_allocate() -> None:
    # A header declaring 10^12 floats, followed by 16 bytes: refused from the header alone.
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f4", "fortran_order": False, "shape": (10**12,)}
    )
    forged = header.getvalue() + bytes(16)  # the header includes the magic
    record = raw(forged, modality="image", ctype=CONTENT_NPY)
    assert reason_of(record) == Reason.SHAPE_MISMATCH
    good = npy_bytes(np.zeros((16, 16, 3), dtype=np.float32))
    truncated = raw(good[:-4], modality="image", ctype=CONTENT_NPY)
    assert reason_of(truncated) == Reason.DECODE_ERROR


def test_png_jpeg_text_and_wav_decode_to_model_tensors() -> None:
    digit = (np.arange(64).reshape(8, 8) * 4).astype(np.uint8)
    png = decode_record(raw(png_bytes(digit), modality="image", ctype="image/png"), M, LIMITS)
    assert png.tensors["image"].shape == (16, 16, 3) and png.tensors["image"].dtype == np.float32
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (0, 128, 255)).save(buf, format="JPEG")
    jpg = decode_record(raw(buf.getvalue(), modality="image", ctype="image/jpeg"), M, LIMITS)
    assert abs(float(jpg.tensors["image"][..., 2].mean()) - 1.0) < 0.02
    text = decode_record(raw(b"the number 7"), M, LIMITS).tensors["text"]
    assert text.dtype == np.int32 and text.shape == (16,)
    tone = np.sin(np.arange(4000) / 8000 * 2 * np.pi * 697).astype(np.float32) * 0.5
    audio = decode_record(
        raw(wav_bytes(tone, 8000), modality="audio", ctype="audio/wav"), M, LIMITS
    )
    feats = audio.tensors["audio"]
    assert feats.shape == (48, 40) and np.isfinite(feats).all()


def test_stereo_wav_is_downmixed() -> None:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((np.ones((8000, 2)) * 1000).astype("<i2").tobytes())
    part = decode_record(raw(buf.getvalue(), modality="audio", ctype="audio/x-wav"), M, LIMITS)
    assert part.tensors["audio"].shape == (48, 40)


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        (raw(b"x", key=None), Reason.MISSING_KEY),
        (raw(b"x", key=b"\xff\xfe"), Reason.MISSING_KEY),
        (raw(b"x", modality=None), Reason.UNKNOWN_MODALITY),
        (raw(b"x", modality="video"), Reason.UNKNOWN_MODALITY),
        (raw(b"x", ctype=None), Reason.UNSUPPORTED_CONTENT_TYPE),
        (raw(b"x", ctype="application/pdf"), Reason.UNSUPPORTED_CONTENT_TYPE),
        (raw(b"x", modality="image", ctype="text/plain"), Reason.UNSUPPORTED_CONTENT_TYPE),
        (raw(b"x", ctype="text/plain; charset=latin-1"), Reason.UNSUPPORTED_CONTENT_TYPE),
        (raw(b"\xff\xfe\xfa"), Reason.DECODE_ERROR),
        (raw(None), Reason.DECODE_ERROR),
        (raw(b"not a png", modality="image", ctype="image/png"), Reason.DECODE_ERROR),
        (raw(b"RIFF....", modality="audio", ctype="audio/wav"), Reason.DECODE_ERROR),
        (raw(b"a" * 1_000_001), Reason.PAYLOAD_TOO_LARGE),
        (raw(b"a " * 5000), Reason.PAYLOAD_TOO_LARGE),
        (raw(b"x", extra=(("mm-event-time", b"yesterday"),)), Reason.DECODE_ERROR),
    ],
)
def test_bad_records_get_their_reason(record, reason: Reason) -> None:  # type: ignore[no-untyped-def]
    assert reason_of(record) == reason


def test_image_bomb_is_refused_from_its_header() -> None:
    buf = io.BytesIO()
    Image.new("L", (2000, 2000)).save(buf, format="PNG")  # 4 Mpx declared, tiny file
    record = raw(buf.getvalue(), modality="image", ctype="image/png")
    assert len(buf.getvalue()) < 100_000
    assert reason_of(record) == Reason.PAYLOAD_TOO_LARGE


def test_8bit_wav_is_decoded_and_an_aiff_is_unsupported() -> None:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(1)
        w.setframerate(8000)
        w.writeframes(bytes([128, 200, 56, 128] * 200))
    part = decode_record(raw(buf.getvalue(), modality="audio", ctype="audio/wav"), M, LIMITS)
    assert part.tensors["audio"].shape == (48, 40)
    import soundfile as sf

    aiff = io.BytesIO()
    sf.write(aiff, np.zeros(800, np.float32), 8000, format="AIFF")
    record = raw(aiff.getvalue(), modality="audio", ctype="audio/wav")
    assert reason_of(record) == Reason.UNSUPPORTED_CONTENT_TYPE


@settings(max_examples=300, deadline=None)
@given(
    value=st.one_of(st.none(), st.binary(max_size=300)),
    key=st.one_of(st.none(), st.binary(max_size=8)),
    modality=st.one_of(st.none(), st.sampled_from(["image", "text", "audio", "x"])),
    ctype=st.one_of(
        st.none(),
        st.sampled_from(["image/png", "image/jpeg", "text/plain", "audio/wav", CONTENT_NPY, "a/b"]),
    ),
)
def test_random_records_decode_or_fail_with_a_reason(value, key, modality, ctype) -> None:  # type: ignore[no-untyped-def]
    record = raw(value, key=key, modality=modality, ctype=ctype)
    try:
        part = decode_record(record, M, LIMITS)
    except RecordError as err:
        assert isinstance(err.reason, Reason)
    else:
        for name, tensor in part.tensors.items():
            info = M.input(name)
            assert info is not None and tensor.shape == info.shape


def test_cached_npy_header_still_checks_each_payload() -> None:
    a = np.zeros((16, 16, 3), dtype=np.float32)
    b = np.ones((16, 16, 3), dtype=np.float32)
    first = decode_record(raw(npy_bytes(a), modality="image", ctype=CONTENT_NPY), M, LIMITS)
    second = decode_record(raw(npy_bytes(b), modality="image", ctype=CONTENT_NPY), M, LIMITS)
    assert float(first.tensors["image"].sum()) == 0.0
    assert float(second.tensors["image"].mean()) == 1.0
    short = npy_bytes(b)[:-8]  # same (cached) header, truncated data
    assert reason_of(raw(short, modality="image", ctype=CONTENT_NPY)) == Reason.DECODE_ERROR


def test_empty_wav_and_non_png_images_are_refused_not_crashes() -> None:
    empty = io.BytesIO()
    with wave.open(empty, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(b"")
    assert reason_of(raw(empty.getvalue(), modality="audio", ctype="audio/wav")) == (
        Reason.DECODE_ERROR
    )
    tiff = io.BytesIO()
    Image.new("RGB", (8, 8)).save(tiff, format="TIFF")
    record = raw(tiff.getvalue(), modality="image", ctype="image/png")
    assert reason_of(record) == Reason.UNSUPPORTED_CONTENT_TYPE
    lab = io.BytesIO()
    Image.new("LAB", (8, 8)).save(lab, format="TIFF")
    assert reason_of(raw(lab.getvalue(), modality="image", ctype="image/png")) in (
        Reason.UNSUPPORTED_CONTENT_TYPE,
        Reason.DECODE_ERROR,
    )


# ---------------------------------------------------------------- a part that fills two inputs


def _two_input_manifest():  # type: ignore[no-untyped-def]
    from worker.contract.manifest import InputInfo, Manifest, OutputInfo, PartInfo
    from worker.contract.reference_data import VOCABULARY
    from worker.contract.transforms import WordsTransform

    ids, mask = InputInfo("ids", "int64", (6,)), InputInfo("mask", "int32", (6,))
    words = WordsTransform(VOCABULARY, max_length=6)
    return Manifest(
        name="two",
        version="1",
        sha256="0" * 64,
        opset=17,
        inputs=(ids, mask),
        parts=(PartInfo("text", words, ((ids, "input_ids"), (mask, "attention_mask"))),),
        outputs=(OutputInfo("o", "float32", (2,)),),
    )


TWO = _two_input_manifest()


def _npz(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def test_raw_text_fills_both_inputs_each_in_its_dtype() -> None:
    part = decode_record(raw(b"the number seven"), TWO, LIMITS)
    assert part.name == "text" and set(part.tensors) == {"ids", "mask"}
    assert part.tensors["ids"].dtype == np.int64 and part.tensors["mask"].dtype == np.int32
    assert part.tensors["mask"].tolist() == [1, 1, 1, 0, 0, 0]


def test_an_npz_part_fills_every_input_and_is_checked_like_npy() -> None:
    ids, mask = np.arange(6, dtype=np.int64), np.ones(6, dtype=np.int32)
    npz = "application/x-npz"
    part = decode_record(raw(_npz(ids=ids, mask=mask), ctype=npz), TWO, LIMITS)
    assert part.tensors["ids"].tolist() == ids.tolist()
    assert part.tensors["mask"].tolist() == mask.tolist()
    compressed = io.BytesIO()
    np.savez_compressed(compressed, ids=ids, mask=mask)
    assert decode_record(raw(compressed.getvalue(), ctype=npz), TWO, LIMITS).tensors["ids"][5] == 5

    def reason(value: bytes, ctype: str = npz) -> Reason:
        with pytest.raises(RecordError) as info:
            decode_record(raw(value, ctype=ctype), TWO, LIMITS)
        return info.value.reason

    assert reason(_npz(ids=ids)) == Reason.SHAPE_MISMATCH  # a member missing
    assert reason(_npz(ids=ids, mask=mask, extra=ids)) == Reason.SHAPE_MISMATCH
    assert reason(_npz(ids=ids.astype(np.int32), mask=mask)) == Reason.SHAPE_MISMATCH
    assert reason(_npz(ids=ids, mask=mask)[:-30]) == Reason.DECODE_ERROR
    assert reason(b"PK\x03\x04 not a zip") == Reason.DECODE_ERROR
    with pytest.raises(RecordError, match="x-npz") as info:
        decode_record(raw(npy_bytes(ids), ctype=CONTENT_NPY), TWO, LIMITS)
    assert info.value.reason == Reason.UNSUPPORTED_CONTENT_TYPE


def test_an_npz_member_is_never_inflated_past_its_input() -> None:
    """A deflated member of 50 MB of zeros is a few KB on the wire: no more than what
    its input can take is ever inflated."""
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("ids.npy", npy_bytes(np.zeros(6, np.int64)) + bytes(50_000_000))
        zf.writestr("mask.npy", npy_bytes(np.zeros(6, np.int32)))
    assert len(buf.getvalue()) < 200_000
    with pytest.raises(RecordError, match="holds more than the 65584 bytes") as info:
        decode_record(raw(buf.getvalue(), ctype="application/x-npz"), TWO, LIMITS)
    assert info.value.reason == Reason.PAYLOAD_TOO_LARGE


def test_a_forged_npz_is_refused_before_anything_is_inflated_or_parsed() -> None:
    import zipfile

    ids, mask = np.arange(6, dtype=np.int64), np.ones(6, dtype=np.int32)
    good = _npz(ids=ids, mask=mask)

    def reason(value: bytes) -> Reason:
        with pytest.raises(RecordError) as info:
            decode_record(raw(value, ctype="application/x-npz"), TWO, LIMITS)
        return info.value.reason

    # Encrypted: the flag bit in both headers.
    enc = bytearray(good)
    for sig in (b"PK\x03\x04", b"PK\x01\x02"):
        at = enc.find(sig)
        while at >= 0:
            flag_at = at + (6 if sig == b"PK\x03\x04" else 8)
            enc[flag_at] |= 1
            at = enc.find(sig, at + 4)
    assert reason(bytes(enc)) == Reason.DECODE_ERROR
    # bzip2: not what numpy writes (and inflated without a bound by zipfile).
    bz = io.BytesIO()
    with zipfile.ZipFile(bz, "w", compression=zipfile.ZIP_BZIP2) as zf:
        zf.writestr("ids.npy", npy_bytes(ids))
        zf.writestr("mask.npy", npy_bytes(mask))
    assert reason(bz.getvalue()) == Reason.DECODE_ERROR
    # A member whose central directory understates its size: read no further than the input.
    lie = io.BytesIO()
    with zipfile.ZipFile(lie, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("ids.npy", npy_bytes(ids) + bytes(5_000_000))
        zf.writestr("mask.npy", npy_bytes(mask))
    assert reason(lie.getvalue()) == Reason.PAYLOAD_TOO_LARGE
    # Thousands of entries: refused from the end record's count.
    many = io.BytesIO()
    with zipfile.ZipFile(many, "w") as zf:
        for k in range(2000):
            zf.writestr(f"a{k}.npy", b"")
    assert reason(many.getvalue()) == Reason.SHAPE_MISMATCH
