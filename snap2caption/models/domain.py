"""Whether an image is inside what a model learned: a density model of its training images' features.

A model trained on synthetic shapes still answers confidently for a photo of a cat; this module is how it
knows not to be believed. At training time :func:`fit_domain` describes where the training images lie in
the model's own feature space (for example its encoder's pooled features) with a probabilistic PCA
Gaussian: the mean, the top ``k`` principal directions with their variances, and one variance for
everything outside them. An image's *distance* is its Mahalanobis distance under that Gaussian (the
residual outside the top directions counts too, so an image unlike anything seen is far even when its
projection looks ordinary).

The threshold is calibrated on held-out in-domain images the fit never saw: an image's ``domain_score``
is the conformal p-value of its distance among the calibration distances,
``(1 + #{calibration distances >= d}) / (n + 1)``, and it is *in domain* when that score is above the
stated false-rejection rate ``alpha``. For in-domain images exchangeable with the calibration ones, at most
a fraction ``alpha`` is rejected (the standard conformal guarantee); images far outside score
``1 / (n + 1)``, the smallest value.

Files in a model folder (both covered by the folder's ``MANIFEST.json``, so checked on load)::

    domain.json   {"format", "format_version", "feature", "dim", "components", "false_rejection_rate",
                   "threshold" (the largest distance still in domain), "n_fit", "n_calibration",
                   "calibration_rejection_rate" (measured on the calibration images themselves), "extra"}
    domain.npz    mean (D,), components (k, D), variances (k,), residual_variance (), calibration (n,)
                  float64, no pickles

Pure numpy: the services load it without torch.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from snap2caption.errors import ArtifactError

FORMAT = "snap2caption.domain"
FORMAT_VERSION = 1
DOMAIN_FILE = "domain.json"
DOMAIN_ARRAYS_FILE = "domain.npz"
DEFAULT_FALSE_REJECTION_RATE = 0.02
DEFAULT_COMPONENTS = 64
# Floor on every variance, relative to the mean variance: keeps the precision finite when features are
# (near) constant along some direction, as frozen encoder features of simple scenes often are.
_VARIANCE_FLOOR = 1e-6


@dataclass(frozen=True)
class DomainCheck:
    """One image's domain answer.

    Attributes:
        in_domain: Whether the image is inside the model's training domain.
        domain_score: Conformal p-value in ``(0, 1]``; low means unlike the training images.
        distance: Mahalanobis distance to the training images' features.
    """

    in_domain: bool
    domain_score: float
    distance: float


@dataclass(frozen=True)
class DomainModel:
    """The training domain of one model, in that model's feature space.

    Attributes:
        feature: Which features it was fitted on, e.g. ``"encoder.pooled"``; a loader checks it matches.
        mean: Mean feature vector, ``(D,)``.
        components: Orthonormal principal directions, ``(k, D)``.
        variances: Variance along each direction, ``(k,)``.
        residual_variance: Mean variance per dimension outside the top ``k`` directions.
        calibration: Sorted distances of the held-out in-domain calibration images, ``(n,)``.
        false_rejection_rate: ``alpha``: the share of in-domain images the check may reject.
        n_fit: Number of images the Gaussian was fitted on.
        extra: Free-form facts recorded by training (dataset version, image counts per split, ...).
    """

    feature: str
    mean: np.ndarray
    components: np.ndarray
    variances: np.ndarray
    residual_variance: float
    calibration: np.ndarray
    false_rejection_rate: float
    n_fit: int
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        dim = self.mean.shape[0] if self.mean.ndim == 1 else -1
        problems = []
        if dim < 1:
            problems.append(f"mean must be a non-empty vector, got shape {self.mean.shape}")
        if self.components.ndim != 2 or self.components.shape[1] != dim:
            problems.append(f"components must be (k, {dim}), got {self.components.shape}")
        if self.variances.shape != (self.components.shape[0],):
            problems.append(f"variances must be ({self.components.shape[0]},), got {self.variances.shape}")
        if self.calibration.ndim != 1 or self.calibration.size < 1:
            problems.append("calibration must hold at least one distance")
        if not 0.0 < self.false_rejection_rate < 1.0:
            problems.append(f"false_rejection_rate must be in (0, 1), got {self.false_rejection_rate}")
        arrays = (self.mean, self.components, self.variances, self.calibration)
        if not all(np.all(np.isfinite(a)) for a in arrays) or not np.isfinite(self.residual_variance):
            problems.append("arrays must be finite")
        elif np.any(self.variances <= 0) or self.residual_variance <= 0:
            problems.append("variances must be positive")
        if problems:
            raise ArtifactError("invalid domain model: " + "; ".join(problems))

    @property
    def dim(self) -> int:
        """Feature dimension ``D``."""
        return int(self.mean.shape[0])

    @property
    def threshold(self) -> float:
        """The largest distance still in domain (calibration distances at or above it keep the p-value >
        ``alpha``); ``0.0`` when even the closest calibration image would be rejected."""
        n = self.calibration.size
        # p(d) > alpha  <=>  #{c >= d} > alpha * (n + 1) - 1; the calibration is sorted ascending.
        need = int(np.floor(self.false_rejection_rate * (n + 1) - 1)) + 1  # smallest count that passes
        if need <= 0:
            return float("inf")
        if need > n:
            return 0.0
        return float(self.calibration[n - need])

    def distances(self, features: np.ndarray) -> np.ndarray:
        """Mahalanobis distance of each row of ``features`` (``(N, D)``) to the training images."""
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"features must be (N, {self.dim}), got {x.shape}")
        centred = x - self.mean
        projected = centred @ self.components.T
        residual = np.sum(centred * centred, axis=1) - np.sum(projected * projected, axis=1)
        squared = np.sum(projected * projected / self.variances, axis=1)
        squared += np.maximum(residual, 0.0) / self.residual_variance
        return np.sqrt(squared)

    def scores(self, distances: np.ndarray) -> np.ndarray:
        """Conformal p-value of each distance among the calibration distances, in ``(0, 1]``."""
        d = np.asarray(distances, dtype=np.float64)
        n = self.calibration.size
        at_or_above = n - np.searchsorted(self.calibration, d, side="left")
        return (1.0 + at_or_above) / (n + 1.0)

    def check(self, features: np.ndarray) -> list[DomainCheck]:
        """The domain answer for each row of ``features``."""
        distances = self.distances(features)
        scores = self.scores(distances)
        return [
            DomainCheck(in_domain=bool(s > self.false_rejection_rate), domain_score=float(s), distance=d)
            for s, d in zip(scores, distances.tolist(), strict=True)
        ]

    def rejection_rate(self, features: np.ndarray) -> float:
        """Share of the rows of ``features`` this model says are out of domain."""
        checks = self.check(features)
        return sum(not c.in_domain for c in checks) / max(len(checks), 1)

    def info(self) -> dict[str, Any]:
        """What ``domain.json`` holds (and what a service shows in its model info)."""
        calibration_rejected = float(np.mean(self.scores(self.calibration) <= self.false_rejection_rate))
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "feature": self.feature,
            "dim": self.dim,
            "components": int(self.components.shape[0]),
            "false_rejection_rate": self.false_rejection_rate,
            "threshold": self.threshold,
            "n_fit": self.n_fit,
            "n_calibration": int(self.calibration.size),
            "calibration_rejection_rate": calibration_rejected,
            "extra": self.extra,
        }

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write ``domain.json`` and ``domain.npz`` into a model folder (rewrite its manifest after)."""
        root = Path(directory)
        root.mkdir(parents=True, exist_ok=True)
        with open(root / DOMAIN_ARRAYS_FILE, "wb") as fh:
            np.savez(
                fh,
                mean=self.mean,
                components=self.components,
                variances=self.variances,
                residual_variance=np.asarray(self.residual_variance),
                calibration=self.calibration,
            )
        text = json.dumps(self.info(), indent=2, sort_keys=True, allow_nan=False) + "\n"
        (root / DOMAIN_FILE).write_text(text, encoding="utf-8")


