"""The image transform: any image -> the pixels a vision model was trained on.

In order: the EXIF orientation is applied (when decoding); the image is converted to
gray or RGB; resized by ``resize`` (``stretch`` to height x width; ``shorter_side_crop``:
the shorter side to ``shorter_side``, then a center crop; ``letterbox``: the aspect
ratio kept, the rest padded with ``pad_value``, centred as YOLO does or at the end
(right and bottom) as OCR recognisers do) with ``interpolation`` as ``library`` does it
(Pillow's filters antialias when shrinking, OpenCV's ``cv2.resize`` does not: use the
one the model was trained with); pixel values times ``scale``, minus ``mean``, over
``std`` (per channel); RGB or BGR; HWC or CHW; float32, float16, or uint8 (raw pixels).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from worker.contract.errors import Reason, RecordError
from worker.contract.transforms.base import Parameters, TensorOut, check, one_of
from worker.contract.transforms.media import (
    IMAGE_TYPES,
    Limits,
    open_image,
)

RESIZES = ("stretch", "shorter_side_crop", "letterbox")
PAD_POSITIONS = ("center", "end")
LIBRARIES = ("pillow", "opencv")
_PILLOW_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
#: cv2.INTER_* by name (the numbers of OpenCV's enum, so cv2 is imported only when used).
_OPENCV_FLAGS = {"nearest": 0, "bilinear": 1, "bicubic": 2, "area": 3, "lanczos": 4}
LAYOUTS = ("HWC", "CHW")
CHANNEL_ORDERS = ("RGB", "BGR")
IMAGE_DTYPES = ("float32", "float16", "uint8")
#: The output's name.
PIXELS = "pixels"


@dataclass(frozen=True)
class ImageTransform(Parameters):
    """How an image becomes the model's pixel tensor (see the module doc for the order).

    Attributes:
        height, width: the tensor's size in pixels.
        channels: 1 (gray) or 3 (RGB or BGR).
        resize: ``stretch``, ``shorter_side_crop`` or ``letterbox``.
        shorter_side: ``shorter_side_crop``: the shorter side's length before the crop
            (0: just enough for the crop, ``max(height, width)``; 256 for a 224 crop is
            the torchvision recipe; the longer side is truncated, as torchvision does).
        pad_value: ``letterbox``: the padding's pixel value on the 0..255 scale.
        pad_position: ``letterbox``: ``center`` (YOLO) or ``end`` (right/bottom, OCR).
        interpolation: ``nearest``, ``bilinear``, ``bicubic``, ``lanczos``, and ``box``,
            ``hamming`` (Pillow) or ``area`` (OpenCV).
        library: whose resize semantics: ``pillow`` (antialiased) or ``opencv``.
        scale: multiplies 0..255 pixel values (1/255 gives [0, 1]).
        mean, std: per channel (one value each, or ``channels`` values), after ``scale``,
            in R, G, B order (applied before ``channel_order`` turns the channels round);
            empty: none.
        layout: ``HWC`` or ``CHW`` (NHWC or NCHW batches).
        channel_order: ``RGB`` or ``BGR``.
        dtype: ``float32``, ``float16`` or ``uint8`` (uint8: the resized pixels as they
            are; ``scale``, ``mean`` and ``std`` must be left at their defaults).
        exif_orientation: apply the EXIF orientation tag (phones store photos rotated).
        jpeg_draft: decode a JPEG at least twice as large as needed at a reduced scale
            (much faster; the pixels differ slightly from a full decode).
    """

    height: int
    width: int
    channels: int = 3
    resize: str = "stretch"
    shorter_side: int = 0
    pad_value: float = 0.0
    pad_position: str = "center"
    interpolation: str = "bilinear"
    library: str = "pillow"
    scale: float = 1.0 / 255.0
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    layout: str = "HWC"
    channel_order: str = "RGB"
    dtype: str = "float32"
    exif_orientation: bool = True
    jpeg_draft: bool = True

    kind: ClassVar[str] = "image"
    family: ClassVar[str] = "image"

    def __post_init__(self) -> None:
        cls = type(self)
        check(self.height > 0 and self.width > 0, cls, "height and width must be > 0")
        check(self.channels in (1, 3), cls, f"channels must be 1 or 3, not {self.channels}")
        one_of(cls, "resize", self.resize, RESIZES)
        one_of(cls, "pad_position", self.pad_position, PAD_POSITIONS)
        one_of(cls, "library", self.library, LIBRARIES)
        filters = _PILLOW_FILTERS if self.library == "pillow" else _OPENCV_FLAGS
        one_of(cls, f"interpolation (with {self.library})", self.interpolation, list(filters))
        one_of(cls, "layout", self.layout, LAYOUTS)
        one_of(cls, "channel_order", self.channel_order, CHANNEL_ORDERS)
        one_of(cls, "dtype", self.dtype, IMAGE_DTYPES)
        check(self.shorter_side >= 0, cls, "shorter_side must be >= 0")
        if self.resize == "shorter_side_crop" and self.shorter_side:
            check(
                self.shorter_side >= max(self.height, self.width),
                cls,
                f"shorter_side {self.shorter_side} is smaller than the crop "
                f"{self.height}x{self.width}",
            )
        check(0.0 <= self.pad_value <= 255.0, cls, "pad_value must be within 0..255")
        for name in ("mean", "std"):
            n = len(getattr(self, name))
            check(n in (0, 1, self.channels), cls, f"{name} needs 1 or {self.channels} values")
        check(bool(self.mean) == bool(self.std), cls, "mean and std go together")
        check(all(s != 0 for s in self.std), cls, "std must not be 0")
        if self.dtype == "uint8":
            check(
                not self.mean and self.scale == 1.0 / 255.0,
                cls,
                "dtype uint8 is the raw pixels: leave scale, mean and std unset",
            )

    # ---- the Transform protocol

    def outputs(self) -> dict[str, TensorOut]:
        return {PIXELS: TensorOut(self.shape(), "uint8" if self.dtype == "uint8" else "float")}

    def shape(self) -> tuple[int, ...]:
        h, w, c = self.height, self.width, self.channels
        return (c, h, w) if self.layout == "CHW" else (h, w, c)

    def content_types(self) -> tuple[str, ...]:
        return IMAGE_TYPES

    def decode(
        self, value: bytes, media: str, params: dict[str, str], limits: Limits
    ) -> Image.Image:
        draft = self.resized_size if self.jpeg_draft else None
        img = open_image(value, limits, draft=draft, exif=self.exif_orientation)
        w, h = self.resized_size(*img.size)
        if w * h > limits.max_image_pixels:  # a very thin picture, its long side scaled up
            raise RecordError(
                Reason.PAYLOAD_TOO_LARGE,
                f"a {img.width}x{img.height} image would be resized to {w}x{h} before the "
                f"crop, over the limit of {limits.max_image_pixels} pixels",
            )
        return img

    def apply(self, media: Image.Image) -> dict[str, NDArray[Any]]:
        return {PIXELS: prepare_image(media, self)}

    def blank_media(self) -> Image.Image:
        return Image.new("RGB" if self.channels == 3 else "L", (self.width, self.height))

    def sample_media(self, rng: np.random.Generator) -> Image.Image:
        """Random pixels at a random size between half and twice the model's."""
        h = int(rng.integers(max(1, self.height // 2), 2 * self.height + 1))
        w = int(rng.integers(max(1, self.width // 2), 2 * self.width + 1))
        return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """The (width, height) a ``width`` x ``height`` source is resized to, before the
        crop or the padding."""
        if self.resize == "stretch":
            return self.width, self.height
        if self.resize == "shorter_side_crop":
            # torchvision's Resize(side): the shorter side to side, the longer truncated.
            side = self.shorter_side or max(self.height, self.width)
            if width <= height:
                w, h = side, int(side * height / width)
            else:
                w, h = int(side * width / height), side
            return max(self.width, w), max(self.height, h)  # never short of the crop
        s = min(self.width / width, self.height / height)
        return (
            min(self.width, max(1, round(width * s))),
            min(self.height, max(1, round(height * s))),
        )


def _crop_box(size: tuple[int, int], spec: ImageTransform) -> tuple[int, int]:
    """(left, top) of the center crop in an image of ``size`` (torchvision's rounding)."""
    return round((size[0] - spec.width) / 2.0), round((size[1] - spec.height) / 2.0)


def _resize(img: Image.Image, size: tuple[int, int], spec: ImageTransform) -> NDArray[Any]:
    """Resize to ``size`` (width, height) with the spec's library, center-cropped for
    ``shorter_side_crop``; uint8 ``[h, w(, c)]``. The whole picture is resized, then
    cropped, as the training pipelines do (resizing only the cropped box differs by a
    gray level here and there); :meth:`ImageTransform.decode` bounds ``size``."""
    if spec.library == "opencv":
        import cv2

        arr = np.asarray(img)
        if (arr.shape[1], arr.shape[0]) != size:
            arr = cv2.resize(arr, size, interpolation=_OPENCV_FLAGS[spec.interpolation])
    else:
        if img.size != size:
            img = img.resize(size, _PILLOW_FILTERS[spec.interpolation])
        arr = np.asarray(img)
    if spec.resize == "shorter_side_crop":
        left, top = _crop_box(size, spec)
        arr = arr[top : top + spec.height, left : left + spec.width]
    return np.asarray(arr)


def _eight_bit(img: Image.Image) -> Image.Image:
    """A 16-bit gray picture (PNG) scaled to 8 bits; Pillow's convert would clip it."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.clip(np.asarray(img), 0, 65535).astype(np.uint32) >> 8
        return Image.fromarray(arr.astype(np.uint8), "L")
    return img


def prepare_image(img: Image.Image, spec: ImageTransform) -> NDArray[Any]:
    """A decoded image (any size and mode) -> the model's pixel tensor
    (:meth:`ImageTransform.shape`)."""
    img = _eight_bit(img)
    gray_source = img.mode == "L"
    mode = "L" if spec.channels == 1 or gray_source else "RGB"
    if img.mode != mode:
        img = img.convert(mode)
    size = spec.resized_size(*img.size)
    # A gray source for an RGB model: converting to RGB copies its one band three times,
    # and resizing works band by band, so resize the one band, then repeat it (the same
    # numbers, a third of the work).
    arr = _resize(img, size, spec)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if spec.resize == "letterbox" and arr.shape[:2] != (spec.height, spec.width):
        canvas = np.full((spec.height, spec.width, arr.shape[2]), spec.pad_value, np.float32)
        top = (spec.height - arr.shape[0]) // 2 if spec.pad_position == "center" else 0
        left = (spec.width - arr.shape[1]) // 2 if spec.pad_position == "center" else 0
        canvas[top : top + arr.shape[0], left : left + arr.shape[1]] = arr
        arr = canvas
    if spec.channels == 3 and arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    if spec.dtype == "uint8":
        out: NDArray[Any] = np.asarray(arr, dtype=np.uint8)
    else:
        out = np.asarray(arr, dtype=np.float32) * np.float32(spec.scale)
        if spec.mean:
            mean = np.asarray(spec.mean, np.float32)
            out = (out - mean) / np.asarray(spec.std, np.float32)
    if spec.channels == 3 and spec.channel_order == "BGR":
        out = out[:, :, ::-1]
    if spec.layout == "CHW":
        out = out.transpose(2, 0, 1)
    return np.ascontiguousarray(out, dtype=spec.dtype)
