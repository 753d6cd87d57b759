"""Raw media as producers send it -> decoded media, every limit checked before the full decode.

Three families, each decoded by a well-kept library and nothing hand-written:

* images (:func:`open_image`): PNG, JPEG, WebP through Pillow, HEIC/HEIF through the
  ``pillow-heif`` plugin. The declared size is checked against ``max_image_pixels``
  from the header, before any pixel is decoded (decompression bombs); a JPEG much
  larger than the model needs is decoded at a reduced scale (Pillow's draft mode);
  the EXIF orientation is applied.
* text (:func:`read_text`): UTF-8 (or ASCII), its length checked before decoding.
* audio (:func:`read_audio`): WAV (PCM 8-32 bit, float), FLAC, OGG/Vorbis, OGG/Opus and
  MP3 through ``soundfile`` (libsndfile); channels and duration are checked from the
  header, and no more than the allowed duration is ever read; samples are averaged over
  the channels and clipped to full scale, [-1, 1].

Every way a payload can be unusable raises :class:`RecordError` with its dead-letter
reason. The encoders (:func:`image_bytes`, :func:`audio_bytes`) are the producer's and the
tests' way to make such payloads.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageOps, UnidentifiedImageError

from worker.contract.errors import Reason, RecordError

try:  # HEIC/HEIF: a Pillow plugin; without it those images are refused as unsupported.
    import pillow_heif

    pillow_heif.register_heif_opener()
    HEIF = True
except ImportError:  # pragma: no cover - depends on the install
    HEIF = False

F32 = NDArray[np.float32]

#: Pillow formats an image part may be in (whatever image/* type it declares).
IMAGE_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP", *(("HEIF",) if HEIF else ()))
IMAGE_TYPES: tuple[str, ...] = (
    "image/png",
    "image/jpeg",
    "image/jpg",
    "image/webp",
    *(("image/heic", "image/heif") if HEIF else ()),
)
TEXT_TYPES: tuple[str, ...] = ("text/plain",)
#: Image formats recognised by their first bytes only to name them in a refusal.
_OTHER_IMAGES = (
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"GIF8", "GIF"),
    (b"BM", "BMP"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
)
#: libsndfile's major formats an audio part may be in (others are refused).
AUDIO_FORMATS: tuple[str, ...] = ("WAV", "WAVEX", "RF64", "W64", "FLAC", "OGG", "MP3")
AUDIO_TYPES: tuple[str, ...] = (
    "audio/wav",
    "audio/x-wav",
    "audio/wave",
    "audio/vnd.wave",
    "audio/flac",
    "audio/x-flac",
    "audio/ogg",
    "audio/opus",
    "audio/mpeg",
    "audio/mp3",
)
_CHARSETS = ("utf-8", "utf8", "us-ascii", "ascii")
#: The highest sample rate an audio part may declare (DXD's 352.8 kHz is the highest in use).
MAX_AUDIO_RATE = 384_000
#: Audio is read and mixed down this many frames at a time (about 4 s at 16 kHz).
AUDIO_BLOCK = 65536


@dataclass(frozen=True)
class Limits:
    """Refusal thresholds for input records, all checked before the full decode.

    Attributes:
        max_part_bytes: largest record value accepted.
        max_image_pixels: largest declared width*height accepted (read from the header).
        max_audio_channels: most channels an audio part may declare.
    """

    max_part_bytes: int = 16 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    max_audio_channels: int = 8


@dataclass(frozen=True)
class Waveform:
    """Decoded audio: mono float32 samples in [-1, 1] at ``rate`` Hz."""

    samples: F32
    rate: int


# ---------------------------------------------------------------- images


def open_image(
    value: bytes,
    limits: Limits,
    *,
    draft: Callable[[int, int], tuple[int, int]] | None = None,
    exif: bool = True,
) -> Image.Image:
    """The decoded image (mode as stored; EXIF orientation applied when ``exif``).

    ``draft`` maps the (upright) source's width and height to the size the caller will
    resize it to; a JPEG at least twice that size in both dimensions is then decoded at
    a reduced scale (1/2, 1/4 or 1/8, never below it), a fraction of the full decode.
    """
    try:
        # Pillow warns about corrupt metadata (an EXIF block cut short) and decodes the
        # picture anyway: the part is decoded or refused, the warning tells nobody anything.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _open(value, limits, draft, exif)
    except RecordError:
        raise
    except Image.DecompressionBombError as exc:
        raise RecordError(Reason.PAYLOAD_TOO_LARGE, f"image too large: {exc}") from exc
    except UnidentifiedImageError as exc:
        other = next((name for magic, name in _OTHER_IMAGES if value.startswith(magic)), None)
        if other is not None:
            raise RecordError(
                Reason.UNSUPPORTED_CONTENT_TYPE,
                f"image bytes are {other}; accepted: {', '.join(IMAGE_FORMATS)}",
            ) from exc
        raise RecordError(
            Reason.DECODE_ERROR, f"not a {', '.join(IMAGE_FORMATS)} image: {exc}"
        ) from exc
    except RuntimeError as exc:  # libheif's errors, through pillow-heif
        reason = Reason.PAYLOAD_TOO_LARGE if "limit exceeded" in str(exc) else Reason.DECODE_ERROR
        raise RecordError(reason, f"cannot decode image: {exc}") from exc
    except MemoryError as exc:
        raise RecordError(Reason.PAYLOAD_TOO_LARGE, "image too large to decode") from exc
    except Exception as exc:  # Pillow and its plugins promise no exception types
        raise RecordError(
            Reason.DECODE_ERROR, f"cannot decode image: {type(exc).__name__}: {exc}"
        ) from exc


def _open(
    value: bytes,
    limits: Limits,
    draft: Callable[[int, int], tuple[int, int]] | None,
    exif: bool,
) -> Image.Image:
    """:func:`open_image`'s steps: header, limits, orientation, draft, decode, transpose."""
    img: Image.Image = Image.open(io.BytesIO(value), formats=IMAGE_FORMATS)
    width, height = img.size
    if width * height > limits.max_image_pixels:
        raise RecordError(
            Reason.PAYLOAD_TOO_LARGE,
            f"image declares {width}x{height} pixels, over the limit of {limits.max_image_pixels}",
        )
    orientation = img.getexif().get(0x0112, 1) if exif else 1
    if draft is not None and img.format == "JPEG":
        turned = orientation in (5, 6, 7, 8)  # these swap the axes
        w, h = draft(height, width) if turned else draft(width, height)
        img.draft(img.mode if img.mode in ("L", "RGB") else "RGB", (h, w) if turned else (w, h))
    img.load()
    if orientation != 1:
        img = ImageOps.exif_transpose(img)
    return img


