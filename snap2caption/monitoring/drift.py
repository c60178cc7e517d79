"""Data drift online: sliding windows of live values and their PSI against the model's reference.

:class:`DriftMonitor` keeps the last ``window`` values of each feature and, every ``every``
observations, bins them with the reference's edges and computes their population stability index
(:func:`~snap2caption.monitoring.reference.psi`; > 0.25 is a shift worth an alert). The values are
exported as ``snap2caption_drift_psi{service,feature}`` and the window fill as
``snap2caption_drift_window_samples{service}``. :class:`ModelDrift` follows the serving model: each
version brings its own reference (``snap2caption.monitoring.reference``, built offline by the ETL and
shipped in the artifact).

This module creates Prometheus metrics on import: only the services import it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections import deque
from collections.abc import Mapping
from typing import Any, Protocol

from prometheus_client import Gauge

from snap2caption.imaging.decode import DecodedImage, DecodeLimits, probe_image
from snap2caption.monitoring.reference import (
    ALERT_THRESHOLD,
    EPSILON,
    DriftReference,
    DriftReferenceError,
    Value,
    psi,
    read_reference,
)
from snap2caption.monitoring.stats import STATS_VERSION, decoded_stats

logger = logging.getLogger(__name__)

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
