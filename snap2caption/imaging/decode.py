"""The one safe image decoder: every byte string that enters Snap2Caption is decoded here.

The ETL, training and every service call :func:`decode_image` (or :func:`decode_file`), so an image
is judged and normalised the same way everywhere. Checks run cheapest first and refuse before any
pixel is decoded:

1. byte cap (:class:`PayloadTooLarge`);
2. format allowlist by magic bytes only, never by file name or content type (:class:`UnsupportedFormat`);
3. pixel cap from our own read of the header, before Pillow sees the bytes (:class:`ImageTooLarge`),
   because some Pillow plugins (WebP) allocate the whole canvas while *opening*;
4. Pillow opens the header with only the sniffed plugin allowed; its size is checked again
   (a GIF frame may grow the canvas), then pixels are decoded.

Every Pillow failure becomes a :class:`CorruptImage` (or :class:`ImageTooLarge` for Pillow's own
decompression-bomb check); no raw Pillow exception leaves this module.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import struct
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from PIL import ExifTags, Image, ImageFile, UnidentifiedImageError

from snap2caption.errors import CorruptImage, ImageTooLarge, PayloadTooLarge, UnsupportedFormat
from snap2caption.imaging.transforms import resize_max_side, scaled_size

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecodeLimits:
    """Caps applied before any pixel is decoded.

    Attributes:
        max_bytes: Largest accepted input, in bytes.
        max_pixels: Largest accepted ``width * height`` of the stored image (first frame or page).
            Pillow's process-wide bomb check (``PIL.Image.MAX_IMAGE_PIXELS``, refusing above twice that
            value) still applies on top, so a cap above about 179 MP only takes effect if the
            process owner raises Pillow's limit deliberately; that refusal is an ``ImageTooLarge`` too.
    """

    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 50_000_000

    def __post_init__(self) -> None:
        if self.max_bytes <= 0 or self.max_pixels <= 0:
            raise ValueError(f"limits must be positive, got {self}")


DEFAULT_LIMITS = DecodeLimits()
ALLOWED_FORMATS = ("jpeg", "png", "webp", "gif", "bmp", "tiff")

# Our format name -> Pillow's plugin id, so Image.open may only try the plugin the magic bytes named.
_PILLOW_FORMAT = {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP", "gif": "GIF", "bmp": "BMP", "tiff": "TIFF"}

# What Pillow raises on truncated or corrupt data (UnidentifiedImageError is an OSError; zlib.error
# and struct.error come from chunk parsing; the rest from plugins reading garbage fields).
_CORRUPT_ERRORS: tuple[type[Exception], ...] = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
    zlib.error,
    IndexError,
    KeyError,
    TypeError,
)

# EXIF orientation -> the transpose that displays the image upright (ImageOps.exif_transpose's table).
_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

# EXIF orientations that swap width and height (transpose, rotate 90/270, transverse).
_SWAPS_SIDES = frozenset({5, 6, 7, 8})

# Metadata that would make a viewer (or exif_transpose) rotate an already-upright image again.
_ORIENTATION_METADATA = ("exif", "Raw profile type exif", "XML:com.adobe.xmp", "xmp")

_WHITE = (255, 255, 255)
_HIGH_DEPTH_GRAY = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES_PASTABLE = ("RGBA", "RGBa", "LA")  # Image.paste onto RGB takes these directly


@dataclass(frozen=True)
class ImageInfo:
    """What the header says, read without decoding pixels.

    Attributes:
        format: One of ``ALLOWED_FORMATS``.
        width: Width as stored (before EXIF orientation).
        height: Height as stored.
        mode: Pillow's mode for the stored pixels (``"CMYK"``, ``"I;16"``, ``"P"``...).
    """

    format: str
    width: int
    height: int
    mode: str

    def upright_size(self, orientation: int) -> tuple[int, int]:
        """``(width, height)`` once EXIF ``orientation`` is applied (5-8 swap the sides)."""
        return (self.height, self.width) if orientation in _SWAPS_SIDES else (self.width, self.height)


@dataclass(frozen=True)
class DecodedImage:
    """A decoded image, normalised for every consumer.

    Attributes:
        image: Mode ``"RGB"``, EXIF orientation applied, first frame or page, alpha composited on white.
        format: One of ``ALLOWED_FORMATS``.
        width: Width of ``image`` (after EXIF orientation, and after ``max_side`` when given).
        height: Height of ``image``.
        original_mode: Pillow's mode of the stored pixels.
        orientation: The EXIF orientation that was applied (1 when none or unreadable).
        n_bytes: Size of the raw input.
        sha256: Hex SHA-256 of the raw input bytes.
    """

    image: Image.Image
    format: str
    width: int
    height: int
    original_mode: str
    orientation: int
    n_bytes: int
    sha256: str


# --- magic bytes --------------------------------------------------------------------------------------

# Formats we refuse, named so the 415 message tells the client what it actually sent.
_KNOWN_OTHERS: tuple[tuple[bytes, str], ...] = (
    (b"%PDF-", "a PDF document"),
    (b"%!PS", "PostScript/EPS"),
    (b"\xc5\xd0\xd3\xc6", "EPS (DOS binary)"),
    (b"\x7fELF", "an ELF executable"),
    (b"PK\x03\x04", "a ZIP archive"),
    (b"PK\x05\x06", "a ZIP archive"),
    (b"PK\x07\x08", "a ZIP archive"),
    (b"\x1f\x8b", "gzip data"),
    (b"Rar!\x1a\x07", "a RAR archive"),
    (b"7z\xbc\xaf\x27\x1c", "a 7z archive"),
    (b"II+\x00", "BigTIFF (not supported)"),
    (b"MM\x00+", "BigTIFF (not supported)"),
    (b"8BPS", "a Photoshop PSD"),
    (b"\x00\x00\x01\x00", "an ICO icon"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"),
    (b"\xffO\xffQ", "JPEG 2000 codestream"),
    (b"qoif", "a QOI image"),
    (b"DDS ", "a DDS texture"),
)
_BMP_DIB_HEADER_SIZES = (12, 16, 40, 52, 56, 64, 108, 124)


def sniff_format(data: bytes) -> str:
    """Name the image format from magic bytes alone.

    Args:
        data: The raw bytes (only the first kilobyte is looked at).

    Returns:
        One of ``ALLOWED_FORMATS``.

    Raises:
        UnsupportedFormat: The bytes are not an allowed format; the message says what they look like
            (empty, plain text, PDF, SVG, HTML, XML, ELF, EPS/PostScript, ZIP, HEIC/AVIF, ...).
    """
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    # "BM" is only two bytes, so also require a known DIB header size: text that starts with "BM"
    # is text. A file too short to hold that field is a truncated BMP (judged corrupt later).
    if data[:2] == b"BM" and (len(data) < 18 or _u32le(data, 14) in _BMP_DIB_HEADER_SIZES):
        return "bmp"
    raise UnsupportedFormat(
        f"unsupported format: the bytes look like {_describe_non_image(data)}; allowed formats are "
        f"{', '.join(ALLOWED_FORMATS)} (judged by content, not by file name or content type)"
    )


def _describe_non_image(data: bytes) -> str:
    """Say what bytes that are no allowed image look like, for the error message."""
    if not data:
        return "nothing (empty input, 0 bytes)"
    for magic, name in _KNOWN_OTHERS:
        if data.startswith(magic):
            return name
    if data[4:8] == b"ftyp":  # ISO base media: HEIC/AVIF photos, MP4/MOV video
        brand = data[8:12]
        if brand in (b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1"):
            return "a HEIC/HEIF image"
        if brand in (b"avif", b"avis"):
            return "an AVIF image"
        return "ISO media (MP4/MOV)"
    if data[:4] == b"RIFF":
        return f"a RIFF {data[8:12].decode('latin-1')!r} container, not WebP"
    if data[:4] == b"GIF8":
        return "a GIF with an unknown version"
    head = data[:1024].removeprefix(b"\xef\xbb\xbf").lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html", b"<head", b"<body")):
        return "an HTML document"
    if b"<svg" in head:
        return "an SVG image (XML)"
    if head.startswith(b"<?xml"):
        return "an XML document"
    if _looks_like_text(data[:1024]):
        return "plain text"
    return f"unrecognised binary data (starts {data[:8].hex(' ')})"


def _looks_like_text(head: bytes) -> bool:
    """UTF-8 (or ASCII) with almost no control bytes."""
    text = head.decode("utf-8", errors="replace")
    bad = sum(1 for ch in text if ch == "\ufffd" or (ord(ch) < 32 and ch not in "\t\n\r\f\b"))
    return bad <= len(text) // 50  # tolerate a multi-byte character cut at the end


# --- header dimensions, read by us before Pillow --------------------------------------------------------


def _u16le(data: bytes, offset: int) -> int:
    return int.from_bytes(data[offset : offset + 2], "little")


def _u32le(data: bytes, offset: int) -> int:
    return int.from_bytes(data[offset : offset + 4], "little")


def _u16be(data: bytes, offset: int) -> int:
    return int.from_bytes(data[offset : offset + 2], "big")


def _header_size(fmt: str, data: bytes) -> tuple[int, int] | None:
    """(width, height) from the raw header, or None when it cannot be found there."""
    if fmt == "png":
        # Signature (8), then IHDR: length (4), b"IHDR", width (4, BE), height (4, BE).
        if len(data) < 24 or data[12:16] != b"IHDR":
            return None
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if fmt == "gif":
        # Logical screen size; Pillow grows the canvas if a frame is larger (checked after open).
        return (_u16le(data, 6), _u16le(data, 8)) if len(data) >= 10 else None
    if fmt == "bmp":
        return _bmp_size(data)
    if fmt == "webp":
        return _webp_size(data)
    if fmt == "jpeg":
        return _jpeg_size(data)
    return _tiff_size(data)


def _bmp_size(data: bytes) -> tuple[int, int] | None:
    if len(data) < 26:
        return None
    if _u32le(data, 14) == 12:  # OS/2 BITMAPCOREHEADER: unsigned 16-bit fields
        return _u16le(data, 18), _u16le(data, 20)
    # BITMAPINFOHEADER and later: signed 32-bit, a negative height means top-down rows.
    width, height = struct.unpack_from("<ii", data, 18)
    return abs(width), abs(height)


def _webp_size(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8X" and len(data) >= 30:  # canvas size - 1, 24-bit little-endian each
        return (
            int.from_bytes(data[24:27], "little") + 1,
            int.from_bytes(data[27:30], "little") + 1,
        )
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:  # 14-bit (size - 1) fields
        bits = _u32le(data, 21)
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":  # 14-bit sizes
        return _u16le(data, 26) & 0x3FFF, _u16le(data, 28) & 0x3FFF
    return None


# Start-of-frame markers carry the size; C4 (DHT), C8 (JPG) and CC (DAC) share the range but do not.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """Walk the marker segments (skipping their payloads, so EXIF thumbnails are never seen)."""
    i = 2
    while i + 1 < len(data):
        if data[i] != 0xFF:
            return None
        while i < len(data) and data[i] == 0xFF:  # fill bytes may precede a marker
            i += 1
        if i + 7 >= len(data):
            return None
        marker = data[i]
        if marker in _JPEG_SOF:
            # marker, length (2), precision (1), height (2), width (2)
            return _u16be(data, i + 6), _u16be(data, i + 4)
        if marker in (0xD9, 0xDA):  # end of image or start of scan before any frame header
            return None
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # standalone markers have no length
            i += 1
            continue
        i += 1 + _u16be(data, i + 1)
    return None


def _tiff_size(data: bytes) -> tuple[int, int] | None:
    """ImageWidth (256) and ImageLength (257) from the first IFD (the first page)."""
    endian = "<" if data[:2] == b"II" else ">"
    if len(data) < 8:
        return None
    ifd = struct.unpack_from(endian + "I", data, 4)[0]
    if ifd + 2 > len(data):
        return None
    n_entries = struct.unpack_from(endian + "H", data, ifd)[0]
    found: dict[int, int] = {}
    for k in range(n_entries):
        entry = ifd + 2 + 12 * k
        if entry + 12 > len(data):
            break
        tag, typ, count = struct.unpack_from(endian + "HHI", data, entry)
        if tag in (256, 257) and count == 1 and typ in (3, 4):  # SHORT or LONG, stored inline
            found[tag] = struct.unpack_from(endian + ("H" if typ == 3 else "I"), data, entry + 8)[0]
    if 256 in found and 257 in found:
        return found[256], found[257]
    return None


def _check_pixels(fmt: str, size: tuple[int, int], limits: DecodeLimits) -> None:
    width, height = size
    if width * height > limits.max_pixels:
        raise ImageTooLarge(
            f"image too large: {fmt} of {width} x {height} = {width * height:,} pixels is over the "
            f"cap of {limits.max_pixels:,} pixels"
        )


# --- open, decode, normalise --------------------------------------------------------------------------


@contextmanager
def _as_image_errors(fmt: str) -> Iterator[None]:
    """Turn whatever Pillow raises into the library's typed errors."""
    try:
        yield
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's process-wide bomb check (the warning arrives here when warnings are errors).
        raise ImageTooLarge(f"image too large: {fmt} refused by Pillow's bomb check: {exc}") from exc
    except UnidentifiedImageError as exc:
        # Its message holds a repr of our BytesIO, useless to a client.
        raise CorruptImage(f"corrupt image: the {fmt} header could not be parsed") from exc
    except _CORRUPT_ERRORS as exc:
        raise CorruptImage(f"corrupt or truncated {fmt}: {exc or type(exc).__name__}") from exc