def image_bytes(img: Image.Image | NDArray[np.uint8], fmt: str = "PNG", **save: Any) -> bytes:
    """``img`` (or a uint8 ``[H, W]`` / ``[H, W, 3]`` array) encoded as ``fmt``."""
    if not isinstance(img, Image.Image):
        img = Image.fromarray(np.ascontiguousarray(img, dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save)
    return buf.getvalue()


# ---------------------------------------------------------------- text


def read_text(value: bytes, charset: str, max_chars: int) -> str:
    """UTF-8 bytes -> str; refused when over ``max_chars`` (bytes checked first)."""
    if charset not in _CHARSETS:
        raise RecordError(Reason.UNSUPPORTED_CONTENT_TYPE, f"text charset {charset!r}: use utf-8")
    if len(value) > 4 * max_chars:
        raise RecordError(
            Reason.PAYLOAD_TOO_LARGE, f"text of {len(value)} bytes, over {max_chars} chars"
        )
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecordError(Reason.DECODE_ERROR, f"text is not valid UTF-8: {exc}") from exc
    if len(text) > max_chars:
        raise RecordError(
            Reason.PAYLOAD_TOO_LARGE, f"text of {len(text)} chars, over the limit {max_chars}"
        )
    return text


# ---------------------------------------------------------------- audio


def read_audio(value: bytes, limits: Limits, max_seconds: float) -> Waveform:
    """Any supported audio file -> mono float32 (channels averaged) at its own rate.

    Rate, channels and duration come from the header and are checked before any sample
    is read; the samples are then read in blocks of at most :data:`AUDIO_BLOCK` frames
    and mixed down block by block, and reading stops past ``max_seconds``, so a header
    that lies about (or does not know) the length cannot make the worker hold more.
    """
    import soundfile as sf

    try:
        f = sf.SoundFile(io.BytesIO(value))
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError, EOFError) as exc:
        raise RecordError(Reason.DECODE_ERROR, f"cannot decode audio: {exc}") from exc
    with f:
        if f.format not in AUDIO_FORMATS:
            raise RecordError(
                Reason.UNSUPPORTED_CONTENT_TYPE,
                f"audio in {f.format} format; accepted: {', '.join(AUDIO_FORMATS)}",
            )
        rate, channels = int(f.samplerate), int(f.channels)
        if not 0 < rate <= MAX_AUDIO_RATE or channels <= 0:
            raise RecordError(
                Reason.DECODE_ERROR,
                f"audio with {channels} channels at {rate} Hz (rates up to {MAX_AUDIO_RATE})",
            )
        if channels > limits.max_audio_channels:
            raise RecordError(
                Reason.PAYLOAD_TOO_LARGE,
                f"audio with {channels} channels, over the limit of {limits.max_audio_channels}",
            )
        if f.frames >= 2**62:  # libsndfile's "unknown": it then cannot read it either
            raise RecordError(
                Reason.DECODE_ERROR,
                "audio that does not declare its length (a FLAC written as a stream?): "
                "encode it as a file",
            )
        allowed = math.floor(max_seconds * rate)
        if f.frames > allowed:
            raise RecordError(
                Reason.PAYLOAD_TOO_LARGE,
                f"audio of {f.frames / rate:.1f} s, over the limit {max_seconds} s",
            )
        # 16-bit PCM (the common case) is read as int16 and scaled here: libsndfile's own
        # conversion to float takes about three times as long.
        pcm16 = f.subtype == "PCM_16"
        blocks, total = [], 0
        try:
            while total <= allowed:
                want = min(AUDIO_BLOCK, allowed + 1 - total)
                block = f.read(frames=want, dtype="int16" if pcm16 else "float32", always_2d=True)
                if len(block):
                    mono = block.mean(axis=1, dtype=np.float32) if channels > 1 else block[:, 0]
                    blocks.append(mono)
                    total += len(block)
                if len(block) < want:  # the end of the clip
                    break
        except (sf.LibsndfileError, RuntimeError, ValueError, EOFError) as exc:
            raise RecordError(Reason.DECODE_ERROR, f"cannot decode audio: {exc}") from exc
        except MemoryError as exc:
            raise RecordError(Reason.PAYLOAD_TOO_LARGE, "audio too large to decode") from exc
    if total > allowed:
        raise RecordError(
            Reason.PAYLOAD_TOO_LARGE, f"audio longer than the limit of {max_seconds} s"
        )
    if total == 0:
        raise RecordError(Reason.DECODE_ERROR, "audio holds no samples")
    mono = blocks[0] if len(blocks) == 1 else np.concatenate(blocks)  # (one for most clips)
    if pcm16:
        mono = mono.astype(np.float32) * np.float32(1.0 / 32768.0)
    if not np.isfinite(mono).all():
        raise RecordError(Reason.DECODE_ERROR, "audio holds NaN or infinity")
    if not pcm16:  # float files may hold any value: full scale is [-1, 1], as PCM's
        mono = np.clip(mono, -1.0, 1.0)
    return Waveform(np.ascontiguousarray(mono, dtype=np.float32), rate)


