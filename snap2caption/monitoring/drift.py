"""Data drift: reference histograms from the training data, sliding windows online, PSI between them.

Offline, :func:`build_reference` turns per-image statistics (``snap2caption.monitoring.stats``) of the
training split into a :class:`DriftReference`: per feature the bin edges and the reference proportions.
The ETL writes it as ``reference_stats.json`` beside its manifests; training copies it into the model
artifact (:data:`REFERENCE_FILE`), adding output-side features such as ``caption_confidence``.

Online, :class:`DriftMonitor` keeps the last ``window`` values of each feature and, every ``every``
observations, bins them with the reference's edges and computes the population stability index

    PSI = sum_b (q_b - p_b) * ln(q_b / p_b)

with ``p`` the reference and ``q`` the window proportions, both smoothed with ``epsilon`` so an empty bin
gives a large but finite term. Rules of thumb: < 0.1 no shift, 0.1-0.25 moderate, > 0.25 a shift worth
an alert. The values are exported as ``snap2caption_drift_psi{service,feature}`` and the window fill as
``snap2caption_drift_window_samples{service}``.

Numeric bins are equal-frequency on the reference (deciles by default), open at both ends; a value that
carries a large share of the reference on its own (every synthetic image is 256 px wide) gets a bin of
its own, so a shift to any other value shows. Categorical features have one bin per category plus one
for anything else.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import logging
import math
import os
import threading
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
from prometheus_client import Gauge

from snap2caption.imaging.decode import DecodedImage, DecodeLimits, probe_image
from snap2caption.monitoring.stats import CATEGORICAL_FEATURES, STATS_VERSION, decoded_stats

logger = logging.getLogger(__name__)

REFERENCE_FILE = "reference_stats.json"
FORMAT = "snap2caption.drift_reference"
FORMAT_VERSION = 1
DEFAULT_BINS = 10
EPSILON = 1e-4
ALERT_THRESHOLD = 0.25  # what the alert rules use; documented here so tests and rules agree
_POINT_MASS = 0.5  # a value holding >= this share of one bin's worth of the reference gets its own bin
_MASS_TOLERANCE = 1e-6  # relative half-width of a point mass's bin

DRIFT_PSI = Gauge(
    "snap2caption_drift_psi",
    "Population stability index of a feature's sliding window against the model's training reference "
    "(> 0.25: drift).",
    ["service", "feature"],
    multiprocess_mode="livemax",
)
DRIFT_WINDOW_SAMPLES = Gauge(
    "snap2caption_drift_window_samples",
    "Images in the drift monitor's sliding window.",
    ["service"],
    multiprocess_mode="livemax",
)

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


# ------------------------------------------------------------------------------------------ offline


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


# ------------------------------------------------------------------------------------------ online


class DriftMonitor:
    """Sliding windows of recent values per feature and their PSI against a reference; thread-safe.

    :meth:`observe` is called from request and batch threads (never the event loop); it bins each value
    (a bisection over the reference's edges), keeps each window's histogram current as values come in
    and leave, and every ``every`` calls recomputes every feature's PSI from those histograms (a sum over
    a dozen bins) and sets the gauges. Until a feature's window holds ``min_samples`` values its
    PSI is not reported (a handful of images says nothing about a distribution).

    Args:
        service: The ``service`` label of the gauges.
        reference: The reference; ``None`` leaves the monitor off until :meth:`set_reference`.
        window: Most recent values kept per feature.
        min_samples: Values a window needs before its PSI is reported.
        every: Recompute after this many observations.
        epsilon: PSI smoothing (see :func:`psi`).
    """

    def __init__(
        self,
        service: str,
        reference: DriftReference | None = None,
        *,
        window: int = 1000,
        min_samples: int = 200,
        every: int = 20,
        epsilon: float = EPSILON,
    ) -> None:
        if window < 1 or every < 1 or not 1 <= min_samples <= window:
            raise ValueError(
                f"need window >= 1, every >= 1, 1 <= min_samples <= window: {window=} {min_samples=}"
            )
        self.service = service
        self.window = window
        self.min_samples = min_samples
        self.every = every
        self.epsilon = epsilon
        self._lock = threading.Lock()
        self._reference: DriftReference | None = None
        self._key: object = None
        self._windows: dict[str, deque[int]] = {}  # bin index of each value in the window
        self._counts: dict[str, list[int]] = {}  # per bin: the windows' histograms, kept current
        self._psi: dict[str, float] = {}
        self._gauges: dict[str, Any] = {}  # feature -> its labelled gauge child
        self._since = 0
        self._samples_gauge = DRIFT_WINDOW_SAMPLES.labels(service)
        self.set_reference(reference)

    @property
    def reference(self) -> DriftReference | None:
        """The reference now compared against."""
        return self._reference

    @property
    def enabled(self) -> bool:
        """Whether there is a reference to compare with."""
        return self._reference is not None

    def set_reference(self, reference: DriftReference | None, key: object = None) -> None:
        """Compare against ``reference`` from now on, with empty windows; a no-op when ``key`` is the
        current one and not ``None`` (so callers may pass the serving model's version on every request).
        """
        with self._lock:
            if key is not None and key == self._key:
                return
            for feature in self._gauges:
                _remove_series(self.service, feature)
            self._gauges = {}
            self._reference, self._key = reference, key
            features = reference.features if reference is not None else {}
            self._windows = {name: deque(maxlen=self.window) for name in features}
            self._counts = {name: [0] * f.bins for name, f in features.items()}
            self._psi = {}
            self._since = 0
            self._samples_gauge.set(0)

    def observe(self, values: Mapping[str, Value]) -> None:
        """Add one image's (or one output's) values; features the reference lacks are ignored."""
        with self._lock:
            if self._reference is None:
                return
            added = False
            for name, value in values.items():
                window = self._windows.get(name)
                if window is None:
                    continue
                index = self._reference.features[name].bin_index(value)
                if index is None:
                    continue
                counts = self._counts[name]
                if len(window) == self.window:
                    counts[window[0]] -= 1  # the oldest value leaves as this one comes in
                window.append(index)
                counts[index] += 1
                added = True
            if not added:
                return
            self._since += 1
            if self._since >= self.every:
                self._recompute()

    def flush(self) -> dict[str, float]:
        """Recompute now (not waiting for ``every``) and return the PSI of every reported feature."""
        with self._lock:
            if self._reference is not None:
                self._recompute()
            return dict(self._psi)

    def psi_values(self) -> dict[str, float]:
        """The last computed PSI per feature (features still under ``min_samples`` are absent)."""
        with self._lock:
            return dict(self._psi)

    def samples(self) -> int:
        """Images in the window: the fullest feature window (image features fill together)."""
        with self._lock:
            return max((len(w) for w in self._windows.values()), default=0)

    def _recompute(self) -> None:
        assert self._reference is not None
        self._since = 0
        for name, window in self._windows.items():
            if len(window) < self.min_samples:
                continue
            value = psi(self._reference.features[name].proportions, self._counts[name], self.epsilon)
            self._psi[name] = value
            gauge = self._gauges.get(name)
            if gauge is None:  # made on first use: no series (rather than a false 0) before min_samples
                gauge = self._gauges[name] = DRIFT_PSI.labels(self.service, name)
            gauge.set(value)
        self._samples_gauge.set(max((len(w) for w in self._windows.values()), default=0))

    def status(self) -> dict[str, Any]:
        """``/readyz``'s ``drift`` check: on or off (and why), window fill, PSI per feature."""
        with self._lock:
            reference = self._reference
            if reference is None:
                return {
                    "enabled": False,
                    "reason": "the serving model's artifact has no reference statistics",
                }
            fill = max((len(w) for w in self._windows.values()), default=0)
            drifting = sorted(k for k, v in self._psi.items() if v > ALERT_THRESHOLD)
            return {
                "enabled": True,
                "dataset_version": reference.dataset_version,
                "window": self.window,
                "samples": fill,
                "min_samples": self.min_samples,
                "psi": {k: round(v, 4) for k, v in sorted(self._psi.items())},
                "drifting": drifting,
            }


