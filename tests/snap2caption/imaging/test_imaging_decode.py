"""snap2caption.imaging.decode: what it accepts, how it normalises, what it refuses and how cheaply.

Every input is generated here (Pillow, numpy or hand-built bytes); nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import io
import struct
import tracemalloc
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps, WebPImagePlugin

from snap2caption.errors import CorruptImage, ImageTooLarge, PayloadTooLarge, UnsupportedFormat
from snap2caption.imaging import (
    DEFAULT_LIMITS,
    DecodeLimits,
    decode_file,
    decode_image,
    probe_image,
    sniff_format,
)
from snap2caption.imaging.decode import _header_size

WHITE = (255, 255, 255)

# --- builders -------------------------------------------------------------------------------------------


def encode(img: Image.Image, fmt: str, **save: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **save)
    return buf.getvalue()


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def hand_png(width: int, height: int, bit_depth: int, color_type: int, idat: bytes, *extra: bytes) -> bytes:
    """A PNG from parts: IHDR, optional chunks (tRNS...), one IDAT payload taken as is, IEND."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + b"".join(extra)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


def png_rows(samples: np.ndarray) -> bytes:
    """zlib stream of filter-0 scanlines; ``samples`` is (H, W) or (H, W, C) big-endian-ready."""
    rows = samples.reshape(samples.shape[0], -1)
    return zlib.compress(b"".join(b"\x00" + row.tobytes() for row in rows))


def tiff_header(width: int, height: int, endian: str = "<") -> bytes:
    """A baseline TIFF whose first IFD claims ``width x height`` 8-bit gray, one byte of data."""
    tags = [(256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 4, 0)]
    tags += [(277, 3, 1), (278, 4, height), (279, 4, 1)]
    data_offset = 8 + 2 + 12 * len(tags) + 4
    ifd = struct.pack(endian + "H", len(tags))
    for tag, typ, value in tags:
        value = data_offset if tag == 273 else value
        # Values sit left-justified in the 4-byte field: a SHORT takes its first two bytes.
        field = struct.pack(endian + "HH", value, 0) if typ == 3 else struct.pack(endian + "I", value)
        ifd += struct.pack(endian + "HHI", tag, typ, 1) + field
    magic = b"II*\x00" if endian == "<" else b"MM\x00*"
    return magic + struct.pack(endian + "I", 8) + ifd + struct.pack(endian + "I", 0) + b"\x00"


def gif_header(screen: tuple[int, int], frame: tuple[int, int]) -> bytes:
    """A GIF with a 2-colour palette and one frame descriptor of ``frame`` size (LZW data left short)."""
    head = b"GIF89a" + struct.pack("<HHBBB", *screen, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    descriptor = b"," + struct.pack("<HHHHB", 0, 0, *frame, 0)
    return head + descriptor + b"\x02\x02\x44\x01\x00;"


def bmp_header(width: int, height: int) -> bytes:
    return (
        b"BM"
        + struct.pack("<IHHI", 54 + 4, 0, 0, 54)
        + struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 4, 2835, 2835, 0, 0)
        + b"\x00" * 4
    )


def webp_vp8x_header(width: int, height: int) -> bytes:
    payload = b"\x00" * 4 + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    body = b"WEBP" + b"VP8X" + struct.pack("<I", len(payload)) + payload
    return b"RIFF" + struct.pack("<I", len(body)) + body


def webp_vp8l_header(width: int, height: int) -> bytes:
    payload = b"\x2f" + struct.pack("<I", (width - 1) | ((height - 1) << 14)) + b"\x00" * 8
    body = b"WEBP" + b"VP8L" + struct.pack("<I", len(payload)) + payload
    return b"RIFF" + struct.pack("<I", len(body)) + body


def webp_vp8_header(width: int, height: int) -> bytes:
    payload = b"\x00\x00\x00" + b"\x9d\x01\x2a" + struct.pack("<HH", width, height) + b"\x00" * 8
    body = b"WEBP" + b"VP8 " + struct.pack("<I", len(payload)) + payload
    return b"RIFF" + struct.pack("<I", len(body)) + body


def jpeg_header(width: int, height: int) -> bytes:
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, height, width, 1) + b"\x01\x11\x00"
    return b"\xff\xd8" + b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00" + b"\x00" * 9 + sof + b"\xff\xd9"