def min_calibration_images(false_rejection_rate: float) -> int:
    """The fewest calibration images that can calibrate ``false_rejection_rate``: ``ceil(1 / alpha) - 1``,
    below which even the farthest image scores a p-value above ``alpha`` and nothing could be rejected."""
    return int(np.ceil(1.0 / false_rejection_rate)) - 1


def fit_domain(
    fit_features: np.ndarray,
    calibration_features: np.ndarray,
    *,
    feature: str,
    false_rejection_rate: float = DEFAULT_FALSE_REJECTION_RATE,
    components: int = DEFAULT_COMPONENTS,
    extra: dict[str, Any] | None = None,
) -> DomainModel:
    """Describe a training domain from features of training images and held-out in-domain images.

    Args:
        fit_features: ``(N, D)`` features of training images (the Gaussian is fitted on them).
        calibration_features: ``(M, D)`` features of in-domain images the fit never saw (the threshold is
            calibrated on them); at least :func:`min_calibration_images` of them.
        feature: Name of the feature space, checked by loaders.
        false_rejection_rate: ``alpha``, the share of in-domain images that may be rejected.
        components: Principal directions kept (capped at ``min(N - 1, D)``).
        extra: Facts to record beside it.

    Raises:
        ValueError: Shapes that do not fit, too few images, or non-finite features.
    """
    x = np.asarray(fit_features, dtype=np.float64)
    cal = np.asarray(calibration_features, dtype=np.float64)
    if x.ndim != 2 or cal.ndim != 2 or x.shape[1] != cal.shape[1]:
        raise ValueError(f"features must be (N, D) and (M, D), got {x.shape} and {cal.shape}")
    if x.shape[0] < 2:
        raise ValueError(f"need at least 2 images to fit a domain, got {x.shape[0]}")
    if not 0.0 < false_rejection_rate < 1.0:
        raise ValueError(f"false_rejection_rate must be in (0, 1), got {false_rejection_rate}")
    need = min_calibration_images(false_rejection_rate)
    if cal.shape[0] < need:
        raise ValueError(
            f"{cal.shape[0]} calibration images cannot calibrate a false-rejection rate of "
            f"{false_rejection_rate}: need at least {need}"
        )
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(cal))):
        raise ValueError("features must be finite")
    n, dim = x.shape
    mean = x.mean(axis=0)
    centred = x - mean
    # SVD of the centred data: right singular vectors are the principal directions.
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)
    eigen = singular**2 / max(n - 1, 1)
    total = float(np.sum(np.var(centred, axis=0, ddof=1)))
    floor = max(total / dim, 1e-12) * _VARIANCE_FLOOR
    k = max(1, min(components, n - 1, dim))
    variances = np.maximum(eigen[:k], floor)
    rest = max(dim - k, 1)
    residual_variance = max((total - float(np.sum(eigen[:k]))) / rest, floor)
    partial = DomainModel(
        feature=feature,
        mean=mean,
        components=vt[:k].copy(),
        variances=variances,
        residual_variance=residual_variance,
        calibration=np.zeros(1),
        false_rejection_rate=false_rejection_rate,
        n_fit=n,
    )
    calibration = np.sort(partial.distances(cal))
    return DomainModel(
        feature=feature,
        mean=mean,
        components=vt[:k].copy(),
        variances=variances,
        residual_variance=residual_variance,
        calibration=calibration,
        false_rejection_rate=false_rejection_rate,
        n_fit=n,
        extra=dict(extra or {}),
    )


