"""Monitoring of what the models see: image statistics shared by the ETL and the services, and data drift
(PSI of sliding windows against the training reference shipped in each model artifact).

Two halves, so that the ETL and training never load the serving stack:

- offline, re-exported here: :mod:`~snap2caption.monitoring.stats` (the per-image statistics) and
  :mod:`~snap2caption.monitoring.reference` (reference histograms, their file, PSI); NumPy and JSON only;
- online: :mod:`~snap2caption.monitoring.drift` (sliding windows and their Prometheus gauges), imported by
  the model services alone.
"""

from __future__ import annotations

from snap2caption.monitoring.reference import (
    ALERT_THRESHOLD,
    REFERENCE_FILE,
    DriftReference,
    DriftReferenceError,
    FeatureReference,
    build_reference,
    numeric_reference,
    psi,
    read_reference,
    write_reference,
)
from snap2caption.monitoring.stats import FEATURES, ImageStats, decoded_stats, image_stats, oriented_size

__all__ = [
    "ALERT_THRESHOLD",
    "FEATURES",
    "REFERENCE_FILE",
    "DriftReference",
    "DriftReferenceError",
    "FeatureReference",
    "ImageStats",
    "build_reference",
    "decoded_stats",
    "image_stats",
    "numeric_reference",
    "oriented_size",
    "psi",
    "read_reference",
    "write_reference",
]