def exif(orientation: int) -> Image.Exif:
    tags = Image.Exif()
    tags[0x0112] = orientation
    return tags


def pixel(img: Image.Image, xy: tuple[int, int]) -> tuple[int, ...]:
    value = img.getpixel(xy)
    assert isinstance(value, tuple)
    return value


def close_to(actual: tuple[int, ...], expected: tuple[int, ...], tol: int) -> bool:
    return all(abs(a - e) <= tol for a, e in zip(actual, expected, strict=True))


# --- accepts --------------------------------------------------------------------------------------------

LOSSLESS = [
    ("png", {}),
    ("webp", {"lossless": True}),
    ("bmp", {}),
    ("tiff", {}),
    ("tiff", {"compression": "tiff_lzw"}),
]
LOSSY = [("jpeg", {"quality": 95}), ("webp", {"quality": 95}), ("jpeg", {"progressive": True})]


@pytest.mark.parametrize("size", [(1, 1), (37, 23)])
@pytest.mark.parametrize(("fmt", "save"), LOSSLESS + LOSSY, ids=lambda v: str(v))
def test_each_allowed_format_decodes_to_rgb(fmt: str, save: dict[str, object], size: tuple[int, int]) -> None:
    src = noise(*size)
    data = encode(src, fmt, **save)
    out = decode_image(data)
    assert (out.format, out.image.mode, out.image.size, (out.width, out.height)) == (fmt, "RGB", size, size)
    assert out.orientation == 1
    assert out.n_bytes == len(data)
    assert out.sha256 == hashlib.sha256(data).hexdigest()
    if (fmt, save) in LOSSLESS:
        assert np.array_equal(np.asarray(out.image), np.asarray(src))


def test_gif_is_palette_decoded_exactly() -> None:
    src = Image.new("P", (6, 4))
    src.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    src.putpixel((5, 3), 1)
    out = decode_image(encode(src, "gif"))
    assert (out.format, out.original_mode) == ("gif", "P")
    assert pixel(out.image, (0, 0)) == (255, 0, 0)
    assert pixel(out.image, (5, 3)) == (0, 0, 255)


def test_cmyk_jpeg_with_adobe_marker_is_converted_not_inverted() -> None:
    data = encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "jpeg", quality=95)
    assert b"Adobe" in data  # Pillow writes the APP14 marker (inverted CMYK); decode must undo it
    out = decode_image(data)
    assert out.original_mode == "CMYK"
    assert close_to(pixel(out.image, (8, 8)), (255, 0, 0), tol=8)


def test_cmyk_tiff_is_exact() -> None:
    out = decode_image(encode(Image.new("CMYK", (3, 2), (0, 255, 255, 0)), "tiff"))
    assert out.original_mode == "CMYK"
    assert pixel(out.image, (0, 0)) == (255, 0, 0)


SIXTEEN_BIT = np.array([[0, 255, 256, 4660], [32768, 40000, 65280, 65535]], dtype=np.uint16)
SIXTEEN_BIT_TOP_BYTE = (SIXTEEN_BIT >> 8).astype(np.uint8)  # 4660 = 0x1234 -> 0x12, never clipped to 255


def test_16_bit_grayscale_png_is_scaled_by_its_top_byte() -> None:
    data = encode(Image.fromarray(SIXTEEN_BIT), "png")
    out = decode_image(data)
    assert out.original_mode == "I;16"
    rgb = np.asarray(out.image)
    for channel in range(3):
        assert np.array_equal(rgb[..., channel], SIXTEEN_BIT_TOP_BYTE)


def test_16_bit_big_endian_tiff_is_scaled() -> None:
    src = Image.frombytes("I;16B", (4, 2), SIXTEEN_BIT.astype(">u2").tobytes())
    out = decode_image(encode(src, "tiff"))
    assert out.original_mode == "I;16B"
    assert np.array_equal(np.asarray(out.image)[..., 0], SIXTEEN_BIT_TOP_BYTE)