def _remove_series(service: str, feature: str) -> None:
    with contextlib.suppress(KeyError):  # never set in this process
        DRIFT_PSI.remove(service, feature)


class DriftSettings(Protocol):
    """The ``drift_*`` fields of ``snap2caption.serving.settings.ModelServiceSettings``."""

    drift_enabled: bool
    drift_window: int
    drift_min_samples: int
    drift_every: int


class ModelDrift:
    """A service's drift monitor following the serving model: each version brings its own reference.

    The model store's loader calls :meth:`loaded` with the artifact folder (reading its reference off the
    request path); requests call :meth:`observe` with the version that serves them, which switches the
    monitor to that version's reference (and empties the windows) the first time it is seen.

    Args:
        service: Metrics label.
        enabled: ``False`` turns monitoring off whatever the artifacts hold.
        window, min_samples, every: As for :class:`DriftMonitor`.
    """

    def __init__(
        self,
        service: str,
        *,
        enabled: bool = True,
        window: int = 1000,
        min_samples: int = 200,
        every: int = 20,
    ) -> None:
        self.enabled = enabled
        self.monitor = DriftMonitor(service, window=window, min_samples=min_samples, every=every)
        self._references: dict[object, DriftReference | None] = {}
        self._errors: dict[object, str] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, service: str, settings: DriftSettings) -> ModelDrift:
        """Built from a model service's ``drift_*`` settings."""
        return cls(
            service,
            enabled=settings.drift_enabled,
            window=settings.drift_window,
            min_samples=settings.drift_min_samples,
            every=settings.drift_every,
        )

    def loaded(self, version: object, folder: str | os.PathLike[str]) -> None:
        """Read a freshly downloaded version's reference (``None`` when it has none or it is unreadable:
        drift is then off for that version, and :meth:`status` says why)."""
        if not self.enabled:
            return
        try:
            reference = read_reference(folder)
            error = (
                "" if reference is not None else "the serving model's artifact has no reference statistics"
            )
        except DriftReferenceError as exc:
            reference, error = None, f"unreadable reference statistics: {exc}"
            logger.warning("drift: version %s: %s", version, error)
        if reference is not None and reference.stats_version != STATS_VERSION:
            error = f"reference statistics v{reference.stats_version}, this code computes v{STATS_VERSION}"
            reference = None
        with self._lock:
            self._references[version] = reference
            self._errors[version] = error

    def _follow(self, version: object) -> None:
        with self._lock:
            reference = self._references.get(version)
        self.monitor.set_reference(reference, key=version)

    def observe(self, version: object, values: Mapping[str, Value]) -> None:
        """Feed one image's (or output's) values, seen by model ``version``."""
        if not self.enabled:
            return
        self._follow(version)
        self.monitor.observe(values)

    def observe_image(
        self,
        version: object,
        data: bytes,
        decoded: DecodedImage,
        limits: DecodeLimits,
        max_side: int | None = None,
    ) -> None:
        """Feed one decoded image's :func:`~snap2caption.monitoring.stats.image_stats`.

        Args:
            version: The model version the image is prepared for.
            data: Its bytes (read again for the original size only when ``decoded`` may have been shrunk).
            decoded: What ``decode_image(data, limits, max_side=max_side)`` returned.
            limits: The caps it was decoded with.
            max_side: The ``max_side`` it was decoded with, if any.
        """
        if not self.enabled:
            return
        shrunk = max_side is not None and max(decoded.width, decoded.height) >= max_side
        original = probe_image(data, limits) if shrunk else None  # a header read: ~0.1 ms
        self.observe(version, decoded_stats(decoded, original).to_dict())

    def status(self, version: object) -> dict[str, Any]:
        """``/readyz``'s ``drift`` check for the serving model ``version`` (``None``: none loaded yet)."""
        if not self.enabled:
            return {"enabled": False, "reason": "turned off in the settings"}
        if version is None:
            return {"enabled": False, "reason": "no model loaded yet"}
        self._follow(version)
        status = self.monitor.status()
        if not status["enabled"]:
            with self._lock:
                error = self._errors.get(version)
            if error:
                status["reason"] = error
        return status
