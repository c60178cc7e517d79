"""Safe image decoding and the preprocessing that training and serving share.

``decode_image`` / ``decode_file`` are the only way images enter the system (ETL, training, services);
``Preprocess`` turns their RGB output into model input identically on both sides.
"""

from __future__ import annotations

from snap2caption.imaging.decode import (
    ALLOWED_FORMATS,
    DEFAULT_LIMITS,
    DecodedImage,
    DecodeLimits,
    ImageInfo,
    decode_file,
    decode_image,
    probe_image,
    sniff_format,
)
from snap2caption.imaging.transforms import (
    IMAGENET_PREPROCESS,
    TAGGER_PREPROCESS,
    Preprocess,
    resize_max_side,
    scaled_size,
)

__all__ = [
    "ALLOWED_FORMATS",
    "DEFAULT_LIMITS",
    "IMAGENET_PREPROCESS",
    "TAGGER_PREPROCESS",
    "DecodeLimits",
    "DecodedImage",
    "ImageInfo",
    "Preprocess",
    "decode_file",
    "decode_image",
    "probe_image",
    "resize_max_side",
    "scaled_size",
    "sniff_format",
]