def test_32_bit_integer_tiff_is_read_as_16_bit_data() -> None:
    src = Image.fromarray(SIXTEEN_BIT.astype(np.int32))
    assert src.mode == "I"
    out = decode_image(encode(src, "tiff"))
    assert out.original_mode == "I"
    assert np.array_equal(np.asarray(out.image)[..., 1], SIXTEEN_BIT_TOP_BYTE)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([0.0, 0.5, 1.0], [0, 128, 255]),  # [0, 1] data scaled by 255
        ([0.0, 100.0, 255.0], [0, 100, 255]),  # already 8-bit range: kept
        ([-1.0, 1.0, 3.0], [0, 128, 255]),  # anything else: min-max
    ],
)
def test_float_tiff_is_scaled_sensibly(values: list[float], expected: list[int]) -> None:
    src = Image.fromarray(np.array([values], dtype=np.float32))
    out = decode_image(encode(src, "tiff"))
    assert out.original_mode == "F"
    assert np.asarray(out.image)[0, :, 0].tolist() == expected


def test_16_bit_rgb_png_keeps_the_top_byte_of_each_sample() -> None:
    samples = np.array([[[0x1234, 0xABCD, 0xFFFF], [0x00FF, 0x0100, 0x8000]]], dtype=">u2")  # (1, 2, 3)
    out = decode_image(hand_png(2, 1, 16, 2, png_rows(samples)))
    assert pixel(out.image, (0, 0)) == (0x12, 0xAB, 0xFF)
    assert pixel(out.image, (1, 0)) == (0x00, 0x01, 0x80)


def test_16_bit_grayscale_with_transparent_colour_is_white_there() -> None:
    samples = np.array([[0x0000, 0x1234, 0xFFFF]], dtype=">u2")
    data = hand_png(3, 1, 16, 0, png_rows(samples), png_chunk(b"tRNS", struct.pack(">H", 0x1234)))
    out = decode_image(data)
    assert [pixel(out.image, (x, 0)) for x in range(3)] == [(0, 0, 0), WHITE, (255, 255, 255)]


@pytest.mark.parametrize("fmt", ["png", "gif"])
def test_palette_with_transparent_index_is_white_there(fmt: str) -> None:
    src = Image.new("P", (4, 2), 1)
    src.putpalette([12, 34, 56, 200, 10, 20] + [0] * 762)
    src.putpixel((0, 0), 0)
    out = decode_image(encode(src, fmt, transparency=0))
    assert out.original_mode == "P"
    assert pixel(out.image, (0, 0)) == WHITE  # index 0 hides (12, 34, 56): must not show through
    assert pixel(out.image, (3, 1)) == (200, 10, 20)


def test_palette_with_per_index_alpha_blends_on_white() -> None:
    src = Image.new("P", (2, 1))
    src.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    src.putpixel((1, 0), 1)
    out = decode_image(encode(src, "png", transparency=bytes([128, 255])))
    assert close_to(pixel(out.image, (0, 0)), (127, 127, 127), tol=1)
    assert pixel(out.image, (1, 0)) == (255, 0, 0)


@pytest.mark.parametrize("fmt", ["png", "webp", "tiff"])
def test_rgba_is_composited_on_white(fmt: str) -> None:
    src = Image.new("RGBA", (3, 1))
    src.putdata([(10, 20, 30, 0), (255, 0, 0, 255), (0, 0, 0, 128)])
    save = {"lossless": True, "exact": True} if fmt == "webp" else {}
    out = decode_image(encode(src, fmt, **save))
    assert out.original_mode == "RGBA"
    assert pixel(out.image, (0, 0)) == WHITE  # fully transparent: white, not (10, 20, 30)
    assert pixel(out.image, (1, 0)) == (255, 0, 0)
    assert close_to(pixel(out.image, (2, 0)), (127, 127, 127), tol=1)


def test_la_is_composited_on_white() -> None:
    src = Image.new("LA", (3, 1))
    src.putdata([(0, 0), (0, 255), (0, 128)])
    out = decode_image(encode(src, "png"))
    assert out.original_mode == "LA"
    assert [pixel(out.image, (x, 0)) for x in range(2)] == [WHITE, (0, 0, 0)]
    assert close_to(pixel(out.image, (2, 0)), (127, 127, 127), tol=1)


