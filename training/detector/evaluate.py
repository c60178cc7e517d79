"""Detector evaluation: COCO mAP50-95, mAP50 and per-class AP, computed by pycocotools.

Independent of Ultralytics: the detector under test (ONNX Runtime or PyTorch, through
``snap2caption.models.detector.Detector``, the code the service runs) predicts on the split's stored images;
its boxes are scaled to the original image size and scored with ``pycocotools.cocoeval.COCOeval`` against
the ground-truth boxes of the ETL manifest (``manifests/<split>.parquet``, original pixels). Detections follow
the YOLO evaluation protocol: score threshold 0.001, one candidate per (anchor, class), NMS at IoU 0.7,
at most 100 per image (COCO's limit).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from snap2caption.imaging import decode_file
from snap2caption.models.detector import Detection, Detector

logger = logging.getLogger(__name__)

EVAL_CONF = 0.001
EVAL_IOU = 0.7
EVAL_MAX_DET = 100


@dataclass
class DetectionEval:
    """COCO box metrics of one detector on one split.

    Attributes:
        map50_95: mAP averaged over IoU 0.50:0.05:0.95 (COCO's AP), all areas, 100 detections.
        map50: mAP at IoU 0.5.
        per_class: class name -> ``{"ap50_95", "ap50", "instances"}`` (AP is NaN for a class with no
            ground truth in the split; such classes are left out of the means, as COCO does).
        images: Images evaluated.
        instances: Ground-truth boxes.
        split: Split name.
        runtime: ``onnx`` or ``torch`` (``-int8`` appended for the quantized model).
        seconds: Wall time of prediction + scoring.
        computed_by: What computed the numbers.
    """

    map50_95: float
    map50: float
    per_class: dict[str, dict[str, float]] = field(default_factory=dict)
    images: int = 0
    instances: int = 0
    split: str = ""
    runtime: str = ""
    seconds: float = 0.0
    computed_by: str = "pycocotools COCOeval (bbox) on Detector predictions vs manifest boxes"

    def metrics(self, prefix: str = "test") -> dict[str, float]:
        """Flat metrics for the registry and MLflow: ``<prefix>_map50_95``, ``<prefix>_map50``, per class."""
        out = {f"{prefix}_map50_95": self.map50_95, f"{prefix}_map50": self.map50}
        for name, values in self.per_class.items():
            if not math.isnan(values["ap50_95"]):
                out[f"{prefix}_ap50_95.{name}"] = values["ap50_95"]
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (NaN APs become null)."""
        data = asdict(self)
        data["per_class"] = {
            name: {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in values.items()}
            for name, values in self.per_class.items()
        }
        return data


def load_split(data_dir: str | Path, split: str, limit: int = 0) -> list[dict[str, Any]]:
    """Manifest rows of one split, ordered by ``image_id``; the first ``limit`` when ``limit`` > 0.

    Raises:
        FileNotFoundError: No manifest for that split.
    """
    import pyarrow.parquet as pq

    path = Path(data_dir) / "manifests" / f"{split}.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"no manifest {path}; run `snap2caption data etl` first")
    rows = sorted(
        pq.read_table(path, columns=["image_id", "path", "width", "height", "boxes"]).to_pylist(),
        key=lambda r: r["image_id"],
    )
    return rows[:limit] if limit > 0 else rows


def coco_ground_truth(rows: Sequence[dict[str, Any]], names: Sequence[str]) -> dict[str, Any]:
    """A COCO instances dict from manifest rows: image ids 1..N, category ids class_id + 1."""
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for index, row in enumerate(rows, start=1):
        images.append({"id": index, "width": row["width"], "height": row["height"], "file_name": row["path"]})
        for box in row["boxes"] or []:
            x, y, w, h = (float(v) for v in box["bbox"])
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": index,
                    "category_id": int(box["class_id"]) + 1,
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(names)]
    return {
        "info": {},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }


def coco_results(
    detections: Sequence[Sequence[Detection]], scales: Sequence[tuple[float, float]]
) -> list[dict[str, Any]]:
    """COCO result records (image ids 1..N) from detections, boxes scaled by ``(sx, sy)`` per image."""
    out = []
    for index, (dets, (sx, sy)) in enumerate(zip(detections, scales, strict=True), start=1):
        for det in dets:
            x1, y1, x2, y2 = det.box_xyxy
            out.append(
                {
                    "image_id": index,
                    "category_id": det.class_id + 1,
                    "bbox": [x1 * sx, y1 * sy, (x2 - x1) * sx, (y2 - y1) * sy],
                    "score": det.score,
                }
            )
    return out


