"""Box geometry: EXIF orientation, clipping to the image, YOLO label lines."""

from __future__ import annotations

import math

_MIN_BOX_SIDE = 1.0  # px; thinner boxes (after clipping) carry no trainable signal


def orient_box(
    bbox: tuple[float, float, float, float], orientation: int, raw_width: int, raw_height: int
) -> tuple[float, float, float, float]:
    """Map an ``(x, y, w, h)`` box on the stored pixels to the image after its EXIF orientation.

    Args:
        bbox: Box on the image as stored (before EXIF orientation).
        orientation: EXIF orientation tag, 1-8.
        raw_width: Stored width, before orientation.
        raw_height: Stored height, before orientation.
    """
    x, y, w, h = bbox
    W, H = raw_width, raw_height  # image sizes read best as capitals
    if orientation == 2:  # mirrored left-right
        return (W - x - w, y, w, h)
    if orientation == 3:  # rotated 180
        return (W - x - w, H - y - h, w, h)
    if orientation == 4:  # mirrored top-bottom
        return (x, H - y - h, w, h)
    if orientation == 5:  # transposed
        return (y, x, h, w)
    if orientation == 6:  # needs 90 degrees clockwise
        return (H - y - h, x, h, w)
    if orientation == 7:  # transversed
        return (H - y - h, W - x - w, h, w)
    if orientation == 8:  # needs 90 degrees counter-clockwise
        return (y, W - x - w, h, w)
    return bbox


def clip_box(
    bbox: tuple[float, float, float, float], width: int, height: int
) -> tuple[float, float, float, float] | None:
    """Clip an ``(x, y, w, h)`` box to the image; ``None`` when less than a pixel wide or high remains."""
    if not all(math.isfinite(v) for v in bbox):
        return None
    x, y, w, h = bbox
    x0, y0 = max(0.0, x), max(0.0, y)
    x1, y1 = min(float(width), x + w), min(float(height), y + h)
    if x1 - x0 < _MIN_BOX_SIDE or y1 - y0 < _MIN_BOX_SIDE:
        return None
    return (x0, y0, x1 - x0, y1 - y0)


def yolo_line(class_id: int, bbox: tuple[float, float, float, float], width: int, height: int) -> str:
    """One YOLO label line ``cls cx cy w h``, all normalised to [0, 1] by the image size."""
    x, y, w, h = bbox
    return f"{class_id} {(x + w / 2) / width:.6f} {(y + h / 2) / height:.6f} {w / width:.6f} {h / height:.6f}"
