"""The transforms, checked against independent computations: the tokenizer's own encode,
numpy mean/std and crops, OpenCV's resize, a loop-by-loop log-mel; and the media
decoders on every format, with their limits checked before the full decode."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import cv2
import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from worker.contract.errors import ModelError, Reason, RecordError
from worker.contract.reference_data import DTMF_HZ, VOCABULARY, dtmf
from worker.contract.transforms import (
    ImageTransform,
    Limits,
    LogMelTransform,
    TokenizerTransform,
    Waveform,
    WaveformTransform,
    WordsTransform,
    log_mel,
    prepare_image,
    resample,
    tokenize,
    transform_from_dict,
)
from worker.contract.transforms.media import audio_bytes, image_bytes, open_image, read_audio

from factories import train_wordpiece

TEXT = WordsTransform(VOCABULARY, max_length=8)
LIMITS = Limits(max_part_bytes=50_000_000, max_image_pixels=40_000_000)
RNG = np.random.default_rng(0)


def photo(h: int = 90, w: int = 120, seed: int = 0) -> Image.Image:
    """A smooth RGB image with structure (so resizes differ where they should)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (h + w)], axis=-1)
    noise = rng.integers(0, 60, (h, w, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


# ---------------------------------------------------------------- words (the reference)


def test_tokenize_lowercases_pads_and_marks_oov() -> None:
    ids = tokenize("The number SEVEN, zebra!", TEXT)
    assert ids.dtype == np.int32 and ids.shape == (8,)
    index = {t: i for i, t in enumerate(VOCABULARY)}
    assert list(ids[:4]) == [index["the"], index["number"], index["seven"], TEXT.oov_id]
    assert (ids[4:] == TEXT.pad_id).all()
    out = TEXT.apply("The number SEVEN, zebra!")
    assert list(out["attention_mask"]) == [1, 1, 1, 1, 0, 0, 0, 0]


def test_tokenize_truncates_to_max_length() -> None:
    assert tokenize("one " * 50, TEXT).shape == (8,)
    assert (tokenize("", TEXT) == TEXT.pad_id).all()


# ---------------------------------------------------------------- image


def test_prepare_image_any_mode_and_size_gives_model_shape() -> None:
    spec = ImageTransform(32, 24, 3)
    gray = Image.fromarray(np.full((5, 7), 255, dtype=np.uint8))
    rgba = Image.new("RGBA", (100, 60), (255, 0, 0, 255))
    for img in (gray, rgba):
        out = prepare_image(img, spec)
        assert out.shape == (32, 24, 3) and out.dtype == np.float32
        assert out.min() >= 0.0 and out.max() <= 1.0
    assert np.allclose(prepare_image(gray, spec), 1.0)
    red = prepare_image(rgba, spec)
    assert np.allclose(red[..., 0], 1.0) and np.allclose(red[..., 1:], 0.0)


@pytest.mark.parametrize(
    ("src", "dst"), [((8, 8), (256, 256)), ((37, 21), (64, 48)), ((9, 9), (9, 9))]
)
def test_a_grayscale_image_takes_the_short_path_to_the_same_numbers(
    src: tuple[int, int], dst: tuple[int, int]
) -> None:
    """Resizing the one band and repeating it equals converting to RGB, then resizing."""
    rng = np.random.default_rng(7)
    spec = ImageTransform(dst[1], dst[0], 3, scale=1 / 255)
    for _ in range(5):
        gray = Image.fromarray(rng.integers(0, 256, (src[1], src[0])).astype(np.uint8))
        rgb = gray.convert("RGB")
        long_way = prepare_image(rgb, spec)  # an RGB source takes the general path
        short = prepare_image(gray, spec)
        assert short.shape == long_way.shape == (dst[1], dst[0], 3)
        assert np.array_equal(short, long_way)


def test_shorter_side_crop_mean_std_bgr_nchw_equal_a_numpy_recipe() -> None:
    """The torchvision recipe (resize the shorter side to 256, center-crop 224, scale,
    normalise, CHW) and BGR, against Pillow's resize plus numpy by hand."""
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    spec = ImageTransform(
        224, 224, resize="shorter_side_crop", shorter_side=256, mean=mean, std=std,
        layout="CHW", channel_order="BGR",
    )  # fmt: skip
    img = photo(300, 400)
    got = spec.apply(img)["pixels"]
    assert got.shape == (3, 224, 224) and got.dtype == np.float32
    resized = np.asarray(img.resize((341, 256), Image.Resampling.BILINEAR), np.float32)
    top, left = (256 - 224) // 2, round((341 - 224) / 2)
    crop = resized[top : top + 224, left : left + 224] / 255.0
    want = ((crop - np.array(mean, np.float32)) / np.array(std, np.float32))[:, :, ::-1]
    np.testing.assert_allclose(got, want.transpose(2, 0, 1), atol=1e-5)


def test_opencv_semantics_equal_cv2_resize_and_differ_from_pillow() -> None:
    """OpenCV's bilinear does not antialias when shrinking; Pillow's does. A model
    trained on cv2.resize must be served with cv2's numbers."""
    img = photo(400, 600)
    cv = ImageTransform(48, 192, library="opencv", interpolation="bilinear", scale=1.0)
    pil = ImageTransform(48, 192, library="pillow", interpolation="bilinear", scale=1.0)
    want = cv2.resize(np.asarray(img), (192, 48), interpolation=cv2.INTER_LINEAR).astype(np.float32)
    np.testing.assert_array_equal(cv.apply(img)["pixels"], want)
    assert np.abs(pil.apply(img)["pixels"] - want).max() > 20
    area = ImageTransform(48, 192, library="opencv", interpolation="area", scale=1.0)
    np.testing.assert_array_equal(
        area.apply(img)["pixels"],
        cv2.resize(np.asarray(img), (192, 48), interpolation=cv2.INTER_AREA).astype(np.float32),
    )


@pytest.mark.parametrize("position", ["center", "end"])
def test_letterbox_keeps_the_aspect_and_pads_where_asked(position: str) -> None:
    spec = ImageTransform(
        64, 64, resize="letterbox", pad_value=114, pad_position=position, dtype="uint8"
    )
    img = photo(30, 60)  # twice as wide as high: 64x32 of image, 32 rows of padding
    got = spec.apply(img)["pixels"]
    assert got.shape == (64, 64, 3) and got.dtype == np.uint8
    top = 16 if position == "center" else 0
    inside = np.asarray(img.resize((64, 32), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(got[top : top + 32], inside)
    pad = np.concatenate([got[:top], got[top + 32 :]])
    assert pad.shape == (32, 64, 3) and (pad == 114).all()


def test_float16_and_gray_outputs() -> None:
    img = photo()
    half = ImageTransform(20, 30, dtype="float16").apply(img)["pixels"]
    full = ImageTransform(20, 30).apply(img)["pixels"]
    assert half.dtype == np.float16 and np.abs(half.astype(np.float32) - full).max() < 1e-3
    gray = ImageTransform(20, 30, channels=1, layout="CHW").apply(img)["pixels"]
    assert gray.shape == (1, 20, 30)


def test_bad_image_specs_are_refused_with_the_field() -> None:
    for bad, field in [
        ({"height": 0}, "height"),
        ({"resize": "zoom"}, "resize"),
        ({"interpolation": "area"}, "interpolation"),  # pillow has no "area"
        ({"mean": [0.5, 0.5]}, "mean"),
        ({"mean": [0.5], "std": [0.0]}, "std"),
        ({"dtype": "uint8", "mean": [0.5], "std": [0.5]}, "uint8"),
        ({"colour": "yes"}, "unknown keys"),
    ]:
        with pytest.raises(ModelError, match=field):
            transform_from_dict({"kind": "image", "height": 8, "width": 8, **bad})


# ---------------------------------------------------------------- image media


def _exif_rotated_jpeg(img: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return image_bytes(img, "JPEG", exif=exif.tobytes(), quality=95)


def test_exif_orientation_is_applied() -> None:
    """A phone stores the sensor's pixels and an orientation tag: 6 = turn 90 degrees
    clockwise to display. The decoded image is the upright one."""
    upright = photo(40, 80)  # wide
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # tall, as the sensor saw it
    data = _exif_rotated_jpeg(stored, 6)
    img = open_image(data, LIMITS)
    assert img.size == (80, 40)
    raw = open_image(data, LIMITS, exif=False)
    assert raw.size == (40, 80)
    # The decoded pixels turned as tag 6 says (ROTATE_270 is 90 degrees clockwise).
    np.testing.assert_array_equal(
        np.asarray(img), np.asarray(raw.transpose(Image.Transpose.ROTATE_270))
    )
    # ... which is the upright picture, up to JPEG's loss (the other way round is not).
    err = np.abs(np.asarray(img, np.int16) - np.asarray(upright, np.int16)).mean()
    wrong = np.abs(np.asarray(raw.transpose(Image.Transpose.ROTATE_90), np.int16)
                   - np.asarray(upright, np.int16)).mean()  # fmt: skip
    assert err < wrong / 2


@pytest.mark.parametrize(
    ("fmt", "ctype"),
    [("PNG", "image/png"), ("WEBP", "image/webp"), ("HEIF", "image/heic"), ("JPEG", "image/jpeg")],
)
def test_every_image_format_decodes(fmt: str, ctype: str) -> None:
    img = photo(50, 70)
    spec = ImageTransform(32, 32)
    data = image_bytes(img, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    got = spec.decode(data, ctype, {}, LIMITS)
    assert got.size == (70, 50)
    out = spec.apply(got)["pixels"]
    ref = spec.apply(img)["pixels"]
    tolerance = {"PNG": 0.0, "WEBP": 0.0, "JPEG": 0.08}.get(fmt, 0.15)
    assert np.abs(out - ref).max() <= tolerance + 1e-6, fmt


def test_a_large_jpeg_is_decoded_at_a_reduced_scale() -> None:
    big = photo(1200, 1600)
    data = image_bytes(big, "JPEG", quality=90)
    spec = ImageTransform(64, 64)
    assert spec.decode(data, "image/jpeg", {}, LIMITS).size == (200, 150)  # 1/8 scale
    full = ImageTransform(64, 64, jpeg_draft=False).decode(data, "image/jpeg", {}, LIMITS)
    assert full.size == (1600, 1200)
    crop = ImageTransform(224, 224, resize="shorter_side_crop", shorter_side=256)
    assert min(crop.decode(data, "image/jpeg", {}, LIMITS).size) >= 256


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "HEIF", "JPEG"])
def test_an_image_bomb_is_refused_from_its_header(fmt: str) -> None:
    data = image_bytes(Image.new("L" if fmt != "HEIF" else "RGB", (3000, 3000)), fmt)
    assert len(data) < 300_000
    with pytest.raises(RecordError) as info:
        open_image(data, Limits(max_image_pixels=2000 * 2000))
    assert info.value.reason == Reason.PAYLOAD_TOO_LARGE


def test_other_image_formats_are_named_and_refused() -> None:
    for fmt in ("TIFF", "GIF", "BMP"):
        with pytest.raises(RecordError, match=fmt) as info:
            open_image(image_bytes(photo(8, 8), fmt), LIMITS)
        assert info.value.reason == Reason.UNSUPPORTED_CONTENT_TYPE
    with pytest.raises(RecordError) as info:
        open_image(b"\x89PNG\r\n\x1a\n garbage", LIMITS)
    assert info.value.reason == Reason.DECODE_ERROR


# ---------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tok")
    train_wordpiece(d / "tokenizer.json")
    return d


def test_tokenizer_equals_its_own_encode_truncated_and_padded(tokenizer_dir: Path) -> None:
    from tokenizers import Tokenizer

    spec = TokenizerTransform(max_length=10, base_dir=tokenizer_dir)
    own = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    for text in ["The number SEVEN!", "", "one two three four five six seven eight nine ten"]:
        enc = own.encode(text)
        ids = enc.ids[:9] + ([own.token_to_id("[SEP]")] if len(enc.ids) > 10 else enc.ids[9:])
        ids = ids + [0] * (10 - len(ids))
        out = spec.apply(text)
        assert out["input_ids"].tolist() == ids, text
        assert out["attention_mask"].tolist() == [int(i != 0) for i in ids]
        assert out["token_type_ids"].tolist() == [0] * 10
    batch = spec.apply_batch(["seven", "the number 3", ""])
    assert batch["input_ids"].shape == (3, 10)
    assert batch["input_ids"][1].tolist() == spec.apply("the number 3")["input_ids"].tolist()


def test_a_tokenizer_file_that_is_missing_or_bad_is_a_model_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        TokenizerTransform(base_dir=tmp_path).load()
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelError, match="cannot load tokenizer"):
        TokenizerTransform(base_dir=tmp_path).load()
    with pytest.raises(ModelError, match="file name"):
        TokenizerTransform(file="../etc/tokenizer.json")


# ---------------------------------------------------------------- audio media


TONE = (0.4 * np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)).astype(np.float32)


@pytest.mark.parametrize(
    ("ctype", "subtype", "tolerance"),
    [
        ("audio/wav", "PCM_16", 1e-4),
        ("audio/wav", "PCM_24", 1e-6),
        ("audio/wav", "PCM_32", 1e-6),
        ("audio/wav", "FLOAT", 0.0),
        ("audio/wav", "PCM_U8", 0.01),
        ("audio/flac", "", 1e-4),
        ("audio/ogg", "", None),
        ("audio/mpeg", "", None),
    ],
)
def test_every_audio_format_decodes(ctype: str, subtype: str, tolerance: float | None) -> None:
    clip = read_audio(audio_bytes(TONE, 16000, ctype, subtype), LIMITS, 30.0)
    assert clip.rate == 16000 and clip.samples.dtype == np.float32
    if tolerance is not None:
        assert len(clip.samples) == len(TONE)
        assert np.abs(clip.samples - TONE).max() <= tolerance
    else:  # lossy: the same tone, found by its spectrum
        spectrum = np.abs(np.fft.rfft(clip.samples[:16000]))
        assert abs(np.argmax(spectrum) * 16000 / min(16000, len(clip.samples)) - 440) < 3


def test_opus_at_48k_is_resampled_to_the_models_rate() -> None:
    tone48 = (0.4 * np.sin(2 * np.pi * 440 * np.arange(48000) / 48000)).astype(np.float32)
    data = audio_bytes(tone48, 48000, "audio/opus")
    spec = WaveformTransform(sample_rate=16000, num_samples=16000)
    wave = spec.decode(data, "audio/opus", {}, LIMITS)
    assert wave.rate == 16000 and abs(len(wave.samples) - 16000) < 400
    spectrum = np.abs(np.fft.rfft(wave.samples[:16000]))
    assert abs(np.argmax(spectrum) - 440) < 3


def test_stereo_is_averaged_and_too_many_channels_refused() -> None:
    stereo = np.stack([TONE, -TONE * 0.5], axis=1)
    buf = io.BytesIO()
    sf.write(buf, stereo, 16000, format="WAV", subtype="FLOAT")
    clip = read_audio(buf.getvalue(), LIMITS, 30.0)
    np.testing.assert_allclose(clip.samples, TONE * 0.25, atol=1e-6)
    buf = io.BytesIO()
    sf.write(buf, np.zeros((100, 12), np.float32), 16000, format="WAV", subtype="FLOAT")
    with pytest.raises(RecordError, match="12 channels") as info:
        read_audio(buf.getvalue(), LIMITS, 30.0)
    assert info.value.reason == Reason.PAYLOAD_TOO_LARGE


def test_a_long_clip_is_refused_from_its_header_and_a_lying_header_reads_what_is_there(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    forty_s = audio_bytes(np.zeros(40 * 8000, np.float32), 8000, "audio/flac")
    real_read = sf.SoundFile.read

    def no_read(*_a: object, **_k: object) -> None:
        raise AssertionError("the samples were read")

    monkeypatch.setattr(sf.SoundFile, "read", no_read)
    with pytest.raises(RecordError, match=r"40\.0 s, over the limit 30\.0 s") as info:
        read_audio(forty_s, LIMITS, 30.0)
    assert info.value.reason == Reason.PAYLOAD_TOO_LARGE
    monkeypatch.setattr(sf.SoundFile, "read", real_read)
    # A WAV whose header declares 10 hours but that carries one second: libsndfile trusts
    # the file's length, and no more than the limit is ever read anyway.
    data = bytearray(audio_bytes(TONE, 16000))
    ten_hours = 10 * 3600 * 16000 * 2
    data[4:8] = struct.pack("<I", ten_hours + 36)
    data[40:44] = struct.pack("<I", ten_hours)
    clip = read_audio(bytes(data), LIMITS, 30.0)
    assert len(clip.samples) == 16000


def test_junk_and_aiff_are_refused_with_their_reason() -> None:
    with pytest.raises(RecordError) as info:
        read_audio(b"RIFF\x00\x00\x00\x00WAVEjunk", LIMITS, 30.0)
    assert info.value.reason == Reason.DECODE_ERROR
    buf = io.BytesIO()
    sf.write(buf, TONE, 16000, format="AIFF")
    with pytest.raises(RecordError, match="AIFF") as info:
        read_audio(buf.getvalue(), LIMITS, 30.0)
    assert info.value.reason == Reason.UNSUPPORTED_CONTENT_TYPE


# ---------------------------------------------------------------- audio transforms


def test_log_mel_peaks_at_dtmf_frequencies() -> None:
    spec = LogMelTransform()
    rng = np.random.default_rng(0)
    feats = log_mel(dtmf(1, rng), spec)
    assert feats.shape == spec.shape() == (48, 40) and feats.dtype == np.float32
    mean = feats.mean(axis=0)
    # The two strongest mel bands hold the DTMF pair (697 and 1209 Hz for "1").
    mel = 2595 * np.log10(1 + np.array(DTMF_HZ[1]) / 700)
    centers = np.linspace(0, 2595 * np.log10(1 + 8000 / 700), spec.n_mels + 2)[1:-1]
    expected = {int(np.argmin(abs(centers - m))) for m in mel}
    top2 = set(np.argsort(mean)[-2:].tolist())
    assert all(min(abs(t - e) for e in expected) <= 1 for t in top2)


def test_log_mel_of_silence_is_finite_and_batched_equals_single() -> None:
    spec = LogMelTransform()
    silence = np.zeros(spec.num_samples, dtype=np.float32)
    assert np.isfinite(log_mel(silence, spec)).all()
    rng = np.random.default_rng(1)
    waves = rng.normal(0, 0.1, (3, 5000)).astype(np.float32)  # shorter: zero-padded
    batched = log_mel(waves, spec)
    assert batched.shape == (3, 48, 40)
    assert np.allclose(batched[2], log_mel(waves[2], spec), atol=1e-5)
    media = [Waveform(w, 16000) for w in waves]
    np.testing.assert_allclose(spec.apply_batch(media)["features"][1], batched[1], atol=1e-5)


def _slaney_mel(hz: float) -> float:
    return hz / (200 / 3) if hz < 1000 else 15 + np.log(hz / 1000) / (np.log(6.4) / 27)


def _slaney_hz(mel: float) -> float:
    return mel * 200 / 3 if mel < 15 else 1000 * np.exp((mel - 15) * np.log(6.4) / 27)


def test_whisper_style_log_mel_equals_a_loop_by_loop_computation() -> None:
    """Whisper's front end (n_fft 400, hop 160, 80 Slaney mels with Slaney area norm,
    centred reflect-padded frames, last frame dropped, log10, 8 decades of range,
    (x + 4) / 4, mels first), computed here one frame and one filter at a time."""
    spec = LogMelTransform(
        num_samples=4000, frame_length=400, hop_length=160, n_fft=400, n_mels=80,
        center=True, drop_last_frame=True, mel_scale="slaney", mel_norm="slaney",
        log="log10", log_floor=1e-10, dynamic_range=8.0, offset=4.0, divisor=4.0,
        layout="mels_frames",
    )  # fmt: skip
    wave = np.random.default_rng(3).normal(0, 0.1, 3000).astype(np.float32)
    got = spec.apply(Waveform(wave, 16000))["features"]
    assert got.shape == spec.shape() == (80, 25)

    x = np.pad(np.pad(wave, (0, 1000)).astype(np.float64), 200, mode="reflect")
    window = np.hanning(401)[:-1]
    freqs = np.arange(201) * 16000 / 400
    edges = [_slaney_hz(m) for m in np.linspace(_slaney_mel(0.0), _slaney_mel(8000.0), 82)]
    filters = np.zeros((80, 201))
    for m in range(80):
        lo, c, hi = edges[m], edges[m + 1], edges[m + 2]
        for k, f in enumerate(freqs):
            filters[m, k] = max(0.0, min((f - lo) / (c - lo), (hi - f) / (hi - c)))
        filters[m] *= 2.0 / (hi - lo)
    want = np.zeros((80, 25))
    for t in range(25):
        frame = x[t * 160 : t * 160 + 400] * window
        power = np.abs(np.fft.rfft(frame)) ** 2
        want[:, t] = np.log10(np.maximum(filters @ power, 1e-10))
    want = (np.maximum(want, want.max() - 8.0) + 4.0) / 4.0
    np.testing.assert_allclose(got, want, atol=2e-4)


def test_waveform_normalises_the_real_samples_and_masks_the_padding() -> None:
    spec = WaveformTransform(sample_rate=16000, num_samples=2000, normalize="zero_mean_unit_var")
    wave = (np.random.default_rng(4).normal(0.3, 0.2, 1500)).astype(np.float32)
    out = spec.apply(Waveform(wave, 16000))
    want = (wave - wave.mean()) / np.sqrt(wave.var() + 1e-7)
    np.testing.assert_allclose(out["waveform"][:1500], want, atol=1e-5)
    assert (out["waveform"][1500:] == 0).all()
    assert out["attention_mask"].tolist() == [1] * 1500 + [0] * 500
    long = spec.apply(Waveform(np.ones(5000, np.float32), 16000))
    assert long["waveform"].shape == (2000,) and long["attention_mask"].all()
    peak = WaveformTransform(num_samples=100, normalize="peak").apply(Waveform(wave[:100], 16000))
    assert abs(float(np.abs(peak["waveform"]).max()) - 1.0) < 1e-6


def test_resample_keeps_tone_frequency() -> None:
    t = np.arange(8000) / 8000.0
    tone = np.sin(2 * np.pi * 1000 * t).astype(np.float32)
    up = resample(tone, 8000, 16000)
    assert len(up) == 16000
    spectrum = np.abs(np.fft.rfft(up))
    assert abs(np.argmax(spectrum) * 16000 / len(up) - 1000) < 2


# ---------------------------------------------------------------- (de)serialising


def test_transforms_round_trip_and_refuse_unknown_keys_and_kinds(tokenizer_dir: Path) -> None:
    for spec in (
        ImageTransform(64, 64, mean=(0.5,), std=(0.5,)),
        TEXT,
        LogMelTransform(),
        WaveformTransform(),
    ):
        assert transform_from_dict(spec.to_dict()) == spec
    tok = TokenizerTransform(max_length=12)
    assert transform_from_dict(tok.to_dict(), tokenizer_dir) == tok
    assert "base_dir" not in tok.to_dict()
    with pytest.raises(ModelError, match="unknown keys"):
        transform_from_dict({**ImageTransform(8, 8).to_dict(), "colour": "yes"})
    with pytest.raises(ModelError, match="unknown transform kind"):
        transform_from_dict({"kind": "video"})
    with pytest.raises(ModelError, match="max_length must be int"):
        transform_from_dict({"kind": "tokenizer", "max_length": "12"})


def test_format_1_preprocessing_is_read_as_today_s_transforms() -> None:
    image = transform_from_dict(
        {"kind": "image", "height": 8, "width": 8, "channels": 3, "scale": 1 / 255,
         "resample": "bilinear"},
        legacy=True,
    )  # fmt: skip
    assert image == ImageTransform(8, 8)
    text = transform_from_dict(
        {"kind": "text", "vocabulary": ["<pad>", "<oov>", "a"], "max_length": 4, "pad_id": 0,
         "oov_id": 1, "max_chars": 10, "lowercase": True, "token_pattern": "[a-z]+"},
        legacy=True,
    )  # fmt: skip
    assert isinstance(text, WordsTransform) and text.max_length == 4
    audio = transform_from_dict({**LogMelTransform().to_dict(), "kind": "audio"}, legacy=True)
    assert audio == LogMelTransform()


# ---------------------------------------------------------------- hostile media, found by review


def test_a_jpeg_whose_exif_value_is_corrupt_is_a_decode_error() -> None:
    """A mutated EXIF block makes Pillow's exif_transpose raise struct.error (found by a
    fuzz run); the part is dead-lettered, the worker goes on."""
    data = (Path(__file__).parent / "data" / "corrupt-exif.jpg").read_bytes()
    with pytest.raises(RecordError) as info:
        ImageTransform(16, 16).decode(data, "image/jpeg", {}, LIMITS)
    assert info.value.reason == Reason.DECODE_ERROR


def test_a_thin_picture_is_not_blown_up_by_a_center_crop() -> None:
    """20 000 x 2 pixels is little (under the pixel limit), but its shorter side to 256
    would make a 2 560 000 x 256 picture before the crop: refused before resizing."""
    thin = image_bytes(Image.new("L", (20000, 2)), "PNG")
    crop = ImageTransform(224, 224, resize="shorter_side_crop", shorter_side=256)
    with pytest.raises(RecordError, match="would be resized to 2560000x256") as info:
        crop.decode(thin, "image/png", {}, Limits(max_image_pixels=4096 * 4096))
    assert info.value.reason == Reason.PAYLOAD_TOO_LARGE
    assert ImageTransform(224, 224).decode(thin, "image/png", {}, LIMITS).size == (20000, 2)


def test_a_16_bit_gray_png_is_scaled_not_clipped() -> None:
    half = Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16))
    assert half.mode.startswith("I")
    got = ImageTransform(4, 4).apply(open_image(image_bytes(half, "PNG"), LIMITS))["pixels"]
    np.testing.assert_allclose(got, 128 / 255, atol=1e-6)


def test_audio_that_does_not_declare_its_length_or_declares_a_silly_rate_is_refused() -> None:
    flac = bytearray(audio_bytes(TONE, 16000, "audio/flac"))
    flac[21] &= 0xF0  # STREAMINFO's total samples: 0, "unknown" (a FLAC written as a stream)
    flac[22:26] = b"\x00\x00\x00\x00"
    with pytest.raises(RecordError, match="does not declare its length") as info:
        read_audio(bytes(flac), LIMITS, 30.0)
    assert info.value.reason == Reason.DECODE_ERROR
    wav = bytearray(audio_bytes(TONE, 16000))
    wav[24:28] = struct.pack("<I", 655_350)
    with pytest.raises(RecordError, match="655350 Hz") as info:
        read_audio(bytes(wav), LIMITS, 30.0)
    assert info.value.reason == Reason.DECODE_ERROR


def test_a_long_clip_is_read_in_blocks_and_stops_past_the_limit() -> None:
    """A WAV whose header says 20 s but that holds 40: reading stops past 30 s."""
    data = bytearray(audio_bytes(np.zeros(40 * 8000, np.float32), 8000))
    declared = 20 * 8000 * 2
    data[40:44] = struct.pack("<I", declared)
    clip = read_audio(bytes(data), LIMITS, 30.0)
    assert len(clip.samples) == 20 * 8000  # what the header declares, no more
    stereo = np.stack([TONE, TONE], axis=1)
    long = io.BytesIO()
    sf.write(long, np.tile(stereo, (5, 1)), 16000, format="WAV", subtype="PCM_16")
    assert len(read_audio(long.getvalue(), LIMITS, 30.0).samples) == 80000


def test_a_tokenizer_with_no_room_for_text_or_a_bad_pad_id_is_refused(tokenizer_dir: Path) -> None:
    with pytest.raises(ModelError, match="leaves no room for text beside its 2 special"):
        TokenizerTransform(max_length=2, base_dir=tokenizer_dir).load()
    with pytest.raises(ModelError, match="pad_id -1 is outside"):
        TokenizerTransform(pad_id=-1, base_dir=tokenizer_dir).load()
    with pytest.raises(ModelError, match="kind must be a string"):
        transform_from_dict({"kind": ["image"]})