@pytest.mark.parametrize("fmt", ["png", "bmp", "tiff", "gif"])
def test_one_bit_is_black_and_white(fmt: str) -> None:
    src = Image.new("1", (9, 3), 0)
    src.putpixel((8, 2), 1)
    out = decode_image(encode(src, fmt))
    assert pixel(out.image, (0, 0)) == (0, 0, 0)
    assert pixel(out.image, (8, 2)) == WHITE


@pytest.mark.parametrize("fmt", ["png", "jpeg", "bmp", "tiff", "webp"])
def test_grayscale_l(fmt: str) -> None:
    out = decode_image(
        encode(Image.new("L", (8, 8), 77), fmt, **({"lossless": True} if fmt == "webp" else {}))
    )
    assert close_to(pixel(out.image, (4, 4)), (77, 77, 77), tol=1)


def test_ycbcr_and_lab_tiffs_convert_to_rgb() -> None:
    ycc = decode_image(encode(Image.new("RGB", (2, 2), (200, 30, 40)).convert("YCbCr"), "tiff"))
    assert ycc.original_mode == "YCbCr"
    assert close_to(pixel(ycc.image, (0, 0)), (200, 30, 40), tol=3)
    lab = decode_image(encode(Image.new("LAB", (2, 2), (128, 128, 128)), "tiff"))  # mid-grey L*, neutral
    assert lab.original_mode == "LAB"
    assert close_to(pixel(lab.image, (1, 1)), (119, 119, 119), tol=3)