def _open(data: bytes, limits: DecodeLimits) -> tuple[ImageFile.ImageFile, str]:
    """Run every check that needs no pixels; return the opened (lazy) image and its format."""
    if len(data) > limits.max_bytes:
        raise PayloadTooLarge(
            f"payload too large: {len(data):,} bytes is over the cap of {limits.max_bytes:,} bytes"
        )
    fmt = sniff_format(data)
    size = _header_size(fmt, data)
    if size is None and fmt == "webp":
        # Pillow's WebP plugin allocates the canvas while opening, so never open one of unknown size.
        raise CorruptImage("corrupt image: no VP8/VP8L/VP8X frame header in the webp")
    if size is not None:
        _check_pixels(fmt, size, limits)
    with _as_image_errors(fmt):
        im = Image.open(io.BytesIO(data), formats=[_PILLOW_FORMAT[fmt]])
    _check_pixels(fmt, im.size, limits)
    return im, fmt


def probe_image(data: bytes, limits: DecodeLimits = DEFAULT_LIMITS) -> ImageInfo:
    """Check an image and read its header without decoding pixels.

    Args:
        data: The raw bytes.
        limits: Byte and pixel caps.

    Returns:
        Format, stored size and Pillow mode.

    Raises:
        PayloadTooLarge: More than ``limits.max_bytes`` bytes.
        UnsupportedFormat: Not an allowed format by magic bytes.
        ImageTooLarge: ``width * height`` over ``limits.max_pixels``.
        CorruptImage: The header cannot be parsed.
    """
    im, fmt = _open(data, limits)
    info = ImageInfo(format=fmt, width=im.width, height=im.height, mode=im.mode)
    im.close()
    return info


