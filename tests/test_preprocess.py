"""The shared numpy preprocessing: shapes, dtypes and the properties serving relies on."""

import numpy as np
import pytest
from PIL import Image

from worker.contract.errors import ModelError
from worker.contract.preprocess import (
    AudioSpec,
    ImageSpec,
    TextSpec,
    log_mel,
    prepare_image,
    resample,
    spec_from_dict,
    tokenize,
)
from worker.contract.reference_data import DTMF_HZ, VOCABULARY, dtmf

TEXT = TextSpec(VOCABULARY, max_length=8)


def test_tokenize_lowercases_pads_and_marks_oov() -> None:
    ids = tokenize("The number SEVEN, zebra!", TEXT)
    assert ids.dtype == np.int32 and ids.shape == (8,)
    index = {t: i for i, t in enumerate(VOCABULARY)}
    assert list(ids[:4]) == [index["the"], index["number"], index["seven"], TEXT.oov_id]
    assert (ids[4:] == TEXT.pad_id).all()


def test_tokenize_truncates_to_max_length() -> None:
    assert tokenize("one " * 50, TEXT).shape == (8,)
    assert (tokenize("", TEXT) == TEXT.pad_id).all()


def test_prepare_image_any_mode_and_size_gives_model_shape() -> None:
    spec = ImageSpec(32, 24, 3)
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
    spec = ImageSpec(dst[1], dst[0], 3, scale=1 / 255)
    for _ in range(5):
        gray = Image.fromarray(rng.integers(0, 256, (src[1], src[0])).astype(np.uint8))
        rgb = gray.convert("RGB")
        assert rgb.mode == "RGB" and gray.mode == "L"
        long_way = prepare_image(rgb, spec)  # an RGB source takes the general path
        short = prepare_image(gray, spec)
        assert short.shape == long_way.shape == (dst[1], dst[0], 3)
        assert np.array_equal(short, long_way)


def test_log_mel_peaks_at_dtmf_frequencies() -> None:
    spec = AudioSpec()
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
    spec = AudioSpec()
    silence = np.zeros(spec.num_samples, dtype=np.float32)
    assert np.isfinite(log_mel(silence, spec)).all()
    rng = np.random.default_rng(1)
    waves = rng.normal(0, 0.1, (3, 5000)).astype(np.float32)  # shorter: zero-padded
    batched = log_mel(waves, spec)
    assert batched.shape == (3, 48, 40)
    assert np.allclose(batched[2], log_mel(waves[2], spec), atol=1e-5)


def test_resample_keeps_tone_frequency() -> None:
    t = np.arange(8000) / 8000.0
    tone = np.sin(2 * np.pi * 1000 * t).astype(np.float32)
    up = resample(tone, 8000, 16000)
    assert len(up) == 16000
    spectrum = np.abs(np.fft.rfft(up))
    assert abs(np.argmax(spectrum) * 16000 / len(up) - 1000) < 2


def test_specs_round_trip_and_reject_unknown_keys() -> None:
    for spec in (ImageSpec(64, 64), TEXT, AudioSpec()):
        assert spec_from_dict(spec.to_dict()) == spec
    with pytest.raises(ModelError, match="unknown keys"):
        spec_from_dict({**ImageSpec(8, 8).to_dict(), "colour": "yes"})
    with pytest.raises(ModelError, match="unknown preprocessing kind"):
        spec_from_dict({"kind": "video"})