def coco_map(
    ground_truth: dict[str, Any], results: Sequence[dict[str, Any]], names: Sequence[str]
) -> tuple[float, float, dict[str, dict[str, float]]]:
    """pycocotools bbox evaluation.

    Returns:
        ``(mAP50-95, mAP50, per class {"ap50_95", "ap50", "instances"})``; 0.0 when there are no results.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    instances = np.bincount(
        [a["category_id"] - 1 for a in ground_truth["annotations"]], minlength=len(names)
    ).tolist()
    nan = float("nan")
    if not results:
        per_class = {
            n: {"ap50_95": 0.0 if c else nan, "ap50": 0.0 if c else nan, "instances": c}
            for n, c in zip(names, instances, strict=True)
        }
        return 0.0, 0.0, per_class
    with contextlib.redirect_stdout(io.StringIO()) as out:  # pycocotools reports with print()
        gt = COCO()
        gt.dataset = ground_truth
        gt.createIndex()
        dt = gt.loadRes(list(results))
        evaluator = COCOeval(gt, dt, iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    logger.debug("pycocotools:\n%s", out.getvalue())
    # precision: (IoU thresholds 10, recall 101, classes K, area ranges 4, max dets 3); area "all", 100 dets.
    precision = evaluator.eval["precision"][:, :, :, 0, -1]
    per_class = {}
    for k, cat_id in enumerate(evaluator.params.catIds):
        p_all, p_50 = precision[:, :, k], precision[0, :, k]
        per_class[names[cat_id - 1]] = {
            "ap50_95": float(p_all[p_all > -1].mean()) if (p_all > -1).any() else nan,
            "ap50": float(p_50[p_50 > -1].mean()) if (p_50 > -1).any() else nan,
            "instances": instances[cat_id - 1],
        }
    return max(0.0, float(evaluator.stats[0])), max(0.0, float(evaluator.stats[1])), per_class


def evaluate_detector(
    detector: Detector,
    data_dir: str | Path,
    split: str = "test",
    *,
    limit: int = 0,
    batch_size: int = 16,
    runtime: str | None = None,
) -> DetectionEval:
    """Predict on a split of an ETL output and score it with pycocotools.

    Args:
        detector: The detector under test.
        data_dir: ETL output folder.
        split: ``train``, ``val`` or ``test``.
        limit: Evaluate only the first N images (0 = all).
        batch_size: Images per network call.
        runtime: What ran the detector, for the report (default ``detector.runtime``).
    """
    start = time.perf_counter()
    root = Path(data_dir)
    rows = load_split(root, split, limit)
    detections: list[list[Detection]] = []
    scales: list[tuple[float, float]] = []
    for first in range(0, len(rows), batch_size):
        chunk = rows[first : first + batch_size]
        images = [decode_file(root / row["path"]).image for row in chunk]
        detections.extend(
            detector.detect(
                images,
                conf=EVAL_CONF,
                iou=EVAL_IOU,
                max_det=EVAL_MAX_DET,
                batch_size=batch_size,
                multi_label=True,
            )
        )
        # The store may be resized; ground truth is in original pixels.
        scales.extend(
            (row["width"] / im.width, row["height"] / im.height)
            for row, im in zip(chunk, images, strict=True)
        )
    ground_truth = coco_ground_truth(rows, detector.names)
    map50_95, map50, per_class = coco_map(ground_truth, coco_results(detections, scales), detector.names)
    result = DetectionEval(
        map50_95=map50_95,
        map50=map50,
        per_class=per_class,
        images=len(rows),
        instances=len(ground_truth["annotations"]),
        split=split,
        runtime=runtime or detector.runtime,
        seconds=time.perf_counter() - start,
    )
    logger.info(
        "%s split (%d images, %d boxes, %s): mAP50-95 %.4f, mAP50 %.4f (pycocotools)",
        split, result.images, result.instances, result.runtime, map50_95, map50,
    )  # fmt: skip
    return result
