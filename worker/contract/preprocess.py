"""Numpy preprocessing shared by training (``export``) and serving (``worker``).

There is exactly one implementation of each transform, here, so the tensors a
model was trained on and the tensors the worker feeds it cannot drift apart.
Each modality has a frozen spec (stored in the model manifest) and a function
that turns decoded media into the model's per-example input:

* image: a PIL image of any size, grayscale or RGB -> float32 ``[H, W, C]`` in
  ``[0, 1]`` (bilinear resize, then ``* scale``);
* text: a string -> int32 ``[max_length]`` token ids (lowercase, words of
  ``[a-z0-9']``, vocabulary lookup, OOV id, right padding with the pad id);
* audio: a mono float waveform at ``sample_rate`` -> float32
  ``[frames, n_mels]`` log-mel features (crop/zero-pad to ``num_samples``,
  Hann window, power spectrum, HTK mel filterbank, ``log(max(x, floor))``).
"""

from __future__ import annotations

import functools
import re
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from worker.contract.errors import ModelError

F32 = NDArray[np.float32]

_WORD = re.compile(r"[a-z0-9']+")


def _from_dict(cls: type[Any], data: dict[str, Any]) -> Any:
    known = set(cls.__dataclass_fields__) - {"kind"}
    unknown = set(data) - known - {"kind"}
    if unknown:
        raise ModelError(f"{cls.__name__}: unknown keys {sorted(unknown)}")
    missing = {n for n in known if n not in data}
    if missing:
        raise ModelError(f"{cls.__name__}: missing keys {sorted(missing)}")
    return cls(**{k: data[k] for k in known})


@dataclass(frozen=True)
class ImageSpec:
    """How an image becomes the model's ``[height, width, channels]`` float32 input.

    Attributes:
        height, width: the model's image size in pixels.
        channels: 1 (grayscale) or 3 (RGB); inputs are converted to this.
        scale: multiplier applied to 0..255 pixel values (1/255 gives [0, 1]).
    """

    height: int
    width: int
    channels: int = 3
    scale: float = 1.0 / 255.0

    kind = "image"

    def shape(self) -> tuple[int, ...]:
        return (self.height, self.width, self.channels)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "resample": "bilinear", **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ImageSpec:
        data = {k: v for k, v in data.items() if k != "resample"}
        spec: ImageSpec = _from_dict(cls, data)
        return spec


@dataclass(frozen=True)
class TextSpec:
    """How a string becomes the model's ``[max_length]`` int32 token ids.

    Attributes:
        vocabulary: token strings; a token's id is its index.
        max_length: ids per example; longer texts are truncated, shorter padded.
        pad_id: id used for padding (the model masks it out).
        oov_id: id of words not in the vocabulary.
        max_chars: texts longer than this are refused before tokenising.
    """

    vocabulary: tuple[str, ...]
    max_length: int = 16
    pad_id: int = 0
    oov_id: int = 1
    max_chars: int = 4096

    kind = "text"

    def shape(self) -> tuple[int, ...]:
        return (self.max_length,)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["vocabulary"] = list(self.vocabulary)
        return {"kind": self.kind, "lowercase": True, "token_pattern": _WORD.pattern, **d}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TextSpec:
        data = {k: v for k, v in data.items() if k not in ("lowercase", "token_pattern")}
        data["vocabulary"] = tuple(data.get("vocabulary", ()))
        spec: TextSpec = _from_dict(cls, data)
        return spec

    @functools.cached_property
    def index(self) -> dict[str, int]:
        return {tok: i for i, tok in enumerate(self.vocabulary)}


@dataclass(frozen=True)
class AudioSpec:
    """How a waveform becomes the model's ``[frames, n_mels]`` log-mel features.

    Attributes:
        sample_rate: rate the features are computed at (Hz); other rates are resampled.
        num_samples: the waveform is cropped or zero-padded to this many samples.
        frame_length, hop_length, n_fft: STFT window, hop and FFT size in samples.
        n_mels, fmin, fmax: mel filterbank (HTK mel scale), in Hz.
        log_floor: powers below this are clamped before the log (silence is finite).
        max_seconds: clips longer than this are refused before decoding.
    """

    sample_rate: int = 16000
    num_samples: int = 8000
    frame_length: int = 400
    hop_length: int = 160
    n_fft: int = 512
    n_mels: int = 40
    fmin: float = 0.0
    fmax: float = 8000.0
    log_floor: float = 1e-6
    max_seconds: float = 30.0

    kind = "audio"

    @property
    def frames(self) -> int:
        return 1 + (self.num_samples - self.frame_length) // self.hop_length

    def shape(self) -> tuple[int, ...]:
        return (self.frames, self.n_mels)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "window": "hann", "mel_scale": "htk", **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AudioSpec:
        data = {k: v for k, v in data.items() if k not in ("window", "mel_scale")}
        spec: AudioSpec = _from_dict(cls, data)
        return spec


Spec = ImageSpec | TextSpec | AudioSpec


def spec_from_dict(data: dict[str, Any]) -> Spec:
    """Build the spec named by ``data["kind"]`` (``image``, ``text`` or ``audio``)."""
    kinds: dict[str, type[ImageSpec] | type[TextSpec] | type[AudioSpec]] = {
        "image": ImageSpec,
        "text": TextSpec,
        "audio": AudioSpec,
    }
    kind = data.get("kind")
    if kind not in kinds:
        raise ModelError(f"unknown preprocessing kind {kind!r}; expected one of {sorted(kinds)}")
    return kinds[str(kind)].from_dict(data)


