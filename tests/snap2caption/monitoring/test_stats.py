"""The one image-statistics function: known values, EXIF, formats, independence from the resolution."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image

from snap2caption.data.synth import SynthConfig, generate_scene, render_scene
from snap2caption.imaging.decode import decode_image, probe_image
from snap2caption.monitoring.stats import FEATURES, THUMBNAIL_SIDE, decoded_stats, image_stats, thumbnail


def _encode(image: Image.Image, fmt: str = "PNG", **kw: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kw)
    return buffer.getvalue()


def test_solid_grey_has_its_level_as_brightness_and_no_colour() -> None:
    stats = image_stats(Image.new("RGB", (40, 30), (100, 100, 100)), width=40, height=30, fmt="png")
    assert stats.brightness == pytest.approx(100.0, abs=1e-3)
    assert stats.colourfulness == pytest.approx(0.0, abs=1e-6)
    assert (stats.width, stats.height, stats.aspect, stats.format) == (40, 30, 40 / 30, "png")
    assert set(stats.to_dict()) == set(FEATURES)


def test_pure_red_matches_the_formulas() -> None:
    stats = image_stats(Image.new("RGB", (8, 8), (255, 0, 0)), width=8, height=8, fmt="png")
    assert stats.brightness == pytest.approx(0.299 * 255, abs=1e-3)
    # rg = 255, yb = 127.5 everywhere: no spread, so M = 0.3 * |(mu_rg, mu_yb)|.
    assert stats.colourfulness == pytest.approx(0.3 * math.hypot(255, 127.5), rel=1e-5)


def test_red_green_halves_spread_in_rg_only() -> None:
    image = Image.new("RGB", (128, 64), (255, 0, 0))
    image.paste((0, 255, 0), (64, 0, 128, 64))
    stats = image_stats(image, width=128, height=64, fmt="png")
    # rg is +-255 (mean 0, std 255); yb is 127.5 on both halves (std 0): M = 255 + 0.3 * 127.5.
    assert stats.colourfulness == pytest.approx(255 + 0.3 * 127.5, rel=1e-4)
    assert stats.brightness == pytest.approx((0.299 + 0.587) * 255 / 2, abs=1e-2)


def test_black_and_white_halves_are_grey_on_average_and_colourless() -> None:
    image = Image.new("RGB", (64, 64), (0, 0, 0))
    image.paste((255, 255, 255), (0, 32, 64, 64))
    stats = image_stats(image, width=64, height=64, fmt="png")
    assert stats.brightness == pytest.approx(127.5, abs=0.01)
    assert stats.colourfulness == pytest.approx(0.0, abs=1e-3)


def test_thumbnail_is_small_and_never_upscaled() -> None:
    assert thumbnail(Image.new("RGB", (4000, 1000))).size == (THUMBNAIL_SIDE, THUMBNAIL_SIDE // 4)
    assert thumbnail(Image.new("RGB", (30, 20))).size == (30, 20)


def test_exif_rotated_jpeg_reports_the_upright_size_even_when_decoded_shrunk() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 200 x 100, shown 100 x 200
    data = _encode(Image.new("RGB", (200, 100), (10, 200, 30)), "JPEG", exif=exif, quality=95)
    full = decoded_stats(decode_image(data))
    shrunk = decoded_stats(decode_image(data, max_side=64), probe_image(data))
    assert (full.width, full.height, full.aspect) == (100, 200, 0.5)
    assert (shrunk.width, shrunk.height, shrunk.aspect) == (100, 200, 0.5)
    assert full.format == shrunk.format == "jpeg"
    assert shrunk.brightness == pytest.approx(full.brightness, abs=1.0)


def test_format_is_the_sniffed_one() -> None:
    image = Image.new("RGB", (16, 16), (1, 2, 3))
    assert decoded_stats(decode_image(_encode(image, "PNG"))).format == "png"
    assert decoded_stats(decode_image(_encode(image, "WEBP"))).format == "webp"


def test_non_rgb_input_is_converted() -> None:
    stats = image_stats(Image.new("L", (10, 10), 50), width=10, height=10, fmt="png")
    assert stats.brightness == pytest.approx(50.0, abs=1e-3)
    assert stats.colourfulness == pytest.approx(0.0, abs=1e-6)


def test_offline_and_online_resolutions_agree() -> None:
    """The ETL sees a 512-px store, the detector the full photo: the statistics must not care."""
    rng = np.random.default_rng([7, 0])
    scene = generate_scene(rng, SynthConfig(image_size=256))
    big = render_scene(scene, rng).resize((2000, 1500), Image.Resampling.BICUBIC)
    data = _encode(big, "JPEG", quality=90)
    offline = decoded_stats(decode_image(data, max_side=512), probe_image(data))
    online = decoded_stats(decode_image(data))
    assert (offline.width, offline.height) == (online.width, online.height) == (2000, 1500)
    assert offline.brightness == pytest.approx(online.brightness, rel=0.01)
    assert offline.colourfulness == pytest.approx(online.colourfulness, rel=0.02)


def test_statistics_are_exact_so_every_machine_gets_the_same_bits() -> None:
    # The ETL's drift reference is a DVC output hashed in dvc.lock: brightness and colourfulness must not
    # depend on BLAS kernels or SIMD widths. They equal the exactly rounded rational values.
    from fractions import Fraction

    rng = np.random.default_rng(7)
    image = Image.fromarray(rng.integers(0, 256, size=(THUMBNAIL_SIDE, THUMBNAIL_SIDE, 3), dtype=np.uint8))
    stats = image_stats(image, width=THUMBNAIL_SIDE, height=THUMBNAIL_SIDE, fmt="png")
    pixels = np.asarray(thumbnail(image), dtype=np.int64).reshape(-1, 3).tolist()
    n = len(pixels)
    exact = sum(Fraction(299 * r + 587 * g + 114 * b, 1000) for r, g, b in pixels) / n
    assert stats.brightness == float(exact)

    def mean_std(values: list[int]) -> tuple[float, float]:
        mean = Fraction(sum(values), n)
        variance = sum((Fraction(v) - mean) ** 2 for v in values) / n
        return float(mean), math.sqrt(float(variance))

    rg_mean, rg_std = mean_std([r - g for r, g, _ in pixels])
    yb_mean, yb_std = mean_std([r + g - 2 * b for r, g, b in pixels])
    expected = math.hypot(rg_std, yb_std / 2) + 0.3 * math.hypot(rg_mean, yb_mean / 2)
    assert stats.colourfulness == pytest.approx(expected, rel=1e-12)
