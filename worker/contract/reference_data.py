"""The reference task, "digits seen, read and heard": raw samples, no download.

Each sample is one digit 0-9 in three modalities:

* image: a handwritten digit from scikit-learn's bundled ``load_digits``
  (8x8, 16 gray levels), as uint8 0..255;
* text: a short English phrase naming the digit ("seven", "the number 7", "Seven!");
* audio: the digit's DTMF tone pair (ITU-T Q.23), mono float32 at 16 kHz,
  about 0.5 s, with random gain, phase, onset and noise.

Training corrupts each modality independently (noise, blank, unrelated text)
so that no single modality suffices. Used by ``export`` to train the model and
by ``mmstream produce`` to generate traffic; scikit-learn is imported lazily.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from worker.contract.errors import ModelError
from worker.contract.manifest import Manifest
from worker.contract.transforms import Waveform

LABELS: tuple[str, ...] = tuple(str(d) for d in range(10))
MODALITIES: tuple[str, ...] = ("image", "text", "audio")

# ITU-T Q.23 DTMF: (row/low Hz, column/high Hz) per digit.
DTMF_HZ: dict[int, tuple[float, float]] = {
    1: (697, 1209), 2: (697, 1336), 3: (697, 1477),
    4: (770, 1209), 5: (770, 1336), 6: (770, 1477),
    7: (852, 1209), 8: (852, 1336), 9: (852, 1477),
    0: (941, 1336),
}  # fmt: skip

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_TEMPLATES = (
    "{w}",
    "{W}!",
    "the number {d}",
    "number {w}",
    "digit {d}",
    "it is {w}",
    "this is a {w}",
    "{d}",
    "a {w} please",
    "The digit {W}.",
)
_FILLER = (
    "hello there",
    "please send the report",
    "no idea",
    "what is this",
    "the weather is nice",
    "it is a number",
    "",
    "lorem ipsum dolor",
    "zzz qqq",
)

#: Vocabulary of the reference model's tokenizer: id 0 = pad, id 1 = OOV.
VOCABULARY: tuple[str, ...] = (
    "<pad>",
    "<oov>",
    *NUMBER_WORDS,
    *(str(d) for d in range(10)),
    "the",
    "number",
    "digit",
    "it",
    "is",
    "this",
    "a",
    "please",
    "hello",
    "there",
    "send",
    "report",
    "no",
    "idea",
    "what",
    "weather",
    "nice",
)

SAMPLE_RATE = 16000
DURATION_S = 0.5


@dataclass(frozen=True)
class Sample:
    """One reference event before preprocessing.

    Attributes:
        image: uint8 ``[8, 8]`` grayscale digit (0 = background, 255 = ink).
        text: phrase naming the digit (or filler when corrupted).
        audio: float32 mono waveform at 16 kHz.
        label: the digit 0-9.
        corrupted: modalities replaced by uninformative content.
    """

    image: NDArray[np.uint8]
    text: str
    audio: NDArray[np.float32]
    label: int
    corrupted: frozenset[str] = field(default_factory=frozenset)


@functools.lru_cache(maxsize=1)
def digit_images() -> tuple[NDArray[np.uint8], NDArray[np.int64]]:
    """scikit-learn's bundled digits as uint8 ``[n, 8, 8]`` and their labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - depends on the install
        from worker.contract.errors import ConfigError

        raise ConfigError(
            "the reference data needs scikit-learn: pip install 'mmstream[produce]'"
        ) from exc
    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return images, digits.target.astype(np.int64)


def split_indices(split: str, test_fraction: float = 0.2) -> NDArray[np.int64]:
    """Image indices of the ``train`` or ``test`` split (fixed permutation, seed 0)."""
    images, _ = digit_images()
    perm = np.random.default_rng(0).permutation(len(images))
    n_test = int(len(images) * test_fraction)
    if split == "test":
        return perm[:n_test]
    if split == "train":
        return perm[n_test:]
    raise ValueError(f"split must be 'train' or 'test', not {split!r}")


