"""The detector's training domain: where its training images lie in its own feature space.

Written into the artifact by ``train_detector`` before the manifest (so load-time verification covers it):

1. features (``FEATURE_NAME``: pooled early backbone layers) of training-split images, computed by
   :meth:`Detector.forward` on the artifact's own runtime, the code the service runs: decode, letterbox,
   one network pass that also gives the boxes;
2. a domain model (:func:`snap2caption.models.domain.fit_domain`) fitted on them and calibrated on the
   validation split (images the fit never saw) to the stated false-rejection rate;
3. measured on the test split (the in-domain rejection rate) and, where scikit-image is installed, on its
   bundled real photos (the out-of-domain detection rate); both go into ``domain.json``'s ``extra``, MLflow
   and the model card.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from snap2caption.errors import ArtifactError
from snap2caption.imaging import decode_file
from snap2caption.models.detector import Detector
from snap2caption.models.detector.config import FEATURE_NAME
from snap2caption.models.domain import DEFAULT_FALSE_REJECTION_RATE, DomainModel, fit_domain
from training.detector.evaluate import load_split

logger = logging.getLogger(__name__)

# scikit-image's bundled real photographs (``skimage.data``; no download): what a synthetic-shapes detector
# has never seen. ``motorcycle_left`` / ``motorcycle_right`` are the two views of ``stereo_motorcycle``.
REAL_PHOTOS = (
    "astronaut",
    "camera",
    "cat",
    "chelsea",
    "coffee",
    "coins",
    "grass",
    "gravel",
    "hubble_deep_field",
    "immunohistochemistry",
    "moon",
    "motorcycle_left",
    "motorcycle_right",
    "retina",
    "rocket",
)


def real_photos(names: Sequence[str] = REAL_PHOTOS) -> list[tuple[str, Image.Image]] | None:
    """scikit-image's real photos as RGB images, or None when scikit-image is not installed."""
    try:
        from skimage import data
    except ImportError:
        return None
    out = []
    for name in names:
        if name.startswith("motorcycle_"):
            left, right, _ = data.stereo_motorcycle()
            pixels = left if name.endswith("left") else right
        else:
            pixels = getattr(data, name)()
        out.append((name, Image.fromarray(np.asarray(pixels, dtype=np.uint8)).convert("RGB")))
    return out


def image_features(detector: Detector, images: Sequence[Image.Image], batch_size: int = 32) -> np.ndarray:
    """The detector's own features of ``images``, ``(N, C)`` float64, from the forward pass that detects.

    Raises:
        ArtifactError: The detector's network gives no features (an artifact exported before them).
    """
    rows = []
    for start in range(0, len(images), batch_size):
        pixels, _ = detector.preprocess(images[start : start + batch_size])
        _, features = detector.forward(pixels)
        if features is None:
            raise ArtifactError("the detector gives no features: re-export it (snap2caption export detector)")
        rows.append(np.asarray(features, dtype=np.float64))
    return np.concatenate(rows) if rows else np.zeros((0, 0))


def split_features(detector: Detector, data_dir: str | Path, split: str, limit: int = 0) -> np.ndarray:
    """Features of one split's stored images (the first ``limit`` by image id; 0 = all), ``(N, C)``."""
    root = Path(data_dir)
    rows = load_split(root, split, limit)
    return image_features(detector, [decode_file(root / row["path"]).image for row in rows])


@dataclass(frozen=True)
class DomainReport:
    """What fitting the domain measured.

    Attributes:
        domain: The domain model (``extra`` holds the measurements below too).
        test_rejection_rate: Share of held-out in-domain (test split) images it calls out of domain.
        test_images: Test images measured.
        real_photo_detection_rate: Share of scikit-image's real photos it calls out of domain (None when
            scikit-image is not installed).
        real_photos: Per photo: ``{"in_domain", "domain_score"}``.
    """

    domain: DomainModel
    test_rejection_rate: float
    test_images: int
    real_photo_detection_rate: float | None
    real_photos: dict[str, dict[str, Any]]

    def metrics(self) -> dict[str, float]:
        """Flat metrics for MLflow."""
        out = {"domain_test_rejection_rate": self.test_rejection_rate}
        if self.real_photo_detection_rate is not None:
            out["domain_real_photo_detection_rate"] = self.real_photo_detection_rate
        return out


def fit_detector_domain(
    detector: Detector,
    data_dir: str | Path,
    *,
    images: int = 0,
    false_rejection_rate: float = DEFAULT_FALSE_REJECTION_RATE,
) -> DomainReport:
    """Fit the detector's domain on the train split, calibrate it on the validation split, measure it on the
    test split and on real photos.

    Args:
        detector: The trained detector (its network must give features).
        data_dir: The ETL output it was trained on.
        images: Most images per split (the first by image id; 0 = all).
        false_rejection_rate: Share of in-domain images the check may reject.

    Raises:
        ValueError: Too few validation images to calibrate ``false_rejection_rate`` (see ``fit_domain``).
        ArtifactError: The detector gives no features.
    """
    fit = split_features(detector, data_dir, "train", images)
    calibration = split_features(detector, data_dir, "val", images)
    test = split_features(detector, data_dir, "test", images)
    domain = fit_domain(fit, calibration, feature=FEATURE_NAME, false_rejection_rate=false_rejection_rate)
    test_rate = domain.rejection_rate(test)
    photos = real_photos()
    per_photo: dict[str, dict[str, Any]] = {}
    photo_rate = None
    if photos is None:
        logger.warning("scikit-image is not installed: the domain is not measured on real photos")
    else:
        checks = domain.check(image_features(detector, [image for _, image in photos]))
        per_photo = {
            name: {"in_domain": c.in_domain, "domain_score": c.domain_score}
            for (name, _), c in zip(photos, checks, strict=True)
        }
        photo_rate = sum(not c.in_domain for c in checks) / len(checks)
    extra = {
        "data": str(Path(data_dir).resolve()),
        "fit_split": "train",
        "calibration_split": "val",
        "test_split": "test",
        "test_images": int(test.shape[0]),
        "test_rejection_rate": test_rate,
        "real_photo_detection_rate": photo_rate,
        "real_photos": per_photo,
    }
    domain = dataclasses.replace(domain, extra=extra)
    logger.info(
        "detector domain: fit on %d, calibrated on %d; rejects %.3f of %d test images, %s of real photos",
        domain.n_fit,
        domain.calibration.size,
        test_rate,
        test.shape[0],
        "n/a" if photo_rate is None else f"{photo_rate:.3f}",
    )
    return DomainReport(domain, test_rate, int(test.shape[0]), photo_rate, per_photo)
