"""Detections in image pixels: the letterbox a YOLO network reads, and its raw output -> boxes (NumPy).

Preprocessing (:func:`letterbox`): RGB, resize keeping the aspect ratio so the longer side is ``imgsz`` (PIL
bilinear, antialiased when shrinking), pad to ``imgsz`` x ``imgsz`` with grey 114 centred, pixels / 255,
NCHW float32. Post-processing (:func:`postprocess`): best class per anchor, class-aware NMS, boxes mapped
back into the pixels of the image passed in. Every runtime shares both, so runtimes differ only in the
network's arithmetic.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image

_MAX_WH = 7680.0  # class offset for class-aware NMS in one pass: larger than any letterboxed side
_MAX_NMS = 30000  # candidates kept (by score) before NMS


@dataclass(frozen=True)
class Detection:
    """One detected object.

    Attributes:
        class_id: Index into the detector's class names.
        class_name: The class name.
        score: Class confidence in [0, 1].
        box_xyxy: ``(x1, y1, x2, y2)`` in pixels of the image given to ``Detector.detect``.
    """

    class_id: int
    class_name: str
    score: float
    box_xyxy: tuple[float, float, float, float]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        return asdict(self)


@dataclass(frozen=True)
class Letterbox:
    """How one image was letterboxed: ``input = original * gain + pad``."""

    gain: float
    pad_x: int
    pad_y: int
    width: int
    height: int


def letterbox(image: Image.Image, imgsz: int, pad_value: int = 114) -> tuple[np.ndarray, Letterbox]:
    """Resize (aspect kept, longer side ``imgsz``) and pad an RGB image to a square, as Ultralytics does.

    Returns:
        ``(pixels, letterbox)``: (3, imgsz, imgsz) float32 in [0, 1], and the transform to undo on boxes.
    """
    if image.mode != "RGB":
        image = image.convert("RGB")
    width, height = image.size
    gain = min(imgsz / width, imgsz / height)
    new_w, new_h = max(1, round(width * gain)), max(1, round(height * gain))
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    pad_x, pad_y = round((imgsz - new_w) / 2 - 0.1), round((imgsz - new_h) / 2 - 0.1)
    canvas = np.full((imgsz, imgsz, 3), pad_value, dtype=np.uint8)
    canvas[pad_y : pad_y + new_h, pad_x : pad_x + new_w] = np.asarray(image)
    pixels = canvas.transpose(2, 0, 1).astype(np.float32) / 255.0  # (3, S, S)
    return pixels, Letterbox(gain, pad_x, pad_y, width, height)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression: indices kept, best score first.

    Args:
        boxes: (N, 4) ``x1, y1, x2, y2``.
        scores: (N,).
        iou_threshold: A box is dropped when its IoU with a kept, better box is above this.
    """
    x1, y1, x2, y2 = boxes.T
    areas = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size:
        best, rest = order[0], order[1:]
        keep.append(int(best))
        if not rest.size:
            break
        w = np.clip(np.minimum(x2[best], x2[rest]) - np.maximum(x1[best], x1[rest]), 0, None)
        h = np.clip(np.minimum(y2[best], y2[rest]) - np.maximum(y1[best], y1[rest]), 0, None)
        inter = w * h
        iou = inter / (areas[best] + areas[rest] - inter + 1e-9)
        order = rest[iou <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


def postprocess(
    raw: np.ndarray,
    boxes_meta: Sequence[Letterbox],
    names: Sequence[str],
    conf: float = 0.25,
    iou: float = 0.45,
    max_det: int = 100,
    multi_label: bool = False,
) -> list[list[Detection]]:
    """Turn raw network output into detections in original-image pixels.

    Each anchor gives one candidate, its best class (Ultralytics' predict mode), or with ``multi_label``
    one per class above ``conf`` (the YOLO evaluation protocol: mAP rewards the second hypothesis of an
    ambiguous object); candidates go through class-aware NMS; at most ``max_det`` per image remain, best
    first.

    Args:
        raw: (B, 4 + nc, anchors) from the network.
        boxes_meta: The letterbox of each image.
        names: Class names.
        conf: Minimum class score.
        iou: NMS IoU threshold.
        max_det: Most detections per image.
        multi_label: One candidate per (anchor, class) above ``conf`` instead of per anchor.
    """
    if raw.ndim != 3 or raw.shape[1] != 4 + len(names) or raw.shape[0] != len(boxes_meta):
        raise ValueError(
            f"raw output {raw.shape} does not fit {len(boxes_meta)} images x {len(names)} classes"
        )
    results: list[list[Detection]] = []
    for pred, meta in zip(raw.transpose(0, 2, 1), boxes_meta, strict=True):  # (anchors, 4 + nc)
        scores_all = pred[:, 4:]
        if multi_label:
            anchor, cls = np.nonzero(scores_all > conf)
        else:
            best = scores_all.argmax(1)
            anchor = np.nonzero(scores_all[np.arange(len(best)), best] > conf)[0]
            cls = best[anchor]
        if not len(anchor):
            results.append([])
            continue
        xywh, score = pred[anchor, :4], scores_all[anchor, cls]
        if len(score) > _MAX_NMS:
            top = np.argsort(-score, kind="stable")[:_MAX_NMS]
            xywh, cls, score = xywh[top], cls[top], score[top]
        xyxy = np.concatenate([xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2], axis=1)
        keep = nms(xyxy + cls[:, None] * _MAX_WH, score, iou)[:max_det]
        xyxy = (xyxy[keep] - [meta.pad_x, meta.pad_y, meta.pad_x, meta.pad_y]) / meta.gain
        xyxy[:, [0, 2]] = xyxy[:, [0, 2]].clip(0, meta.width)
        xyxy[:, [1, 3]] = xyxy[:, [1, 3]].clip(0, meta.height)
        results.append(
            [
                Detection(
                    int(c), names[int(c)], float(s), (float(b[0]), float(b[1]), float(b[2]), float(b[3]))
                )
                for b, c, s in zip(xyxy, cls[keep], score[keep], strict=True)
            ]
        )
    return results