def phrase(digit: int, rng: np.random.Generator) -> str:
    """A short phrase naming ``digit``."""
    template = _TEMPLATES[rng.integers(len(_TEMPLATES))]
    word = NUMBER_WORDS[digit]
    return template.format(w=word, W=word.capitalize(), d=digit)


def dtmf(
    digit: int,
    rng: np.random.Generator,
    sample_rate: int = SAMPLE_RATE,
    duration_s: float = DURATION_S,
) -> NDArray[np.float32]:
    """The DTMF tone pair of ``digit`` with random gain, phase, onset and noise."""
    n = int(sample_rate * duration_s)
    t = np.arange(n) / sample_rate
    low, high = DTMF_HZ[digit]
    gain = rng.uniform(0.2, 0.45)
    tone = np.sin(2 * np.pi * low * t + rng.uniform(0, 2 * np.pi)) + np.sin(
        2 * np.pi * high * t + rng.uniform(0, 2 * np.pi)
    )
    onset = int(rng.integers(0, n // 5))
    tone[:onset] = 0.0
    noise = rng.normal(0.0, rng.uniform(0.005, 0.05), n)
    return np.clip(gain * tone + noise, -1.0, 1.0).astype(np.float32)


def _corrupt_image(rng: np.random.Generator) -> NDArray[np.uint8]:
    if rng.random() < 0.5:
        return np.zeros((8, 8), dtype=np.uint8)
    return rng.integers(0, 256, (8, 8)).astype(np.uint8)


def _corrupt_audio(rng: np.random.Generator, n: int) -> NDArray[np.float32]:
    if rng.random() < 0.5:
        return np.zeros(n, dtype=np.float32)
    return rng.normal(0.0, rng.uniform(0.01, 0.3), n).astype(np.float32)


def samples(
    n: int,
    rng: np.random.Generator,
    *,
    split: str = "train",
    corrupt_p: float = 0.0,
) -> list[Sample]:
    """``n`` samples of ``split``; each modality is corrupted with probability ``corrupt_p``.

    Corruption replaces a modality with uninformative content (blank or noise
    image, silence or noise audio, filler text): a dropped modality is the
    same as a blank one.
    """
    images, labels = digit_images()
    pool = split_indices(split)
    out: list[Sample] = []
    for idx in rng.choice(pool, size=n, replace=True):
        label = int(labels[idx])
        image = images[idx]
        text = phrase(label, rng)
        audio = dtmf(label, rng)
        bad = frozenset(m for m in MODALITIES if rng.random() < corrupt_p)
        if "image" in bad:
            image = _corrupt_image(rng)
        if "text" in bad:
            text = _FILLER[rng.integers(len(_FILLER))]
        if "audio" in bad:
            audio = _corrupt_audio(rng, len(audio))
        out.append(Sample(image=image, text=text, audio=audio, label=label, corrupted=bad))
    return out


def sample_media(sample: Sample, family: str) -> Any:
    """The sample's media of one family: a PIL image, a str, or a 16 kHz waveform."""
    from PIL import Image

    if family == "image":
        return Image.fromarray(sample.image)
    if family == "text":
        return sample.text
    if family == "audio":
        return Waveform(np.asarray(sample.audio, dtype=np.float32), SAMPLE_RATE)
    raise ModelError(f"the reference data has no {family!r} media")


def sample_tensors(sample: Sample, manifest: Manifest) -> dict[str, NDArray[Any]]:
    """One sample as the model's input tensors (input name -> array of the input's dtype),
    each part's media through its transform (the producer's npy parts, the raw-ORT
    benchmarks)."""
    out: dict[str, NDArray[Any]] = {}
    for part in manifest.parts:
        media = sample_media(sample, part.transform.family)
        out.update(part.fill(part.transform.apply(media)))
    return out