def decode_image(
    data: bytes, limits: DecodeLimits = DEFAULT_LIMITS, *, max_side: int | None = None
) -> DecodedImage:
    """Check and decode an image into upright RGB.

    Args:
        data: The raw bytes.
        limits: Byte and pixel caps, checked before any pixel is decoded.
        max_side: When given, the returned image's longer side is at most this (aspect kept, never
            upscaled, via :func:`resize_max_side`). For JPEG the decoder then scales by 1/2, 1/4 or
            1/8 in the DCT (Pillow's ``draft``) to no less than the target, which is several times
            faster on large photos but gives slightly different pixels from a full decode followed by
            the same resize: use it on both sides of a comparison, or on neither.

    Returns:
        The RGB image with its provenance (format, original mode, orientation, size, hash).

    Raises:
        PayloadTooLarge: More than ``limits.max_bytes`` bytes.
        UnsupportedFormat: Not an allowed format by magic bytes, or a colour mode with no RGB meaning.
        ImageTooLarge: ``width * height`` over ``limits.max_pixels`` (or Pillow's own bomb check).
        CorruptImage: Truncated or corrupt data.
    """
    if max_side is not None and max_side < 1:
        raise ValueError(f"max_side must be positive, got {max_side}")
    im, fmt = _open(data, limits)
    original_mode = im.mode
    with _as_image_errors(fmt):
        if max_side is not None and fmt == "jpeg":
            # Ask for the final size: draft picks the largest DCT scale that stays at or above it.
            im.draft(None, scaled_size(im.width, im.height, max_side))
        im.load()
        orientation = _exif_orientation(im)
        rgb = _to_rgb(im)
        if orientation != 1:
            rgb = rgb.transpose(_ORIENTATION_TRANSPOSE[orientation])
            for key in _ORIENTATION_METADATA:
                rgb.info.pop(key, None)
        if max_side is not None:
            rgb = resize_max_side(rgb, max_side)
    return DecodedImage(
        image=rgb,
        format=fmt,
        width=rgb.width,
        height=rgb.height,
        original_mode=original_mode,
        orientation=orientation,
        n_bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
    )