def load_domain(directory: str | os.PathLike[str], *, feature: str | None = None) -> DomainModel | None:
    """The domain model of a model folder, or ``None`` when the folder has none (older artifacts).

    Args:
        directory: The model folder (its manifest is checked by the model's loader, not here).
        feature: When given, the feature space the loader computes; a different one is an error.

    Raises:
        ArtifactError: Only one of the two files, unreadable or inconsistent files, or another feature space.
    """
    root = Path(directory)
    meta_path, arrays_path = root / DOMAIN_FILE, root / DOMAIN_ARRAYS_FILE
    if not meta_path.exists() and not arrays_path.exists():
        return None
    if not (meta_path.exists() and arrays_path.exists()):
        raise ArtifactError(f"{root}: {DOMAIN_FILE} and {DOMAIN_ARRAYS_FILE} must come together")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        with np.load(arrays_path, allow_pickle=False) as arrays:
            loaded = {name: np.array(arrays[name], dtype=np.float64) for name in arrays.files}
    except (OSError, ValueError, KeyError) as exc:
        raise ArtifactError(f"cannot read the domain model in {root}: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ArtifactError(f"{meta_path} is not a {FORMAT} file")
    if meta.get("format_version") != FORMAT_VERSION:
        version = meta.get("format_version")
        raise ArtifactError(f"{meta_path}: format_version {version} is not {FORMAT_VERSION}")
    missing = {"mean", "components", "variances", "residual_variance", "calibration"} - loaded.keys()
    if missing:
        raise ArtifactError(f"{arrays_path} lacks {sorted(missing)}")
    if feature is not None and meta.get("feature") != feature:
        raise ArtifactError(
            f"{meta_path} describes feature space {meta.get('feature')!r}, the model computes {feature!r}"
        )
    try:
        model = DomainModel(
            feature=str(meta.get("feature")),
            mean=loaded["mean"],
            components=loaded["components"],
            variances=loaded["variances"],
            residual_variance=float(loaded["residual_variance"]),
            calibration=np.sort(loaded["calibration"]),
            false_rejection_rate=float(meta.get("false_rejection_rate", -1)),
            n_fit=int(meta.get("n_fit", 0)),
            extra=dict(meta.get("extra") or {}),
        )
    except (TypeError, ValueError) as exc:
        raise ArtifactError(f"invalid domain model in {root}: {exc}") from exc
    if meta.get("dim") != model.dim:
        raise ArtifactError(f"{meta_path}: dim {meta.get('dim')} but the arrays are {model.dim}-dimensional")
    return model