def test_animated_gif_gives_its_first_frame() -> None:
    frames = [Image.new("RGB", (8, 6), colour) for colour in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    data = encode(frames[0], "gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3
    out = decode_image(data)
    assert pixel(out.image, (4, 3)) == (255, 0, 0)


def test_multi_page_tiff_gives_its_first_page() -> None:
    pages = [Image.new("RGB", (10, 8), (255, 0, 0)), Image.new("RGB", (20, 30), (0, 255, 0))]
    data = encode(pages[0], "tiff", save_all=True, append_images=pages[1:])
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 2
    out = decode_image(data)
    assert out.image.size == (10, 8)
    assert pixel(out.image, (5, 5)) == (255, 0, 0)


def quadrants(width: int, height: int) -> Image.Image:
    """Red top-left, green top-right, blue bottom-left, white bottom-right."""
    img = Image.new("RGB", (width, height))
    half_w, half_h = width // 2, height // 2
    for box, colour in [
        ((0, 0, half_w, half_h), (255, 0, 0)),
        ((half_w, 0, width, half_h), (0, 255, 0)),
        ((0, half_h, half_w, height), (0, 0, 255)),
        ((half_w, half_h, width, height), WHITE),
    ]:
        img.paste(colour, box)
    return img


@pytest.mark.parametrize(
    ("orientation", "size", "top_left", "top_right"),
    [
        (3, (64, 32), WHITE, (0, 0, 255)),  # 180 degrees
        (6, (32, 64), (0, 0, 255), (255, 0, 0)),  # stored sideways: turn 90 clockwise to view
        (8, (32, 64), (0, 255, 0), WHITE),  # turn 90 counter-clockwise to view
    ],
)
def test_exif_orientation_is_applied(
    orientation: int, size: tuple[int, int], top_left: tuple[int, ...], top_right: tuple[int, ...]
) -> None:
    data = encode(quadrants(64, 32), "jpeg", quality=95, exif=exif(orientation).tobytes())
    out = decode_image(data)
    assert out.orientation == orientation
    assert out.image.size == (out.width, out.height) == size
    width, _ = size
    assert close_to(pixel(out.image, (4, 4)), top_left, tol=12)
    assert close_to(pixel(out.image, (width - 5, 4)), top_right, tol=12)
    # The orientation tag is gone with the EXIF, so nothing downstream can rotate the image twice.
    assert ImageOps.exif_transpose(out.image).size == size


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_matches_pillow_exif_transpose(orientation: int) -> None:
    data = encode(noise(7, 5), "png", exif=exif(orientation))
    expected = ImageOps.exif_transpose(Image.open(io.BytesIO(data)).convert("RGB"))
    out = decode_image(data)
    assert out.orientation == orientation
    assert np.array_equal(np.asarray(out.image), np.asarray(expected))


@pytest.mark.parametrize(
    "app1",
    [
        b"Exif\x00\x00" + b"\xde\xad\xbe\xef" * 8,  # garbage after the EXIF header
        b"Exif\x00\x00II*\x00\xff\xff\xff\x7f",  # IFD offset far past the end
        b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x01\x01\x12\x00\x03\x00\x00\x00\x01\x00\x09\x00\x00",
    ],
    ids=["garbage", "bad-offset", "orientation-9"],
)
def test_bad_exif_is_ignored(app1: bytes) -> None:
    jpeg = encode(noise(8, 4), "jpeg")
    segment = b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow warns about the corrupt EXIF; that is the point here
        out = decode_image(jpeg[:2] + segment + jpeg[2:])
    assert (out.orientation, out.image.size) == (1, (8, 4))


def test_probe_reads_the_header_only() -> None:
    data = encode(Image.new("CMYK", (40, 20)), "jpeg", exif=exif(6).tobytes())
    info = probe_image(data)
    assert (info.format, info.width, info.height, info.mode) == ("jpeg", 40, 20, "CMYK")  # stored size


def test_file_name_and_extension_play_no_part(tmp_path: Path) -> None:
    png = tmp_path / "holiday.txt"
    png.write_bytes(encode(noise(5, 4), "png"))
    assert decode_file(png).format == "png"
    fake = tmp_path / "cat.jpg"
    fake.write_bytes(b"just some text, named like a photo\n")
    with pytest.raises(UnsupportedFormat, match="plain text"):
        decode_file(str(fake))


def test_max_side_uses_jpeg_draft_and_bounds_the_result() -> None:
    src = quadrants(1600, 1200)
    data = encode(src, "jpeg", quality=90)
    small = decode_image(data, max_side=200)
    assert small.image.size == (small.width, small.height) == (200, 150)
    full = decode_image(data).image.resize((200, 150), Image.Resampling.LANCZOS)
    # Draft decodes at 1/4 scale (400 x 300) first: close to, not equal to, full decode + resize.
    diff = np.abs(np.asarray(small.image, np.int16) - np.asarray(full, np.int16))
    assert diff.mean() < 2.0


def test_max_side_resizes_other_formats_and_never_upscales() -> None:
    data = encode(noise(300, 100), "png")
    assert decode_image(data, max_side=60).image.size == (60, 20)
    assert decode_image(data, max_side=1000).image.size == (300, 100)


@pytest.mark.parametrize(
    ("fmt", "save"),
    [
        ("jpeg", {}),
        ("jpeg", {"progressive": True, "exif": exif(3).tobytes()}),
        ("png", {}),
        ("gif", {}),
        ("bmp", {}),
        ("tiff", {}),
        ("tiff", {"compression": "tiff_lzw"}),
        ("webp", {}),  # VP8
        ("webp", {"lossless": True}),  # VP8L
        ("webp", {"exif": exif(1).tobytes()}),  # VP8X
    ],
    ids=lambda v: str(v),
)
def test_our_header_reader_agrees_with_pillow(fmt: str, save: dict[str, object]) -> None:
    data = encode(noise(123, 45), fmt, **save)
    assert _header_size(fmt, data) == Image.open(io.BytesIO(data)).size == (123, 45)


# --- refuses: not an image --------------------------------------------------------------------------


def zip_bytes() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr("photo.jpg", b"\xff\xd8\xff not really")
    return buf.getvalue()


NON_IMAGES = {
    "plain text": b"Hello, this is a caption file.\nLine two.\n",
    "PDF": b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\nendobj\n",
    "SVG": b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>',
    "HTML": b"<!DOCTYPE html>\n<html><body><img src=x></body></html>",
    "ELF": b"\x7fELF\x02\x01\x01\x00" + b"\x00" * 56,
    "EPS": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n",
    "ZIP": zip_bytes(),
    "empty": b"",
    "HEIC": b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic",
    "text starting with BM": b"BMW and Mercedes are car makers, not bitmaps.\n",
}
NAMED_AS = {
    "plain text": "plain text",
    "PDF": "PDF",
    "SVG": "SVG",
    "HTML": "HTML",
    "ELF": "ELF",
    "EPS": "EPS",
    "ZIP": "ZIP",
    "empty": "empty",
    "HEIC": "HEIC",
    "text starting with BM": "plain text",
}


@pytest.mark.parametrize("kind", list(NON_IMAGES))
def test_non_images_are_unsupported_and_named(kind: str) -> None:
    data = NON_IMAGES[kind]
    for call in (sniff_format, probe_image, decode_image):
        with pytest.raises(UnsupportedFormat, match=NAMED_AS[kind]) as caught:
            call(data)
        assert caught.value.status == 415


# --- refuses: corrupt ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "save"),
    [
        ("jpeg", {}),
        ("jpeg", {"progressive": True}),
        ("png", {}),
        ("webp", {}),
        ("gif", {}),
        ("bmp", {}),
        ("tiff", {}),
    ],
    ids=lambda v: str(v),
)
@pytest.mark.parametrize("keep", [0.1, 0.5, 0.95])
def test_truncated_images_are_corrupt(fmt: str, save: dict[str, object], keep: float) -> None:
    data = encode(noise(64, 48), fmt, **save)
    with pytest.raises(CorruptImage) as caught:
        decode_image(data[: int(len(data) * keep)])
    assert caught.value.status == 422
    assert fmt in caught.value.message


def test_png_with_bad_ihdr_crc_is_corrupt() -> None:
    data = bytearray(encode(noise(4, 4), "png"))
    data[29] ^= 0xFF  # last byte of the IHDR CRC
    with pytest.raises(CorruptImage, match="png"):
        decode_image(bytes(data))


def test_png_with_bad_zlib_stream_is_corrupt() -> None:
    data = hand_png(4, 4, 8, 2, b"\x78\x9c" + b"\xff\xfe\xfd" * 10)  # valid CRC, garbage deflate
    with pytest.raises(CorruptImage, match="png"):
        decode_image(data)


@pytest.mark.parametrize(
    "data",
    [
        b"\xff\xd8\xff" + b"\x00garbage" * 8,  # JPEG magic then no valid segments
        b"\x89PNG\r\n\x1a\n" + b"\x00" * 40,  # PNG signature without IHDR
        b"GIF89a\x04\x00\x04\x00",  # GIF header and nothing else
        b"II*\x00\xff\xff\x00\x00",  # TIFF IFD offset past the end
        b"BM" + b"\x00" * 12 + struct.pack("<I", 40) + b"\xff" * 8,  # BMP cut inside its header
        b"RIFF\x10\x00\x00\x00WEBPJUNK\x04\x00\x00\x00abcd",  # WebP without a VP8 chunk
    ],
    ids=["jpeg", "png", "gif", "tiff", "bmp", "webp"],
)
@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns while reading the broken TIFF IFD
def test_corrupt_headers_are_corrupt(data: bytes) -> None:
    with pytest.raises(CorruptImage):
        probe_image(data)
    with pytest.raises(CorruptImage):
        decode_image(data)


# --- refuses: too many bytes ----------------------------------------------------------------------------


def test_byte_cap_is_checked_first_and_is_inclusive() -> None:
    data = encode(noise(16, 16), "png")
    assert decode_image(data, DecodeLimits(max_bytes=len(data))).n_bytes == len(data)
    with pytest.raises(PayloadTooLarge, match="over the cap") as caught:
        decode_image(data, DecodeLimits(max_bytes=len(data) - 1))
    assert caught.value.status == 413
    with pytest.raises(PayloadTooLarge):  # before sniffing: text over the cap is still "too large"
        probe_image(b"x" * 101, DecodeLimits(max_bytes=100))


@pytest.fixture
def peak_traced_bytes() -> Iterator[Callable[[], int]]:
    """Trace Python allocations for the test; call the returned function for the peak so far."""
    tracemalloc.start()
    try:
        yield lambda: tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_decode_file_reads_at_most_one_byte_past_the_cap(
    tmp_path: Path, peak_traced_bytes: Callable[[], int]
) -> None:
    huge = tmp_path / "huge.png"
    with huge.open("wb") as f:
        f.write(encode(noise(4, 4), "png"))
        f.truncate(4 * 1024**3)  # a sparse 4 GiB file: reading it whole would allocate 4 GiB
    with pytest.raises(PayloadTooLarge, match="1,048,577 bytes"):
        decode_file(huge, DecodeLimits(max_bytes=1024 * 1024))
    assert peak_traced_bytes() < 3 * 1024 * 1024


# --- refuses: too many pixels, from the header -----------------------------------------------------------


@pytest.fixture
def no_pixel_buffers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any attempt to allocate an image canvas fail the test (Pillow's C allocations are not traced)."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"pixel buffer allocated: {args}")

    monkeypatch.setattr(Image.core, "new", refuse)
    monkeypatch.setattr(Image.core, "fill", refuse)
    monkeypatch.setattr(WebPImagePlugin._webp, "WebPAnimDecoder", refuse)


BOMBS = {
    "png 50000 x 50000": hand_png(50_000, 50_000, 8, 2, zlib.compress(b"\x00" * 64)),
    "gif 65535 x 65535": gif_header((65_535, 65_535), (1, 1)),
    "tiff 100000 x 100000": tiff_header(100_000, 100_000),
    "tiff big-endian 100000 x 100000": tiff_header(100_000, 100_000, endian=">"),
    "bmp 100000 x 100000": bmp_header(100_000, 100_000),
    "bmp top-down 100000 x -100000": bmp_header(100_000, -100_000),
    "webp VP8X 16777216 x 16777216": webp_vp8x_header(2**24, 2**24),
    "webp VP8L 16384 x 16384": webp_vp8l_header(16_384, 16_384),
    "webp VP8 16383 x 16383": webp_vp8_header(16_383, 16_383),
    "jpeg 65500 x 65500": jpeg_header(65_500, 65_500),
    "tiff 8000 x 8000 (under Pillow's own limit)": tiff_header(8_000, 8_000),
}


@pytest.mark.usefixtures("no_pixel_buffers")
@pytest.mark.parametrize("name", list(BOMBS))
def test_bombs_are_refused_from_the_header(name: str, peak_traced_bytes: Callable[[], int]) -> None:
    for call in (probe_image, decode_image):
        with pytest.raises(ImageTooLarge, match="over the cap of 50,000,000 pixels") as caught:
            call(BOMBS[name])
        assert caught.value.status == 413
    assert peak_traced_bytes() < 20 * 1024 * 1024


@pytest.mark.usefixtures("no_pixel_buffers")
def test_our_cap_holds_even_when_pillows_is_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    # Any library may switch Pillow's global check off (ultralytics' compress_one_image does).
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    for name in ("png 50000 x 50000", "webp VP8L 16384 x 16384", "jpeg 65500 x 65500"):
        with pytest.raises(ImageTooLarge, match="over the cap"):
            decode_image(BOMBS[name])


@pytest.mark.usefixtures("no_pixel_buffers")
def test_gif_frame_larger_than_its_screen_is_refused() -> None:
    # The screen says 10 x 10; the first frame's descriptor grows Pillow's canvas to 8000 x 8000.
    with pytest.raises(ImageTooLarge, match="8000 x 8000"):
        decode_image(gif_header((10, 10), (8_000, 8_000)))


def test_pixel_cap_is_inclusive() -> None:
    data = encode(noise(40, 25), "png")
    assert probe_image(data, DecodeLimits(max_pixels=1000)).width == 40
    with pytest.raises(ImageTooLarge):
        decode_image(data, DecodeLimits(max_pixels=999))


@pytest.mark.usefixtures("no_pixel_buffers")
def test_pillow_bomb_error_is_image_too_large_when_our_cap_is_higher() -> None:
    # A caller's cap above Pillow's process-wide one: Pillow refuses first, with the same typed error.
    with pytest.raises(ImageTooLarge, match="Pillow"):
        decode_image(BOMBS["png 50000 x 50000"], DecodeLimits(max_pixels=10**12))


def test_pillow_bomb_warning_raised_as_error_is_image_too_large(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    data = encode(noise(40, 30), "png")  # 1200 pixels: over Pillow's warning level, under its error level
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(ImageTooLarge, match="Pillow"):
            decode_image(data)


def test_default_limits() -> None:
    assert (DEFAULT_LIMITS.max_bytes, DEFAULT_LIMITS.max_pixels) == (20 * 1024 * 1024, 50_000_000)
    with pytest.raises(ValueError, match="positive"):
        DecodeLimits(max_pixels=0)