def decode_file(
    path: str | os.PathLike[str], limits: DecodeLimits = DEFAULT_LIMITS, *, max_side: int | None = None
) -> DecodedImage:
    """Read at most ``limits.max_bytes + 1`` bytes of a file and decode them.

    A file over the cap is refused after reading one byte past it, never read whole. The file name
    and extension play no part in judging the format.

    Args:
        path: The file to read.
        limits: Byte and pixel caps.
        max_side: As for :func:`decode_image`.

    Returns:
        As for :func:`decode_image`.

    Raises:
        OSError: The file cannot be read (missing, permission...), left to the caller.
        PayloadTooLarge, UnsupportedFormat, ImageTooLarge, CorruptImage: As for :func:`decode_image`.
    """
    with open(path, "rb") as f:  # a buffered read(n) returns n bytes unless the file ends first
        data = f.read(limits.max_bytes + 1)
    return decode_image(data, limits, max_side=max_side)


def _exif_orientation(im: Image.Image) -> int:
    """The EXIF orientation (1..8), or 1 when absent, out of range or the EXIF is corrupt."""
    try:
        value = im.getexif().get(ExifTags.Base.Orientation, 1)
    except _CORRUPT_ERRORS as exc:
        logger.debug("ignoring unreadable EXIF: %s", exc)
        return 1
    return value if isinstance(value, int) and value in _ORIENTATION_TRANSPOSE else 1


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert any decoded mode to RGB, keeping what the pixels mean.

    ``convert("RGB")`` is right for L, 1, P, CMYK (Pillow already undoes Adobe's inverted CMYK JPEGs),
    YCbCr, LAB (through LittleCMS) and HSV; it is wrong for 16-bit and float data (it clips) and for
    alpha (it drops it, showing whatever colour hides under transparent pixels).
    """
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in _HIGH_DEPTH_GRAY or mode == "F":
        return _high_depth_to_rgb(im)
    if im.has_transparency_data:
        return _on_white(im)
    try:
        return im.convert("RGB")
    except ValueError as exc:
        raise UnsupportedFormat(f"unsupported colour mode {mode!r}: {exc}") from exc


def _on_white(im: Image.Image) -> Image.Image:
    """Composite an image with alpha (band, palette alpha or transparent colour) on white."""
    if im.mode == "La":
        im = im.convert("LA")
    elif im.mode not in _ALPHA_MODES_PASTABLE:
        im = im.convert("RGBA")  # P/PA/1/L/RGB with a transparency key or a palette alpha
    out = Image.new("RGB", im.size, _WHITE)
    # Pasting with the image as its own mask blends by its alpha band: out = c*a + 255*(1 - a).
    out.paste(im, mask=im)
    return out


def _high_depth_to_rgb(im: Image.Image) -> Image.Image:
    """16-bit / 32-bit integer and float grayscale to 8-bit RGB by scaling, not clipping."""
    arr = np.asarray(im)  # (H, W) uint16 (either endianness), int32 or float32
    if im.mode == "F":
        gray = _float_to_u8(arr)
    else:
        # 16-bit samples keep their top byte; an "I" image is read as 16-bit data, out-of-range clipped.
        gray = (np.clip(arr, 0, 65535).astype(np.uint16) >> 8).astype(np.uint8)
    out = Image.fromarray(gray).convert("RGB")  # (H, W) uint8 -> "L" -> "RGB"
    transparent = im.info.get("transparency")
    if isinstance(transparent, int) and im.mode != "F":
        # A 16-bit tRNS colour: pixels equal to it are fully transparent.
        alpha = Image.fromarray(np.where(arr == transparent, 0, 255).astype(np.uint8))
        white = Image.new("RGB", im.size, _WHITE)
        white.paste(out, mask=alpha)
        out = white
    return out


def _float_to_u8(arr: np.ndarray) -> np.ndarray:
    """Float grayscale to uint8: [0, 1] data x 255, [0, 255] data as is, anything else min-max.

    NaN and infinities become 0.
    """
    finite = np.isfinite(arr)
    if not finite.any():
        return np.zeros(arr.shape, np.uint8)
    lo, hi = float(arr[finite].min()), float(arr[finite].max())
    if lo >= 0.0 and hi <= 1.0:
        scaled = arr * 255.0
    elif lo >= 0.0 and hi <= 255.0:
        scaled = arr
    else:
        scaled = (arr - lo) * (255.0 / (hi - lo))
    return np.where(finite, np.clip(np.rint(scaled), 0, 255), 0).astype(np.uint8)
