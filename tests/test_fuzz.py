"""Fuzz the decode -> assemble path with random and mutated records.

Property: the worker's pure core never raises anything but RecordError, and
every record ends up in exactly one place: a completed event (as a part or a
replaced duplicate), an incomplete event handed back at the timeout, or the
dead-letter list. Nothing is lost, nothing is counted twice. The seeds cover every
format the worker takes (PNG, an EXIF-rotated JPEG, WebP, HEIC; UTF-8 text; WAV of
16-bit and float samples, FLAC, OGG/Vorbis, OGG/Opus, MP3; npy and npz), for the
reference model and for a model whose text part fills two inputs and whose audio part
is a raw waveform.
"""

from collections import Counter

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from worker.contract.errors import Reason, RecordError
from worker.contract.manifest import InputInfo, Manifest, OutputInfo, PartInfo
from worker.contract.records import RawRecord, SourceRef
from worker.contract.reference_data import VOCABULARY, Sample
from worker.contract.transforms import ImageTransform, WaveformTransform, WordsTransform
from worker.contract.transforms.media import audio_bytes, image_bytes
from worker.core.assemble import Assembler
from worker.core.decode import Limits, decode_record
from worker.tools.produce import encode_sample, npz_bytes, png_bytes

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


def _media_seeds() -> dict[str, tuple[bytes, str]]:
    """One small valid record value of every raw format, keyed ``<part>_<format>``."""
    img = Image.fromarray(RNG.integers(0, 255, (24, 20, 3)).astype(np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    wave = (RNG.normal(0, 0.1, 4000)).astype(np.float32)
    return {
        "image_jpeg": (image_bytes(img, "JPEG", exif=exif.tobytes()), "image/jpeg"),
        "image_webp": (image_bytes(img, "WEBP"), "image/webp"),
        "image_heic": (image_bytes(img, "HEIF"), "image/heic"),
        "audio_wavfloat": (audio_bytes(wave, 16000, "audio/wav", "FLOAT"), "audio/wav"),
        "audio_flac": (audio_bytes(wave, 16000, "audio/flac"), "audio/flac"),
        "audio_ogg": (audio_bytes(wave, 16000, "audio/ogg"), "audio/ogg"),
        "audio_opus": (audio_bytes(wave, 48000, "audio/opus"), "audio/opus"),
        "audio_mp3": (audio_bytes(wave, 16000, "audio/mpeg"), "audio/mpeg"),
    }


VALID.update(_media_seeds())


def _two_input_manifest() -> Manifest:
    """Parts image (NCHW, mean/std), text filling ids and mask, audio as a raw waveform."""
    image = ImageTransform(16, 16, mean=(0.5,), std=(0.25,), layout="CHW")
    words = WordsTransform(VOCABULARY, max_length=8)
    wave = WaveformTransform(num_samples=4000, normalize="zero_mean_unit_var")
    px, ids = InputInfo("px", "float32", (3, 16, 16)), InputInfo("ids", "int64", (8,))
    mask, au = InputInfo("mask", "int64", (8,)), InputInfo("au", "float32", (4000,))
    return Manifest(
        name="two", version="1", sha256="0" * 64, opset=18, inputs=(px, ids, mask, au),
        parts=(
            PartInfo("image", image, ((px, "pixels"),)),
            PartInfo("text", words, ((ids, "input_ids"), (mask, "attention_mask"))),
            PartInfo("audio", wave, ((au, "waveform"),)),
        ),
        outputs=(OutputInfo("o", "float32", (2,)),),
    )  # fmt: skip


M2 = _two_input_manifest()
VALID2 = {k: v for k, v in VALID.items() if not v[1].startswith("application/")}
VALID2["text_npz"] = (
    npz_bytes({"ids": np.arange(8, dtype=np.int64), "mask": np.ones(8, dtype=np.int64)}),
    "application/x-npz",
)


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
def record_stream(
    draw: st.DrawFn, valid: dict[str, tuple[bytes, str]] | None = None
) -> list[RawRecord]:
    valid = VALID if valid is None else valid
    data = draw(st.data())
    n = draw(st.integers(1, 40))
    out = []
    for offset in range(n):
        key = draw(st.sampled_from([b"a", b"b", b"c", b"d", b"", b"\xff"]))
        choice = draw(st.sampled_from([*valid, "junk"]))
        if choice == "junk":
            modality = draw(st.sampled_from(["image", "text", "audio", "video", ""]))
            value, ctype = (
                draw(st.binary(max_size=128)),
                draw(
                    st.sampled_from(
                        [
                            "application/x-npy",
                            "application/x-npz",
                            "image/png",
                            "image/heic",
                            "text/plain",
                            "audio/wav",
                            "audio/mpeg",
                            "x/y",
                        ]
                    )
                ),
            )
        else:
            modality = choice.split("_")[0]
            value, ctype = valid[choice]
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
    check_every_record_is_placed(M, stream, timeout_ms)


@settings(max_examples=150, deadline=None)
@given(stream=record_stream(VALID2), timeout_ms=st.integers(1, 50))
def test_every_record_ends_up_in_exactly_one_place_with_parts_filling_several_inputs(
    stream: list[RawRecord], timeout_ms: int
) -> None:
    check_every_record_is_placed(M2, stream, timeout_ms)


def check_every_record_is_placed(m: Manifest, stream: list[RawRecord], timeout_ms: int) -> None:
    asm = Assembler(frozenset(m.part_names))
    placed: Counter[int] = Counter()
    now = 0
    for rec in stream:
        now += 7
        try:
            part = decode_record(rec, m, LIMITS)
        except RecordError as err:
            assert isinstance(err.reason, Reason)
            placed[rec.source.offset] += 1
            continue
        for name, tensor in part.tensors.items():
            info = m.input(name)
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
