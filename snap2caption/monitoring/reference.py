"""Drift references: histograms of the training data, and the PSI that compares a sample with them.

This is the offline half of drift monitoring, what the ETL and training import: plain NumPy and JSON,
no Prometheus and no web framework, so neither needs the ``serve`` extra. The online half, the
sliding windows and their gauges, is ``snap2caption.monitoring.drift``.

:func:`build_reference` turns per-image statistics (``snap2caption.monitoring.stats``) of the training
split into a :class:`DriftReference`: per feature the bin edges and the reference proportions. The ETL
writes it as ``reference_stats.json`` beside its manifests; training copies it into the model artifact
(:data:`REFERENCE_FILE`), adding output-side features such as ``caption_confidence``.

:func:`psi` is the population stability index

    PSI = sum_b (q_b - p_b) * ln(q_b / p_b)

with ``p`` the reference and ``q`` the observed proportions, both smoothed with ``epsilon`` so an empty
bin gives a large but finite term. Rules of thumb: < 0.1 no shift, 0.1-0.25 moderate, > 0.25 a shift
worth an alert.

Numeric bins are equal-frequency on the reference (deciles by default), open at both ends; a value that
carries a large share of the reference on its own (every synthetic image is 256 px wide) gets a bin of
its own, so a shift to any other value shows. Categorical features have one bin per category plus one
for anything else.
"""

from __future__ import annotations

import bisect
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from snap2caption.monitoring.stats import CATEGORICAL_FEATURES, STATS_VERSION

REFERENCE_FILE = "reference_stats.json"
FORMAT = "snap2caption.drift_reference"
FORMAT_VERSION = 1
DEFAULT_BINS = 10
EPSILON = 1e-4
ALERT_THRESHOLD = 0.25  # what the alert rules use; documented here so tests and rules agree
_POINT_MASS = 0.5  # a value holding >= this share of one bin's worth of the reference gets its own bin
_MASS_TOLERANCE = 1e-6  # relative half-width of a point mass's bin

Value = float | int | str


class DriftReferenceError(ValueError):
    """A reference file that is not a drift reference of a known format."""


@dataclass(frozen=True)
class FeatureReference:
    """One feature's reference histogram.

    Attributes:
        kind: ``numeric`` (bins from ``edges``) or ``categorical`` (one bin per category, then "other").
        proportions: Share of the reference in each bin; sums to 1.
        count: Reference values the histogram was made from.
        edges: Numeric: ascending cut points; bin ``i`` holds ``edges[i-1] < x <= edges[i]``, so there are
            ``len(edges) + 1`` bins, open at both ends.
        categories: Categorical: the category of each bin but the last ("other").
    """

    kind: Literal["numeric", "categorical"]
    proportions: tuple[float, ...]
    count: int
    edges: tuple[float, ...] = ()
    categories: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        bins = len(self.edges) + 1 if self.kind == "numeric" else len(self.categories) + 1
        if len(self.proportions) != bins:
            raise DriftReferenceError(f"{len(self.proportions)} proportions for {bins} bins")
        if self.kind == "numeric" and any(b <= a for a, b in zip(self.edges, self.edges[1:], strict=False)):
            raise DriftReferenceError("edges must be strictly ascending")

    @property
    def bins(self) -> int:
        """Number of bins."""
        return len(self.proportions)

    def bin_index(self, value: Value) -> int | None:
        """The bin of one value (``None`` for a non-finite number, which no bin holds)."""
        if self.kind == "numeric":
            x = float(value)
            return bisect.bisect_left(self.edges, x) if math.isfinite(x) else None
        text = str(value)
        return self.categories.index(text) if text in self.categories else len(self.categories)

    def bin_counts(self, values: Iterable[Value]) -> np.ndarray:
        """(bins,) int64 counts of ``values`` in this feature's bins."""
        if self.kind == "numeric":
            x = np.fromiter((float(v) for v in values), dtype=np.float64)
            x = x[np.isfinite(x)]
            index = np.searchsorted(np.asarray(self.edges, dtype=np.float64), x, side="left")
        else:
            lookup = {c: i for i, c in enumerate(self.categories)}
            other = len(self.categories)
            index = np.fromiter((lookup.get(str(v), other) for v in values), dtype=np.int64)
        return np.bincount(index, minlength=self.bins).astype(np.int64)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        doc: dict[str, Any] = {"kind": self.kind, "count": self.count, "proportions": list(self.proportions)}
        if self.kind == "numeric":
            doc["edges"] = list(self.edges)
        else:
            doc["categories"] = list(self.categories)
        return doc

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> FeatureReference:
        """Build from :meth:`to_dict`'s output."""
        kind = doc.get("kind")
        if kind not in ("numeric", "categorical"):
            raise DriftReferenceError(f"unknown feature kind {kind!r}")
        return cls(
            kind=kind,
            proportions=tuple(float(p) for p in doc["proportions"]),
            count=int(doc["count"]),
            edges=tuple(float(e) for e in doc.get("edges", ())),
            categories=tuple(str(c) for c in doc.get("categories", ())),
        )


