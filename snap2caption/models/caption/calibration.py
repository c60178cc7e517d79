"""Calibrated caption confidence, without torch: fit, measure (ECE), store and apply.

A caption's raw confidence is the geometric-mean probability of its tokens (``exp`` of
:attr:`~snap2caption.models.caption.decoding.Caption.confidence`): a ranking of captions, not a probability
that the caption is right. Training fits a monotone map from it to the probability that the caption is
right, on the validation split, and stores it in the artifact as ``calibration.json``; both runtimes apply
it, so a :class:`~snap2caption.models.caption.decoding.Caption` carries the calibrated probability in
``calibrated`` beside the raw one.

The map is Platt scaling on the logit of the raw confidence, ``p = sigmoid(slope * logit(raw) +
intercept)`` with ``slope > 0``: temperature scaling (``1 / slope``) plus a bias. Two parameters fit
robustly on a few hundred captions (isotonic regression would need more, and its steps would tie captions
that the raw confidence ranks apart); ``slope > 0`` keeps the map strictly increasing, so the calibrated
confidence ranks captions exactly as the raw one does.

"Right" is the training run's definition, recorded in the file; for the synthetic benchmark: the
(colour, shape) pairs the caption names equal those its references name (``pair_exact``). The expected
calibration error (:func:`expected_calibration_error`) uses 10 equal-width bins over [0, 1].
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from snap2caption.errors import ArtifactError

if TYPE_CHECKING:
    from snap2caption.models.caption.decoding import Caption

CALIBRATION_FILE = "calibration.json"
FORMAT = "snap2caption.caption_calibration"
FORMAT_VERSION = 1
METHOD = "platt"
N_BINS = 10
BINNING = "10 equal-width bins over [0, 1] (the last one closed), weighted by their share of captions"

# Raw confidences are clipped into (EPS, 1 - EPS) before the logit, so 0 and 1 map to finite values.
_EPS = 1e-6
# The smallest slope a fit may end with: the map stays strictly increasing even when the raw confidence
# says nothing about being right (the fit then is close to the base rate for every caption).
MIN_SLOPE = 1e-3


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), _EPS, 1 - _EPS)
    return np.log(p) - np.log1p(-p)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # = 1 / (1 + exp(-z)), without overflow


@dataclass(frozen=True)
class Calibration:
    """The confidence map of one caption artifact, and what it was fitted and measured on.

    Attributes:
        slope: ``a`` of ``sigmoid(a * logit(raw) + b)``; > 0.
        intercept: ``b``.
        right: What "right" means for the probability (e.g. the (colour, shape) pair exact match).
        fit_split: The split it was fitted on.
        n_fit: Captions it was fitted on.
        n_fit_right: How many of them were right.
        eval_split: The held-out split the ECE was measured on ("" when none was).
        n_eval: Captions of that split.
        ece_before: ECE of the raw confidence there (None when not measured).
        ece_after: ECE of the calibrated confidence there (None when not measured).
        method: ``platt``.
        bins: ECE bins.
    """

    slope: float
    intercept: float
    right: str
    fit_split: str
    n_fit: int
    n_fit_right: int
    eval_split: str = ""
    n_eval: int = 0
    ece_before: float | None = None
    ece_after: float | None = None
    method: str = METHOD
    bins: int = N_BINS

    def __post_init__(self) -> None:
        problems = []
        if self.method != METHOD:
            problems.append(f"method {self.method!r} is not {METHOD!r}")
        if not (math.isfinite(self.slope) and self.slope > 0):
            problems.append(f"slope must be finite and > 0, got {self.slope}")
        if not math.isfinite(self.intercept):
            problems.append(f"intercept must be finite, got {self.intercept}")
        if not 0 <= self.n_fit_right <= self.n_fit or self.n_eval < 0 or self.bins < 1:
            problems.append("counts out of range")
        for name in ("ece_before", "ece_after"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                problems.append(f"{name} must be in [0, 1], got {value}")
        if problems:
            raise ValueError("; ".join(problems))

    def apply(self, raw: float | np.ndarray) -> np.ndarray:
        """Calibrated probability of raw confidences (geometric-mean token probabilities in [0, 1])."""
        return _sigmoid(self.slope * _logit(np.asarray(raw)) + self.intercept)

    def probability(self, raw: float) -> float:
        """:meth:`apply` for one raw confidence."""
        return float(self.apply(raw))

    def to_dict(self) -> dict[str, Any]:
        """What ``calibration.json`` holds (with its format and the ECE binning spelled out)."""
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            **dataclasses.asdict(self),
            "input": (
                "geometric-mean token probability of the caption, decoded as served (for an image captioned"
                " over mirrored views, the mean over the views of the agreeing views' probabilities)"
            ),
            "formula": "sigmoid(slope * logit(raw) + intercept)",
            "binning": BINNING,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibration:
        """Rebuild from :meth:`to_dict`'s output.

        Raises:
            ValueError: Not a calibration of this format, a missing or mistyped field, or values out of
                range.
        """
        if data.get("format") != FORMAT or data.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"not a {FORMAT} v{FORMAT_VERSION} file")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for name in fields:
            if name not in data:
                raise ValueError(f"missing field {name!r}")
            values[name] = data[name]
        for name in ("slope", "intercept"):
            if isinstance(values[name], bool) or not isinstance(values[name], int | float):
                raise ValueError(f"{name} must be a number")
        for name in ("n_fit", "n_fit_right", "n_eval", "bins"):
            if isinstance(values[name], bool) or not isinstance(values[name], int):
                raise ValueError(f"{name} must be an integer")
        for name in ("ece_before", "ece_after"):
            value = values[name]
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
                raise ValueError(f"{name} must be a number or null")
        for name in ("right", "fit_split", "eval_split", "method"):
            if not isinstance(values[name], str):
                raise ValueError(f"{name} must be a string")
        return cls(**values)


def fit_platt(
    raw: Sequence[float] | np.ndarray, right: Sequence[bool] | np.ndarray, *, iterations: int = 100
) -> tuple[float, float]:
    """Fit ``sigmoid(a * logit(raw) + b)`` to right/wrong labels by maximum likelihood.

    Platt's smoothed targets (``(n+ + 1) / (n+ + 2)`` for right, ``1 / (n- + 2)`` for wrong) keep the fit
    finite when every caption is right, or every one wrong, or they separate perfectly. Newton steps with
    step halving; a slope below :data:`MIN_SLOPE` is held at it (and the intercept fitted alone).

    Args:
        raw: Raw confidences in [0, 1].
        right: Whether each caption was right.
        iterations: Most Newton steps.

    Returns:
        ``(slope, intercept)``.

    Raises:
        ValueError: No points, or ``raw`` and ``right`` of different lengths.
    """
    x = _logit(np.asarray(raw, np.float64))
    y = np.asarray(right, bool)
    if x.shape != y.shape or x.size == 0:
        raise ValueError(f"need as many labels as confidences, and at least one: {x.shape} vs {y.shape}")
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    t = np.where(y, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))

    def loss(a: float, b: float) -> float:
        z = a * x + b  # cross-entropy with logits, stable: log(1 + e^z) - t z
        return float(np.sum(np.logaddexp(0.0, z) - t * z))

    def newton(a: float, b: float, fix_slope: bool) -> tuple[float, float]:
        current = loss(a, b)
        for _ in range(iterations):
            p = _sigmoid(a * x + b)
            g = p - t  # d loss / d z
            w = np.maximum(p * (1 - p), 1e-12)
            if fix_slope:
                grad = np.array([0.0, g.sum()])
                hess = np.array([[1.0, 0.0], [0.0, w.sum() + 1e-9]])
            else:
                grad = np.array([(g * x).sum(), g.sum()])
                hess = np.array([[(w * x * x).sum(), (w * x).sum()], [(w * x).sum(), w.sum()]])
                hess += 1e-9 * np.eye(2)  # all raw values equal: the slope is not identified
            step = np.linalg.solve(hess, grad)
            scale = 1.0
            while scale > 1e-8:  # halve the step until the loss does not rise
                na, nb = a - scale * step[0], b - scale * step[1]
                new = loss(na, nb)
                if new <= current + 1e-12:
                    break
                scale /= 2
            else:
                break
            done = abs(current - new) < 1e-10 * max(1.0, abs(current))
            a, b, current = na, nb, new
            if done:
                break
        return a, b

    a, b = newton(1.0, 0.0, fix_slope=False)  # start at the identity map
    if not a >= MIN_SLOPE:
        a, b = newton(MIN_SLOPE, b, fix_slope=True)
    return float(a), float(b)


def expected_calibration_error(
    probabilities: Sequence[float] | np.ndarray, right: Sequence[bool] | np.ndarray, bins: int = N_BINS
) -> float:
    """ECE: over equal-width bins of [0, 1] (the last one closed), the share of predictions in each bin
    times the gap between their mean probability and the share of them that were right.

    Raises:
        ValueError: No points, or lengths that differ.
    """
    p = np.asarray(probabilities, np.float64)
    y = np.asarray(right, np.float64)
    if p.shape != y.shape or p.size == 0:
        raise ValueError(f"need as many labels as probabilities, and at least one: {p.shape} vs {y.shape}")
    index = np.minimum((np.clip(p, 0.0, 1.0) * bins).astype(np.int64), bins - 1)  # (N,) bin of each
    total = 0.0
    for b in range(bins):
        members = index == b
        if members.any():
            total += members.mean() * abs(p[members].mean() - y[members].mean())
    return float(total)


def calibrate(captions: list[Caption], calibration: Calibration | None) -> list[Caption]:
    """The captions with ``calibrated`` set from their raw confidence (unchanged without a calibration)."""
    if calibration is None:
        return captions
    return [
        dataclasses.replace(c, calibrated=calibration.probability(math.exp(c.confidence))) for c in captions
    ]


def write_calibration(calibration: Calibration, directory: str | os.PathLike[str]) -> Path:
    """Write ``calibration.json`` into an artifact folder (rewrite its manifest afterwards)."""
    path = Path(directory) / CALIBRATION_FILE
    path.write_text(json.dumps(calibration.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def read_calibration(directory: str | os.PathLike[str]) -> Calibration | None:
    """The artifact's ``calibration.json``, or ``None`` when it has none (an older artifact: the raw
    confidence is served).

    Raises:
        ArtifactError: The file exists but is not a valid calibration.
    """
    path = Path(directory) / CALIBRATION_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return Calibration.from_dict(data)
    except (ValueError, TypeError) as exc:
        raise ArtifactError(f"{path} is not a valid caption calibration: {exc}") from exc
