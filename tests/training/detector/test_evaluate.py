"""Detector evaluation: pycocotools mAP on hand-made cases and on a tiny split, and the CLI around it."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from PIL import Image

from snap2caption.cli import main
from snap2caption.models import detector as detector_model
from snap2caption.models.detector import Detection, Detector
from snap2caption.models.detector.config import DetectorConfig
from training.detector.evaluate import (
    coco_ground_truth,
    coco_map,
    coco_results,
    evaluate_detector,
    load_split,
)

NAMES = ["circle", "square", "star"]
A_BOXES = [
    {"class_id": 0, "bbox": [10.0, 10.0, 40.0, 30.0]},
    {"class_id": 1, "bbox": [100.0, 20.0, 50.0, 60.0]},
]
B_BOXES = [{"class_id": 1, "bbox": [5.0, 50.0, 30.0, 30.0]}]
ROWS = [
    {"path": "a.jpg", "width": 200, "height": 100, "boxes": A_BOXES},
    {"path": "b.jpg", "width": 120, "height": 120, "boxes": B_BOXES},
]


def _as_detections(
    rows: Sequence[dict[str, Any]], shift: float = 0.0, names: Sequence[str] = NAMES
) -> list[list[Detection]]:
    return [
        [
            Detection(
                b["class_id"],
                names[b["class_id"]],
                0.9,
                (
                    b["bbox"][0] + shift,
                    b["bbox"][1],
                    b["bbox"][0] + b["bbox"][2] + shift,
                    b["bbox"][1] + b["bbox"][3],
                ),
            )
            for b in row["boxes"]
        ]
        for row in rows
    ]


def test_predictions_equal_to_ground_truth_give_map_one() -> None:
    gt = coco_ground_truth(ROWS, NAMES)
    results = coco_results(_as_detections(ROWS), [(1.0, 1.0)] * len(ROWS))
    map50_95, map50, per_class = coco_map(gt, results, NAMES)
    assert (map50_95, map50) == (pytest.approx(1.0), pytest.approx(1.0))
    assert per_class["circle"] == {"ap50_95": pytest.approx(1.0), "ap50": pytest.approx(1.0), "instances": 1}
    assert per_class["square"]["instances"] == 2
    assert (
        per_class["star"]["instances"] == 0 and per_class["star"]["ap50_95"] != per_class["star"]["ap50_95"]
    )


def test_worse_predictions_score_lower() -> None:
    gt = coco_ground_truth(ROWS, NAMES)
    shifted = coco_map(gt, coco_results(_as_detections(ROWS, shift=8.0), [(1.0, 1.0)] * 2), NAMES)
    assert 0.0 < shifted[0] < shifted[1] <= 1.0  # a few pixels off: fine at IoU 0.5, not at 0.95
    assert coco_map(gt, [], NAMES)[:2] == (0.0, 0.0)
    # Boxes predicted on a half-size stored image are scaled back to the original before scoring.
    half = [[Detection(d.class_id, d.class_name, d.score, tuple(v / 2 for v in d.box_xyxy)) for d in dets]
            for dets in _as_detections(ROWS)]  # fmt: skip
    assert coco_map(gt, coco_results(half, [(2.0, 2.0)] * 2), NAMES)[0] == pytest.approx(1.0)


class _Oracle(Detector):
    """Returns the manifest's own boxes (scaled to the stored image): a perfect detector."""

    def __init__(self, rows: list[dict[str, Any]], names: list[str]) -> None:
        super().__init__(
            DetectorConfig(names=names, imgsz=64, stride=32, model="oracle"), lambda x: x, "oracle"
        )
        self.queue = _as_detections(rows, names=names)

    def detect(self, images: Sequence[Image.Image], *args: Any, **kwargs: Any) -> list[list[Detection]]:
        out, self.queue = self.queue[: len(images)], self.queue[len(images) :]
        return [
            [Detection(d.class_id, self.names[d.class_id], 1.0, d.box_xyxy) for d in dets] for dets in out
        ]


def test_evaluate_detector_end_to_end_on_a_tiny_split(tiny_data: Path, tiny_trained: Any) -> None:
    rows = load_split(tiny_data, "test")
    names = detector_model.load(tiny_trained.artifact_dir).names
    perfect = evaluate_detector(_Oracle(rows, names), tiny_data, "test", batch_size=4)
    assert perfect.map50_95 == pytest.approx(1.0) and perfect.images == len(rows)

    real = evaluate_detector(detector_model.load(tiny_trained.artifact_dir, "torch"), tiny_data, "test")
    assert 0.0 <= real.map50 <= 1.0 and real.instances == sum(len(r["boxes"]) for r in rows)
    assert set(real.per_class) == set(names) and real.runtime == "torch"


def test_eval_cli_prints_and_writes_json(tiny_data: Path, tiny_trained: Any, tmp_path: Path) -> None:
    out = tmp_path / "metrics.json"
    args = ["eval", "detector", "--model", str(tiny_trained.artifact_dir), "--data", str(tiny_data),
            "--split", "test", "--limit", "4", "--json", str(out)]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "mAP50-95" in result.output and "pycocotools" in result.output
    data = json.loads(out.read_text())
    assert data["images"] == 4 and data["runtime"] == "onnx" and "circle" in data["per_class"]


def test_export_tensorrt_says_it_is_not_installed(tiny_trained: Any, tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    args = ["export", "detector", "--format", "tensorrt", "--model", str(tiny_trained.artifact_dir),
            "--out", str(tmp_path / "trt")]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    assert "TensorRT is not installed" in result.output and not (tmp_path / "trt").exists()