@dataclass(frozen=True)
class DriftReference:
    """Reference histograms of every monitored feature, with where they came from.

    Attributes:
        features: Feature name -> its histogram.
        count: Images the reference was made from.
        dataset_version: The dataset's version (``manifests:<hash>`` from the ETL; training replaces it
            with its own, e.g. ``dvc:<md5>``).
        split: The split the image features come from (``train``).
        stats_version: ``snap2caption.monitoring.stats.STATS_VERSION`` of the features.
        sources: Feature name -> what it was computed on (``"train split"``, ``"test split captions"``).
    """

    features: dict[str, FeatureReference]
    count: int
    dataset_version: str = ""
    split: str = "train"
    stats_version: int = STATS_VERSION
    sources: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The ``reference_stats.json`` document."""
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "stats_version": self.stats_version,
            "dataset_version": self.dataset_version,
            "split": self.split,
            "count": self.count,
            "sources": dict(self.sources),
            "features": {name: f.to_dict() for name, f in sorted(self.features.items())},
        }

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> DriftReference:
        """Parse a ``reference_stats.json`` document.

        Raises:
            DriftReferenceError: Another format, or a malformed feature.
        """
        if doc.get("format") != FORMAT or doc.get("format_version") != FORMAT_VERSION:
            raise DriftReferenceError(
                f"not a {FORMAT} v{FORMAT_VERSION} document: {doc.get('format')} v{doc.get('format_version')}"
            )
        try:
            features = {str(k): FeatureReference.from_dict(v) for k, v in doc["features"].items()}
            return cls(
                features=features,
                count=int(doc["count"]),
                dataset_version=str(doc.get("dataset_version", "")),
                split=str(doc.get("split", "")),
                stats_version=int(doc.get("stats_version", 0)),
                sources={str(k): str(v) for k, v in doc.get("sources", {}).items()},
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise DriftReferenceError(f"malformed drift reference: {exc}") from exc

    def to_json(self) -> str:
        """Deterministic JSON text (sorted keys, newline at the end)."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def with_features(
        self, extra: Mapping[str, FeatureReference], sources: Mapping[str, str] | None = None
    ) -> DriftReference:
        """A copy with more (or replaced) features, e.g. the model's output distribution."""
        return DriftReference(
            {**self.features, **extra},
            self.count,
            self.dataset_version,
            self.split,
            self.stats_version,
            {**self.sources, **(sources or {})},
        )


# ------------------------------------------------------------------------------------------ histograms


def numeric_reference(values: Sequence[float], bins: int = DEFAULT_BINS) -> FeatureReference:
    """An equal-frequency histogram of ``values``, point masses in bins of their own.

    Args:
        values: The reference values (non-finite ones are dropped).
        bins: Target number of equal-frequency bins (more appear around point masses).

    Raises:
        ValueError: No finite value, or ``bins < 2``.
    """
    if bins < 2:
        raise ValueError(f"bins must be >= 2, got {bins}")
    x = np.asarray(values, dtype=np.float64)
    x = np.sort(x[np.isfinite(x)])
    if not len(x):
        raise ValueError("no finite reference values")
    cuts = np.quantile(x, np.arange(1, bins) / bins, method="inverted_cdf")  # actual data values
    edges = sorted(set(cuts.tolist()))
    unique, counts = np.unique(x, return_counts=True)
    masses = [float(v) for v, c in zip(unique, counts, strict=True) if c >= _POINT_MASS * len(x) / bins]
    previous_top = -np.inf
    for value in masses:
        # (value - tol, value + tol]: the value alone (float noise of a recomputation included);
        # anything else lands in the bins beside it. Cut points inside the interval go.
        tol = _MASS_TOLERANCE * max(1.0, abs(value))
        low, high = value - tol, value + tol
        if low <= previous_top:  # two masses closer than their tolerance: keep the first one's bin
            continue
        edges = [e for e in edges if not low <= e <= high] + [low, high]
        previous_top = high
    ordered = tuple(sorted(edges))
    ref = FeatureReference("numeric", tuple([0.0] * (len(ordered) + 1)), len(x), edges=ordered)
    return FeatureReference("numeric", _proportions(ref.bin_counts(x)), len(x), edges=ordered)


