"""Image normalisation: one safe decode of the upload, and the small upright copy the backends get."""

from __future__ import annotations

import io
import random
from typing import Any

import pytest
from PIL import Image

from services.gateway.config import Settings
from services.gateway.images import PNG_MAX_PIXELS, normalise_image
from snap2caption.errors import CorruptImage, ImageTooLarge, PayloadTooLarge, UnsupportedFormat
from snap2caption.imaging import DecodeLimits

LIMITS = DecodeLimits(max_bytes=1_000_000, max_pixels=1_000_000)


def _encode(image: Image.Image, fmt: str, **kwargs: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def test_normalise_shrinks_and_reencodes_keeping_the_original_size() -> None:
    data = _encode(Image.new("RGB", (800, 400), (200, 10, 10)), "PNG")
    image = normalise_image(data, LIMITS, max_side=200, encoding="jpeg")
    assert (image.width, image.height) == (800, 400)
    assert (image.sent_width, image.sent_height) == (200, 100)
    assert image.format == "png" and image.content_type == "image/jpeg"
    sent = Image.open(io.BytesIO(image.data))
    assert sent.format == "JPEG" and sent.size == (200, 100)
    assert image.n_bytes == len(data) and len(image.sha256) == 64


def test_normalise_applies_exif_orientation_and_drops_it_from_the_copy() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: stored 60 x 40 displays as 40 x 60
    data = _encode(Image.new("RGB", (60, 40), (0, 0, 200)), "JPEG", exif=exif.tobytes())
    image = normalise_image(data, LIMITS, max_side=1000, encoding="png")
    assert (image.width, image.height) == (40, 60)
    sent = Image.open(io.BytesIO(image.data))
    assert sent.size == (40, 60) and sent.getexif().get(0x0112) is None


def test_normalise_png_is_lossless() -> None:
    original = Image.new("RGB", (5, 3))
    original.putdata([(i * 10, 255 - i * 10, i) for i in range(15)])
    image = normalise_image(_encode(original, "PNG"), LIMITS, max_side=100, encoding="png")
    assert list(Image.open(io.BytesIO(image.data)).convert("RGB").getdata()) == list(original.getdata())


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"hello, world", UnsupportedFormat),
        (b"%PDF-1.7\n...", UnsupportedFormat),
        (_encode(Image.new("RGB", (50, 50)), "PNG")[:60], CorruptImage),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 2_000_000, PayloadTooLarge),
        (_encode(Image.new("L", (2000, 1000)), "PNG"), ImageTooLarge),
    ],
)
def test_normalise_refuses_what_the_decoder_refuses(data: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        normalise_image(data, LIMITS, max_side=100, encoding="jpeg")


def test_auto_sends_small_copies_lossless_and_large_ones_as_jpeg() -> None:
    """``auto`` (the gateway's default): PNG, pixel for pixel, up to ``png_max_pixels``; JPEG above."""
    rng = random.Random(0)
    original = Image.new("RGB", (64, 48))
    original.putdata([(rng.randrange(256), rng.randrange(256), rng.randrange(256)) for _ in range(64 * 48)])
    data = _encode(original, "JPEG", quality=80)  # a lossy upload: its decoded pixels are what must arrive
    decoded = Image.open(io.BytesIO(data)).convert("RGB")

    small = normalise_image(data, LIMITS, max_side=100, encoding="auto", png_max_pixels=64 * 48)
    assert small.content_type == "image/png"
    assert list(Image.open(io.BytesIO(small.data)).convert("RGB").getdata()) == list(decoded.getdata())

    large = normalise_image(data, LIMITS, max_side=100, encoding="auto", png_max_pixels=64 * 48 - 1)
    assert large.content_type == "image/jpeg" and Image.open(io.BytesIO(large.data)).format == "JPEG"


def test_the_gateway_defaults_to_auto() -> None:
    settings = Settings()
    assert settings.backend_image_format == "auto" and settings.backend_png_max_pixels == PNG_MAX_PIXELS