# ---------------------------------------------------------------- image


def prepare_image(img: Image.Image, spec: ImageSpec) -> F32:
    """A PIL image (any size and mode) -> float32 ``[height, width, channels]``."""
    mode = "L" if spec.channels == 1 else "RGB"
    size = (spec.width, spec.height)
    if img.mode == "L" and mode == "RGB":
        # A grayscale source: converting to RGB copies its one band three times, and
        # resizing works band by band, so resize and scale the one band, then repeat it
        # (the same numbers, a third of the work).
        if img.size != size:
            img = img.resize(size, Image.Resampling.BILINEAR)
        gray = np.asarray(img, dtype=np.float32) * np.float32(spec.scale)
        return np.repeat(gray[:, :, None], 3, axis=2).reshape(spec.shape())
    if img.mode != mode:
        img = img.convert(mode)
    if img.size != size:
        img = img.resize(size, Image.Resampling.BILINEAR)
    arr = np.asarray(img, dtype=np.float32) * np.float32(spec.scale)
    return arr.reshape(spec.shape())


def image_from_pixels(pixels: NDArray[np.uint8]) -> Image.Image:
    """A uint8 ``[H, W]`` or ``[H, W, 3]`` array -> PIL image (the training path)."""
    return Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8))


# ---------------------------------------------------------------- text


def tokenize(text: str, spec: TextSpec) -> NDArray[np.int32]:
    """A string -> int32 ``[max_length]`` ids, padded with ``pad_id``."""
    ids = np.full(spec.max_length, spec.pad_id, dtype=np.int32)
    index = spec.index
    words = _WORD.findall(text.lower())[: spec.max_length]
    for i, word in enumerate(words):
        ids[i] = index.get(word, spec.oov_id)
    return ids


# ---------------------------------------------------------------- audio


def _hz_to_mel(hz: NDArray[np.float64]) -> NDArray[np.float64]:
    return 2595.0 * np.log10(1.0 + hz / 700.0)


def _mel_to_hz(mel: NDArray[np.float64]) -> NDArray[np.float64]:
    return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)


@functools.lru_cache(maxsize=8)
def _mel_filterbank(spec: AudioSpec) -> F32:
    """Triangular HTK-mel filters, ``[n_fft // 2 + 1, n_mels]``."""
    n_bins = spec.n_fft // 2 + 1
    fft_hz = np.linspace(0.0, spec.sample_rate / 2.0, n_bins)
    lo, hi = _hz_to_mel(np.array([spec.fmin, spec.fmax], dtype=np.float64))
    mel_edges = np.linspace(lo, hi, spec.n_mels + 2)
    hz_edges = _mel_to_hz(mel_edges)
    lower, center, upper = hz_edges[:-2], hz_edges[1:-1], hz_edges[2:]
    up = (fft_hz[:, None] - lower[None, :]) / np.maximum(center - lower, 1e-9)[None, :]
    down = (upper[None, :] - fft_hz[:, None]) / np.maximum(upper - center, 1e-9)[None, :]
    return np.maximum(0.0, np.minimum(up, down)).astype(np.float32)


@functools.lru_cache(maxsize=8)
def _window(frame_length: int) -> F32:
    return np.hanning(frame_length + 1)[:-1].astype(np.float32)


def fit_length(wave: F32, num_samples: int) -> F32:
    """Crop or zero-pad the last axis to ``num_samples``."""
    n = wave.shape[-1]
    if n >= num_samples:
        return wave[..., :num_samples]
    pad = [(0, 0)] * (wave.ndim - 1) + [(0, num_samples - n)]
    padded: F32 = np.pad(wave, pad)
    return padded


def log_mel(wave: F32, spec: AudioSpec) -> F32:
    """Mono waveform(s) ``[..., samples]`` at ``spec.sample_rate`` -> ``[..., frames, n_mels]``."""
    wave = fit_length(np.asarray(wave, dtype=np.float32), spec.num_samples)
    frames = np.lib.stride_tricks.sliding_window_view(wave, spec.frame_length, axis=-1)
    frames = frames[..., :: spec.hop_length, :] * _window(spec.frame_length)
    power = np.abs(np.fft.rfft(frames, n=spec.n_fft, axis=-1)).astype(np.float32) ** 2
    mel = power @ _mel_filterbank(spec)
    features: F32 = np.log(np.maximum(mel, np.float32(spec.log_floor))).astype(np.float32)
    return features


def resample(wave: F32, src_rate: int, dst_rate: int) -> F32:
    """Linear-interpolation resampling of a mono waveform (adequate for speech-band tones)."""
    if src_rate == dst_rate:
        return wave.astype(np.float32, copy=False)
    n_out = round(len(wave) * dst_rate / src_rate)
    t_out = np.arange(n_out, dtype=np.float64) * (src_rate / dst_rate)
    return np.interp(t_out, np.arange(len(wave)), wave).astype(np.float32)


def blank_input(spec: Spec) -> NDArray[Any]:
    """What an absent modality looks like to the model (as in training's dropped inputs):
    a black image, an all-padding text, silence."""
    if isinstance(spec, ImageSpec):
        return np.zeros(spec.shape(), dtype=np.float32)
    if isinstance(spec, TextSpec):
        return tokenize("", spec)
    return log_mel(np.zeros(spec.num_samples, dtype=np.float32), spec)
