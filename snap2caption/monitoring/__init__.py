"""Monitoring of what the models see: image statistics shared by the ETL and the services, and data drift
(PSI of sliding windows against the training reference shipped in each model artifact)."""

from __future__ import annotations

from snap2caption.monitoring.drift import (
    ALERT_THRESHOLD,
    REFERENCE_FILE,
    DriftMonitor,
    DriftReference,
    DriftReferenceError,
    FeatureReference,
    ModelDrift,
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
    "DriftMonitor",
    "DriftReference",
    "DriftReferenceError",
    "FeatureReference",
    "ImageStats",
    "ModelDrift",
    "build_reference",
    "decoded_stats",
    "image_stats",
    "numeric_reference",
    "oriented_size",
    "psi",
    "read_reference",
    "write_reference",
]