def categorical_reference(values: Sequence[str], categories: Sequence[str]) -> FeatureReference:
    """One bin per category in ``categories`` plus "other"."""
    ref = FeatureReference(
        "categorical", tuple([0.0] * (len(categories) + 1)), 0, categories=tuple(categories)
    )
    counts = ref.bin_counts(values)
    return FeatureReference("categorical", _proportions(counts), int(counts.sum()), categories=ref.categories)


def build_reference(
    rows: Sequence[Mapping[str, Value]],
    *,
    dataset_version: str = "",
    split: str = "train",
    bins: int = DEFAULT_BINS,
    source: str | None = None,
) -> DriftReference:
    """The reference of per-image statistics (``ImageStats.to_dict()`` rows).

    Args:
        rows: One mapping per image, feature name -> value; numeric unless the feature is in
            ``CATEGORICAL_FEATURES``.
        dataset_version: Recorded as is.
        split: The split the rows come from.
        bins: Equal-frequency bins per numeric feature.
        source: What the rows were computed on (default ``"<split> split"``).

    Raises:
        ValueError: No rows.
    """
    if not rows:
        raise ValueError("a reference needs at least one image")
    names = sorted({k for row in rows for k in row})
    features: dict[str, FeatureReference] = {}
    for name in names:
        column = [row[name] for row in rows if name in row]
        if name in CATEGORICAL_FEATURES:
            features[name] = categorical_reference([str(v) for v in column], CATEGORICAL_FEATURES[name])
        else:
            features[name] = numeric_reference([float(v) for v in column], bins)
    where = source or f"{split} split"
    return DriftReference(
        features, len(rows), dataset_version, split, STATS_VERSION, dict.fromkeys(features, where)
    )


def write_reference(reference: DriftReference, directory: str | os.PathLike[str]) -> Path:
    """Write ``reference_stats.json`` into ``directory``; returns its path."""
    path = Path(directory) / REFERENCE_FILE
    path.write_text(reference.to_json(), encoding="utf-8")
    return path


def read_reference(directory: str | os.PathLike[str]) -> DriftReference | None:
    """``directory/reference_stats.json``, or ``None`` when the folder has none (an older artifact).

    Raises:
        DriftReferenceError: The file exists but is not a readable reference.
    """
    path = Path(directory) / REFERENCE_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise DriftReferenceError(f"{path}: not JSON: {exc}") from exc
    return DriftReference.from_dict(doc)


# ------------------------------------------------------------------------------------------ PSI


def _proportions(counts: np.ndarray) -> tuple[float, ...]:
    total = counts.sum()
    if total == 0:
        return tuple([1.0 / len(counts)] * len(counts))
    return tuple(float(c) for c in counts / total)


def psi(reference: Iterable[float], actual: Iterable[float], epsilon: float = EPSILON) -> float:
    """Population stability index of ``actual`` against ``reference`` proportions (or counts).

    Each distribution is normalised, then smoothed as ``(p + epsilon) / (1 + bins * epsilon)`` so an
    empty bin contributes a large, finite term instead of infinity.

    Args:
        reference: (bins,) reference proportions or counts.
        actual: (bins,) observed proportions or counts.
        epsilon: Smoothing mass added to every bin.

    Raises:
        ValueError: Lengths differ, a negative entry, or an all-zero distribution.
    """
    # Plain Python: a dozen bins, recomputed often; numpy's per-call overhead would dominate.
    p = [float(v) for v in reference]
    q = [float(v) for v in actual]
    if len(p) != len(q) or not p:
        raise ValueError(f"distributions of different lengths: {len(p)} vs {len(q)}")
    p_total, q_total = sum(p), sum(q)
    if min(p) < 0 or min(q) < 0 or p_total <= 0 or q_total <= 0:
        raise ValueError("distributions must be non-negative and not all zero")
    norm = 1 + len(p) * epsilon
    total = 0.0
    for p_bin, q_bin in zip(p, q, strict=True):
        ps = (p_bin / p_total + epsilon) / norm
        qs = (q_bin / q_total + epsilon) / norm
        if qs != ps:  # also keeps epsilon = 0 with two empty bins finite
            total += (qs - ps) * math.log(qs / ps)
    return total