#: soundfile (format, subtype) per content type the encoder writes.
_AUDIO_ENCODINGS: dict[str, tuple[str, str]] = {
    "audio/wav": ("WAV", "PCM_16"),
    "audio/flac": ("FLAC", "PCM_16"),
    "audio/ogg": ("OGG", "VORBIS"),
    "audio/opus": ("OGG", "OPUS"),
    "audio/mpeg": ("MP3", "MPEG_LAYER_III"),
}


def audio_bytes(wave: F32, rate: int, content_type: str = "audio/wav", subtype: str = "") -> bytes:
    """A mono waveform encoded as ``content_type`` (WAV PCM16 by default; ``subtype``
    overrides the encoding, e.g. ``FLOAT`` or ``PCM_24`` for WAV)."""
    import soundfile as sf

    fmt, default = _AUDIO_ENCODINGS[content_type]
    buf = io.BytesIO()
    sf.write(buf, np.clip(np.asarray(wave, np.float32), -1.0, 1.0), rate, format=fmt,
             subtype=subtype or default)  # fmt: skip
    return buf.getvalue()


#: Pillow's format name per image content type the encoder writes.
_IMAGE_ENCODINGS = {
    "image/png": "PNG",
    "image/jpeg": "JPEG",
    "image/webp": "WEBP",
    "image/heic": "HEIF",
}
#: The content types :func:`encode_media` writes, by family; the first is the default.
ENCODINGS: dict[str, tuple[str, ...]] = {
    "image": tuple(_IMAGE_ENCODINGS),
    "text": ("text/plain; charset=utf-8",),
    "audio": tuple(_AUDIO_ENCODINGS),
}


def encode_media(media: Any, content_type: str) -> bytes:
    """Media (a PIL image or uint8 array, a str, a :class:`Waveform`) as ``content_type``
    bytes: what a producer sends (:data:`ENCODINGS`)."""
    main = media_type(content_type)[0]
    if main in _IMAGE_ENCODINGS:
        return image_bytes(media, _IMAGE_ENCODINGS[main])
    if main == "text/plain":
        return str(media).encode("utf-8")
    if main in _AUDIO_ENCODINGS:
        return audio_bytes(media.samples, media.rate, main)
    raise ValueError(f"cannot encode media as {content_type!r}")


def media_type(content_type: str) -> tuple[str, dict[str, str]]:
    """``"text/plain; charset=UTF-8"`` -> ``("text/plain", {"charset": "utf-8"})``."""
    main, *params = [p.strip() for p in content_type.split(";")]
    parsed = {}
    for p in params:
        if "=" in p:
            k, v = p.split("=", 1)
            parsed[k.strip().lower()] = v.strip().strip('"').lower()
    return main.lower(), parsed
