"""Preprocessing shared by training and serving, so both feed a model the same pixels.

Pure PIL + numpy (no torch import): services run it under ONNX Runtime, training wraps the arrays in
tensors. :class:`Preprocess` reproduces torchvision's ``Resize(int)`` (short side, PIL antialias,
``int()`` truncation of the long side), ``CenterCrop`` (``round`` of the offsets) and ``Normalize``,
and is saved with every model artifact through :meth:`Preprocess.to_dict`.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
from PIL import Image

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def scaled_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """The size with its longer side at most ``max_side``, aspect kept, never upscaled.

    Args:
        width: Current width.
        height: Current height.
        max_side: Largest allowed longer side.

    Returns:
        ``(width, height)``; unchanged when already small enough, else the longer side is exactly
        ``max_side`` and the shorter one rounded (at least 1).
    """
    if max_side < 1:
        raise ValueError(f"max_side must be positive, got {max_side}")
    longer = max(width, height)
    if longer <= max_side:
        return width, height
    scale = max_side / longer
    if width >= height:
        return max_side, max(1, round(height * scale))
    return max(1, round(width * scale)), max_side


def resize_max_side(img: Image.Image, max_side: int) -> Image.Image:
    """Shrink an image so its longer side is at most ``max_side`` (the ETL's resized image store).

    Lanczos with ``reducing_gap=3``: Pillow first box-reduces by an integer factor that leaves at least
    3x for the Lanczos pass, which its docs describe as indistinguishable from a full Lanczos
    resample and is much faster on camera-sized photos.

    Args:
        img: Any PIL image.
        max_side: Largest allowed longer side.

    Returns:
        The resized image, or ``img`` itself when it is already small enough (never upscaled).
    """
    size = scaled_size(img.width, img.height, max_side)
    if size == img.size:
        return img
    return img.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


@dataclass(frozen=True)
class Preprocess:
    """Resize the short side, centre-crop, normalise: an RGB image to a (3, crop, crop) float32 array.

    Attributes:
        resize_short: The short side after resizing (torchvision ``Resize(resize_short)``).
        crop: Side of the centre crop; at most ``resize_short``, so no padding is ever needed.
        interpolation: ``"bicubic"`` or ``"bilinear"`` (PIL filters, antialiased like torchvision on PIL).
        mean: Per-channel mean in 0..255 pixel units (R, G, B).
        std: Per-channel std in 0..255 pixel units; the output is ``(pixel - mean) / std``.
    """

    resize_short: int
    crop: int
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __post_init__(self) -> None:
        if self.interpolation not in _RESAMPLE:
            raise ValueError(f"interpolation must be one of {sorted(_RESAMPLE)}, got {self.interpolation!r}")
        if not 0 < self.crop <= self.resize_short:
            raise ValueError(f"need 0 < crop <= resize_short, got crop={self.crop}, {self.resize_short=}")
        for name in ("mean", "std"):
            values = tuple(float(v) for v in getattr(self, name))
            if len(values) != 3:
                raise ValueError(f"{name} needs 3 values (R, G, B), got {values}")
            # Normalise lists / ints to a float tuple so equality survives a JSON round trip.
            object.__setattr__(self, name, values)
        if min(self.std) <= 0:
            raise ValueError(f"std must be positive, got {self.std}")

    @property
    def output_shape(self) -> tuple[int, int, int]:
        """``(3, crop, crop)``, the shape :meth:`__call__` returns."""
        return 3, self.crop, self.crop

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """The ``(width, height)`` after the short-side resize, as torchvision computes it.

        The long side is ``int(resize_short * long / short)`` (truncated, not rounded).
        """
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.resize_short, int(self.resize_short * long / short)
        return (new_short, new_long) if width <= height else (new_long, new_short)

    def __call__(self, img: Image.Image) -> np.ndarray:
        """Preprocess one RGB image.

        Args:
            img: A mode ``"RGB"`` image (what :func:`~snap2caption.imaging.decode_image` returns).

        Returns:
            float32 array of shape ``(3, crop, crop)``.
        """
        out = np.empty(self.output_shape, np.float32)
        self._into(img, out)
        return out

    def batch(self, imgs: Sequence[Image.Image]) -> np.ndarray:
        """Preprocess several RGB images into one contiguous batch.

        Args:
            imgs: Mode ``"RGB"`` images of any sizes.

        Returns:
            float32 array of shape ``(B, 3, crop, crop)``; ``B`` may be 0.
        """
        out = np.empty((len(imgs), *self.output_shape), np.float32)
        for i, img in enumerate(imgs):
            self._into(img, out[i])  # fill in place: no per-image array then a stack copy
        return out

    def _into(self, img: Image.Image, out: np.ndarray) -> None:
        if img.mode != "RGB":
            # Converting here would drop alpha differently from decode_image: refuse instead.
            raise ValueError(f"Preprocess expects an RGB image (use decode_image), got mode {img.mode!r}")
        size = self.resized_size(img.width, img.height)
        if size != img.size:  # torchvision returns the image untouched when the size already matches
            img = img.resize(size, _RESAMPLE[self.interpolation])
        width, height = size
        top = round((height - self.crop) / 2.0)  # Python's round (half to even), as torchvision's center_crop
        left = round((width - self.crop) / 2.0)
        hwc = np.asarray(img.crop((left, top, left + self.crop, top + self.crop)), np.float32)
        # (crop, crop, 3) -> (3, crop, crop), normalised straight into ``out``.
        np.subtract(hwc.transpose(2, 0, 1), np.asarray(self.mean, np.float32)[:, None, None], out=out)
        np.divide(out, np.asarray(self.std, np.float32)[:, None, None], out=out)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict, stored beside model weights so serving rebuilds the same preprocessing."""
        return {
            "resize_short": self.resize_short,
            "crop": self.crop,
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Preprocess:
        """Rebuild from :meth:`to_dict` output; unknown or missing keys are refused.

        Raises:
            ValueError: A key is unknown (the nearest valid one is suggested), missing, or a value is invalid.
        """
        names = [f.name for f in fields(cls)]
        for key in data:
            if key not in names:
                near = difflib.get_close_matches(key, names, n=1)
                hint = f"; did you mean {near[0]!r}?" if near else ""
                raise ValueError(f"unknown Preprocess key {key!r}{hint} (valid: {', '.join(names)})")
        missing = [name for name in names if name not in data]
        if missing:
            raise ValueError(f"Preprocess is missing {', '.join(missing)}")
        return cls(
            resize_short=int(data["resize_short"]),
            crop=int(data["crop"]),
            interpolation=str(data["interpolation"]),
            mean=tuple(data["mean"]),  # length checked in __post_init__
            std=tuple(data["std"]),
        )


# The EfficientNet-Lite0 tagger's exact preprocessing: short side 256 bicubic, crop 224, (x - 127) / 128.
TAGGER_PREPROCESS = Preprocess(
    resize_short=256, crop=224, interpolation="bicubic", mean=(127.0, 127.0, 127.0), std=(128.0, 128.0, 128.0)
)

# torchvision ResNet50_Weights.IMAGENET1K_V2: short side 232 bilinear, crop 224, ImageNet mean/std x 255.
IMAGENET_PREPROCESS = Preprocess(
    resize_short=232,
    crop=224,
    interpolation="bilinear",
    mean=(123.675, 116.28, 103.53),
    std=(58.395, 57.12, 57.375),
)
