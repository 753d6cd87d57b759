"""Audio transforms: a clip in any supported format -> the model's waveform or log-mel.

Every clip is decoded to mono float32 (channels averaged) and resampled to the
transform's ``sample_rate`` with soxr, then:

* ``waveform`` (wav2vec-style encoders): cropped or zero-padded to ``num_samples``,
  optionally normalised (``peak``, or ``zero_mean_unit_var`` over the real samples as
  Hugging Face's wav2vec2 feature extractor does); also makes an ``attention_mask``
  (1 for real samples, 0 for padding).
* ``log_mel`` (the reference model; Whisper-style front ends with their parameters):
  cropped or padded to ``num_samples``, framed (``center``: reflect-padded by
  ``n_fft // 2`` as torch.stft/librosa do), windowed, power spectrum, mel filterbank
  (HTK or Slaney scale, optional Slaney area normalisation), then ``ln``, ``log10`` or
  ``db`` of ``max(x, log_floor)``, an optional dynamic-range clamp below the maximum,
  ``(x + offset) / divisor``, as ``[frames, n_mels]`` or ``[n_mels, frames]``.
  Whisper's front end: ``n_fft=400, hop_length=160, frame_length=400, n_mels=80,
  center=true, drop_last_frame=true, mel_scale=slaney, mel_norm=slaney, log=log10,
  log_floor=1e-10, dynamic_range=8, offset=4, divisor=4, layout=mels_frames``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from numpy.typing import NDArray

from worker.contract.errors import Reason, RecordError
from worker.contract.transforms.base import Parameters, TensorOut, check, one_of
from worker.contract.transforms.media import (
    AUDIO_TYPES,
    Limits,
    Waveform,
    read_audio,
)

F32 = NDArray[np.float32]

FEATURES = "features"
WAVEFORM = "waveform"
ATTENTION_MASK = "attention_mask"
WINDOWS = ("hann", "hamming")
MEL_SCALES = ("htk", "slaney")
MEL_NORMS = ("none", "slaney")
LOGS = ("ln", "log10", "db")
MEL_LAYOUTS = ("frames_mels", "mels_frames")
NORMALIZE = ("none", "peak", "zero_mean_unit_var")


def resample(wave: F32, src_rate: int, dst_rate: int) -> F32:
    """A mono waveform from ``src_rate`` to ``dst_rate`` Hz (soxr, high quality)."""
    if src_rate == dst_rate:
        return np.asarray(wave, dtype=np.float32)
    import soxr

    out: F32 = soxr.resample(np.asarray(wave, dtype=np.float32), src_rate, dst_rate)
    return out


def fit_length(wave: F32, num_samples: int) -> F32:
    """Crop or zero-pad the last axis to ``num_samples``."""
    n = wave.shape[-1]
    if n >= num_samples:
        return wave[..., :num_samples]
    pad = [(0, 0)] * (wave.ndim - 1) + [(0, num_samples - n)]
    padded: F32 = np.pad(wave, pad)
    return padded


def _decode(value: bytes, limits: Limits, max_seconds: float, rate: int) -> F32:
    clip = read_audio(value, limits, max_seconds)
    try:
        return resample(clip.samples, clip.rate, rate)
    except (ValueError, MemoryError, RuntimeError) as exc:
        raise RecordError(
            Reason.DECODE_ERROR, f"cannot resample audio at {clip.rate} Hz: {exc}"
        ) from exc


def _sample_wave(rate: int, num_samples: int, rng: np.random.Generator) -> Waveform:
    """Noise at a random level, between half and one and a half times the model's length."""
    n = int(rng.integers(max(1, num_samples // 2), num_samples * 3 // 2 + 1))
    level = float(rng.uniform(0.01, 0.5))
    return Waveform((rng.standard_normal(n) * level).clip(-1, 1).astype(np.float32), rate)


class _Clip(Parameters):
    """The audio family: a clip decoded (limits from its header), resampled to the
    transform's ``sample_rate``; silence is blank; noise is a sample."""

    sample_rate: int
    num_samples: int
    max_seconds: float

    def __post_init__(self) -> None:
        for name in ("sample_rate", "num_samples", "max_seconds"):
            check(getattr(self, name) > 0, type(self), f"{name} must be > 0")

    def content_types(self) -> tuple[str, ...]:
        return AUDIO_TYPES

    def decode(self, value: bytes, media: str, params: dict[str, str], limits: Limits) -> Waveform:
        wave = _decode(value, limits, self.max_seconds, self.sample_rate)
        return Waveform(wave, self.sample_rate)

    def blank_media(self) -> Waveform:
        return Waveform(np.zeros(self.num_samples, np.float32), self.sample_rate)

    def sample_media(self, rng: np.random.Generator) -> Waveform:
        return _sample_wave(self.sample_rate, self.num_samples, rng)


@dataclass(frozen=True)
class LogMelTransform(_Clip):
    """How a clip becomes ``[frames, n_mels]`` (or ``[n_mels, frames]``) log-mel features.

    Attributes:
        sample_rate: the features' rate (Hz); other rates are resampled.
        num_samples: the waveform is cropped or zero-padded to this many samples.
        frame_length, hop_length, n_fft: STFT window, hop and FFT size in samples.
        n_mels, fmin, fmax: the mel filterbank, in Hz.
        window: ``hann`` or ``hamming`` (periodic, as torch's and librosa's).
        center: reflect-pad ``n_fft // 2`` samples at both ends before framing.
        drop_last_frame: drop the last frame (Whisper does).
        mel_scale: ``htk`` or ``slaney``; mel_norm: ``none`` or ``slaney``.
        log: ``ln``, ``log10`` or ``db`` (10 log10) of ``max(power, log_floor)``.
        dynamic_range: > 0: clamp to at least the maximum minus this (in log units).
        offset, divisor: ``(x + offset) / divisor`` at the end.
        layout: ``frames_mels`` or ``mels_frames``.
        max_seconds: longer clips are refused before decoding.
    """

    sample_rate: int = 16000
    num_samples: int = 8000
    frame_length: int = 400
    hop_length: int = 160
    n_fft: int = 512
    n_mels: int = 40
    fmin: float = 0.0
    fmax: float = 8000.0
    window: str = "hann"
    center: bool = False
    drop_last_frame: bool = False
    mel_scale: str = "htk"
    mel_norm: str = "none"
    log: str = "ln"
    log_floor: float = 1e-6
    dynamic_range: float = 0.0
    offset: float = 0.0
    divisor: float = 1.0
    layout: str = "frames_mels"
    max_seconds: float = 30.0

    kind: ClassVar[str] = "log_mel"
    family: ClassVar[str] = "audio"

    def __post_init__(self) -> None:
        super().__post_init__()
        cls = type(self)
        for name in ("frame_length", "hop_length", "n_fft"):
            check(getattr(self, name) > 0, cls, f"{name} must be > 0")
        check(self.n_mels > 0, cls, "n_mels must be > 0")
        check(self.frame_length <= self.n_fft, cls, "frame_length must be <= n_fft")
        check(
            0 <= self.fmin < self.fmax <= self.sample_rate / 2,
            cls,
            "need 0 <= fmin < fmax <= sample_rate/2",
        )
        one_of(cls, "window", self.window, WINDOWS)
        one_of(cls, "mel_scale", self.mel_scale, MEL_SCALES)
        one_of(cls, "mel_norm", self.mel_norm, MEL_NORMS)
        one_of(cls, "log", self.log, LOGS)
        one_of(cls, "layout", self.layout, MEL_LAYOUTS)
        check(self.log_floor > 0, cls, "log_floor must be > 0")
        check(self.divisor != 0, cls, "divisor must not be 0")
        check(self.dynamic_range >= 0, cls, "dynamic_range must be >= 0")
        check(self.frames > 0, cls, "num_samples gives no frame")

    @property
    def frames(self) -> int:
        n = self.num_samples + (2 * (self.n_fft // 2) if self.center else 0)
        width = self.n_fft if self.center else self.frame_length
        return 1 + (n - width) // self.hop_length - (1 if self.drop_last_frame else 0)

    def shape(self) -> tuple[int, ...]:
        if self.layout == "mels_frames":
            return (self.n_mels, self.frames)
        return (self.frames, self.n_mels)

    def outputs(self) -> dict[str, TensorOut]:
        return {FEATURES: TensorOut(self.shape(), "float")}

    def apply(self, media: Waveform) -> dict[str, NDArray[Any]]:
        return {FEATURES: log_mel(_at_rate(media, self.sample_rate), self)}

    def apply_batch(self, media: Sequence[Waveform]) -> dict[str, NDArray[Any]]:
        waves = np.stack(
            [fit_length(_at_rate(m, self.sample_rate), self.num_samples) for m in media]
        )
        return {FEATURES: log_mel(waves, self)}


def _at_rate(media: Waveform, rate: int) -> F32:
    return resample(media.samples, media.rate, rate)


def _hz_to_mel(hz: NDArray[np.float64], scale: str) -> NDArray[np.float64]:
    if scale == "htk":
        return 2595.0 * np.log10(1.0 + hz / 700.0)
    # Slaney (librosa's default, Whisper's): linear below 1 kHz, logarithmic above.
    f_sp, min_log_hz, logstep = 200.0 / 3, 1000.0, np.log(6.4) / 27.0
    lin = hz / f_sp
    logpart = min_log_hz / f_sp + np.log(np.maximum(hz, 1e-10) / min_log_hz) / logstep
    return np.where(hz >= min_log_hz, logpart, lin)


def _mel_to_hz(mel: NDArray[np.float64], scale: str) -> NDArray[np.float64]:
    if scale == "htk":
        return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)
    f_sp, min_log_hz, logstep = 200.0 / 3, 1000.0, np.log(6.4) / 27.0
    min_log_mel = min_log_hz / f_sp
    return np.where(
        mel >= min_log_mel, min_log_hz * np.exp(logstep * (mel - min_log_mel)), f_sp * mel
    )


@functools.lru_cache(maxsize=16)
def mel_filterbank(spec: LogMelTransform) -> F32:
    """Triangular mel filters, ``[n_fft // 2 + 1, n_mels]``."""
    n_bins = spec.n_fft // 2 + 1
    fft_hz = np.linspace(0.0, spec.sample_rate / 2.0, n_bins)
    lo, hi = _hz_to_mel(np.array([spec.fmin, spec.fmax], dtype=np.float64), spec.mel_scale)
    hz_edges = _mel_to_hz(np.linspace(lo, hi, spec.n_mels + 2), spec.mel_scale)
    lower, center, upper = hz_edges[:-2], hz_edges[1:-1], hz_edges[2:]
    up = (fft_hz[:, None] - lower[None, :]) / np.maximum(center - lower, 1e-9)[None, :]
    down = (upper[None, :] - fft_hz[:, None]) / np.maximum(upper - center, 1e-9)[None, :]
    weights = np.maximum(0.0, np.minimum(up, down))
    if spec.mel_norm == "slaney":
        weights *= (2.0 / (upper - lower))[None, :]
    return weights.astype(np.float32)


@functools.lru_cache(maxsize=16)
def _window(kind: str, frame_length: int, n_fft: int) -> F32:
    """The periodic window, centred in ``n_fft`` samples (zeros around it)."""
    n = np.arange(frame_length)
    a = 0.5 if kind == "hann" else 0.54
    win = a - (1 - a) * np.cos(2 * np.pi * n / frame_length)
    left = (n_fft - frame_length) // 2
    out = np.zeros(n_fft, dtype=np.float32)
    out[left : left + frame_length] = win
    return out


def log_mel(wave: F32, spec: LogMelTransform) -> F32:
    """Mono waveform(s) ``[..., samples]`` at ``spec.sample_rate`` -> features of
    :meth:`LogMelTransform.shape` (with the leading axes kept)."""
    wave = fit_length(np.asarray(wave, dtype=np.float32), spec.num_samples)
    if spec.center:
        pad = [(0, 0)] * (wave.ndim - 1) + [(spec.n_fft // 2, spec.n_fft // 2)]
        wave = np.pad(wave, pad, mode="reflect")
        width, window = spec.n_fft, _window(spec.window, spec.frame_length, spec.n_fft)
    else:
        # Frames of frame_length, zero-padded to n_fft by rfft (the reference model's).
        width, window = (
            spec.frame_length,
            _window(spec.window, spec.frame_length, spec.frame_length),
        )
    frames = np.lib.stride_tricks.sliding_window_view(wave, width, axis=-1)
    frames = frames[..., :: spec.hop_length, :][..., : spec.frames, :] * window
    power = np.abs(np.fft.rfft(frames, n=spec.n_fft, axis=-1)).astype(np.float32) ** 2
    mel = np.maximum(power @ mel_filterbank(spec), np.float32(spec.log_floor))
    if spec.log == "ln":
        feats = np.log(mel)
    elif spec.log == "log10":
        feats = np.log10(mel)
    else:
        feats = 10.0 * np.log10(mel)
    if spec.dynamic_range > 0:
        top = feats.max(axis=(-2, -1), keepdims=True)
        feats = np.maximum(feats, top - np.float32(spec.dynamic_range))
    if spec.offset != 0.0 or spec.divisor != 1.0:
        feats = (feats + np.float32(spec.offset)) / np.float32(spec.divisor)
    if spec.layout == "mels_frames":
        feats = np.swapaxes(feats, -1, -2)
    out: F32 = np.ascontiguousarray(feats, dtype=np.float32)
    return out


@dataclass(frozen=True)
class WaveformTransform(_Clip):
    """How a clip becomes the raw ``[num_samples]`` waveform a wav2vec-style model takes.

    Attributes:
        sample_rate: the model's rate (Hz); other rates are resampled.
        num_samples: cropped or zero-padded to this many samples.
        normalize: ``none``; ``peak`` (divided by its largest absolute value);
            ``zero_mean_unit_var`` over the real samples, before the padding,
            ``(x - mean) / sqrt(var + 1e-7)`` (Hugging Face's wav2vec2 extractor).
        max_seconds: longer clips are refused before decoding.
    """

    sample_rate: int = 16000
    num_samples: int = 16000
    normalize: str = "none"
    max_seconds: float = 30.0

    kind: ClassVar[str] = "waveform"
    family: ClassVar[str] = "audio"

    def __post_init__(self) -> None:
        super().__post_init__()
        one_of(type(self), "normalize", self.normalize, NORMALIZE)

    def shape(self) -> tuple[int, ...]:
        return (self.num_samples,)

    def outputs(self) -> dict[str, TensorOut]:
        return {
            WAVEFORM: TensorOut(self.shape(), "float"),
            ATTENTION_MASK: TensorOut(self.shape(), "int"),
        }

    def apply(self, media: Waveform) -> dict[str, NDArray[Any]]:
        wave = _at_rate(media, self.sample_rate)[: self.num_samples]
        n = len(wave)
        if self.normalize == "peak":
            peak = float(np.abs(wave).max()) if n else 0.0
            wave = wave / np.float32(peak) if peak > 0 else wave
        elif self.normalize == "zero_mean_unit_var" and n:
            wave = (wave - wave.mean()) / np.sqrt(wave.var() + np.float32(1e-7))
        mask = np.zeros(self.num_samples, dtype=np.int64)
        mask[:n] = 1
        return {
            WAVEFORM: fit_length(np.asarray(wave, np.float32), self.num_samples),
            ATTENTION_MASK: mask,
        }
