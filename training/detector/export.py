"""``snap2caption export detector``: re-export a detector artifact, calibrating int8 on its training images.

The export itself is the model package's (:func:`snap2caption.models.detector.export.reexport`); what
training adds is the calibration data: the first training images, letterboxed as serving does, and for an
artifact with a training domain, the int8 model's own domain model (``int8/``), fitted as training does.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import numpy as np

from snap2caption.imaging import decode_file
from snap2caption.manifest import write_manifest
from snap2caption.models.detector.boxes import letterbox
from snap2caption.models.detector.config import INT8_DOMAIN_DIR, DetectorConfig, read_config
from snap2caption.models.detector.export import reexport
from snap2caption.models.domain import load_domain
from snap2caption.models.onnx_export import ExportError

logger = logging.getLogger(__name__)

CARD_FILE = "README.md"
CALIBRATION_IMAGES = 64


def calibration_batches(
    data_dir: str | Path, config: DetectorConfig, count: int = CALIBRATION_IMAGES, batch: int = 8
) -> list[np.ndarray]:
    """Letterboxed training images for int8 calibration (the first ``count`` of the train split)."""
    from training.detector.evaluate import load_split

    root = Path(data_dir)
    rows = load_split(root, "train", count)
    if not rows:
        raise ExportError(f"no training images under {root} to calibrate int8 with")
    pixels = [
        letterbox(decode_file(root / row["path"]).image, config.imgsz, config.pad_value)[0] for row in rows
    ]
    return [np.stack(pixels[i : i + batch]) for i in range(0, len(pixels), batch)]


def export_detector(
    model_dir: str | Path,
    out_dir: str | Path,
    *,
    fmt: Literal["onnx", "tensorrt"] = "onnx",
    int8: bool = False,
    calibration_data: str | Path | None = None,
) -> Path:
    """Re-export an artifact folder into ``out_dir`` (see ``reexport``), with ``model.int8.onnx`` when
    ``int8``, calibrated on ``calibration_data``'s training images.

    Args:
        model_dir: A detector artifact folder (verified against its manifest).
        out_dir: Target folder (replaced).
        fmt: ``onnx``, or ``tensorrt`` (ONNX first, then an engine; needs TensorRT).
        int8: Also write the int8 model.
        calibration_data: ETL output folder for int8 calibration; default the training data recorded in
            the artifact.

    Raises:
        ExportError: TensorRT missing, or no calibration data for int8.
    """
    calibration = None
    data = None
    if int8:
        config = read_config(model_dir)
        data = calibration_data or config.extra.get("train", {}).get("data")
        if not data or not Path(data).is_dir():
            raise ExportError(f"int8 calibration needs the training data folder; got {data!r} (--calib-data)")
        calibration = calibration_batches(data, config)
    out = reexport(model_dir, out_dir, fmt=fmt, calibration=calibration)
    if int8 and data is not None and load_domain(out) is not None:
        int8_domain(out, data)
    logger.info("exported detector %s -> %s", model_dir, out)
    return out


def int8_domain(folder: Path, data_dir: str | Path) -> None:
    """Fit the int8 model's own domain model into ``folder/int8/`` (same splits and image cap as training;
    quantized activations move the features enough that the float model's threshold would reject ~15% of
    in-domain scenes), then rewrite the manifest."""
    from snap2caption.models import detector as detector_model
    from training.detector.domain import fit_detector_domain

    images = int(read_config(folder).extra.get("train", {}).get("domain_images", 1000))
    detector = detector_model.load(folder, "onnx", int8=True, verify=False)
    report = fit_detector_domain(detector, data_dir, images=images)
    report.domain.save(folder / INT8_DOMAIN_DIR)
    write_manifest(folder)
