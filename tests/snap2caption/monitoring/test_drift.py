"""The sliding-window monitor and its gauges, and the per-version glue (``snap2caption.monitoring.drift``)."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import REGISTRY

from snap2caption.monitoring.drift import DriftMonitor, ModelDrift
from snap2caption.monitoring.reference import REFERENCE_FILE, DriftReference, build_reference, write_reference

_services = itertools.count()


def _service() -> str:
    """A fresh ``service`` label per test: the gauges are process-wide."""
    return f"test-drift-{next(_services)}"


def _gauge(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


# ------------------------------------------------------------------------------------------ monitor


def _normal_reference(rng: np.random.Generator, n: int = 4000) -> DriftReference:
    rows = [{"brightness": float(v), "format": "jpeg"} for v in rng.normal(120, 30, n)]
    return build_reference(rows, dataset_version="v1")


def test_monitor_stays_low_in_distribution_and_crosses_the_threshold_after_a_shift() -> None:
    rng = np.random.default_rng(1)
    service = _service()
    monitor = DriftMonitor(service, _normal_reference(rng), window=500, min_samples=100, every=25)
    for v in rng.normal(120, 30, 500):
        monitor.observe({"brightness": float(v), "format": "jpeg"})
    values = monitor.psi_values()
    assert values["brightness"] < 0.1 and values["format"] < 0.01
    assert _gauge("snap2caption_drift_psi", service=service, feature="brightness") == values["brightness"]
    assert _gauge("snap2caption_drift_window_samples", service=service) == 500
    for v in rng.normal(40, 10, 500):  # very dark images, now as PNG
        monitor.observe({"brightness": float(v), "format": "png"})
    values = monitor.psi_values()
    assert values["brightness"] > 0.25 and values["format"] > 0.25
    assert _gauge("snap2caption_drift_psi", service=service, feature="brightness") > 0.25  # type: ignore[operator]
    assert monitor.status()["drifting"] == ["brightness", "format"]


def test_monitor_waits_for_min_samples_and_recomputes_every_k() -> None:
    rng = np.random.default_rng(2)
    service = _service()
    monitor = DriftMonitor(service, _normal_reference(rng), window=100, min_samples=50, every=10)
    for v in rng.normal(120, 30, 49):
        monitor.observe({"brightness": float(v)})
    assert monitor.psi_values() == {}
    assert _gauge("snap2caption_drift_psi", service=service, feature="brightness") is None
    monitor.observe({"brightness": 120.0})  # the 50th: a multiple of every, and min_samples reached
    assert set(monitor.psi_values()) == {"brightness"}
    before = monitor.psi_values()["brightness"]
    for _ in range(9):
        monitor.observe({"brightness": 250.0})
    assert monitor.psi_values()["brightness"] == before  # not recomputed yet
    assert monitor.flush()["brightness"] > before


def test_the_window_slides() -> None:
    monitor = DriftMonitor(_service(), _normal_reference(np.random.default_rng(3)), window=50, min_samples=50)
    for _ in range(200):
        monitor.observe({"brightness": 250.0})
    assert monitor.samples() == 50
    assert monitor.flush()["brightness"] > 0.25
    for v in np.random.default_rng(4).normal(120, 30, 50):  # the bright images have all left the window
        monitor.observe({"brightness": float(v)})
    assert monitor.flush()["brightness"] < 0.6  # 50 samples in 10 bins: noisy, but far from the shift


def test_unknown_features_are_ignored_and_no_reference_means_off() -> None:
    monitor = DriftMonitor(_service(), None, window=10, min_samples=1, every=1)
    monitor.observe({"brightness": 1.0})
    assert not monitor.enabled and monitor.samples() == 0
    assert monitor.status()["enabled"] is False
    monitor.set_reference(_normal_reference(np.random.default_rng(5)), key=1)
    monitor.observe({"unknown": 3.0})
    assert monitor.samples() == 0


def test_a_new_reference_key_empties_the_windows_and_the_same_key_does_not() -> None:
    rng = np.random.default_rng(6)
    monitor = DriftMonitor(_service(), window=100, min_samples=10, every=10)
    monitor.set_reference(_normal_reference(rng), key=1)
    for v in rng.normal(120, 30, 20):
        monitor.observe({"brightness": float(v)})
    monitor.set_reference(_normal_reference(rng), key=1)
    assert monitor.samples() == 20
    monitor.set_reference(_normal_reference(rng), key=2)
    assert monitor.samples() == 0 and monitor.psi_values() == {}


def test_monitor_refuses_bad_settings() -> None:
    with pytest.raises(ValueError):
        DriftMonitor(_service(), window=10, min_samples=20)


# ------------------------------------------------------------------------------------------ per version


def test_model_drift_follows_the_serving_version(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    with_ref, without = tmp_path / "v1", tmp_path / "v2"
    with_ref.mkdir()
    without.mkdir()
    write_reference(_normal_reference(rng), with_ref)
    drift = ModelDrift(_service(), window=100, min_samples=10, every=10)
    drift.loaded(1, with_ref)
    drift.loaded(2, without)
    assert drift.status(None) == {"enabled": False, "reason": "no model loaded yet"}
    for v in rng.normal(120, 30, 30):
        drift.observe(1, {"brightness": float(v)})
    status = drift.status(1)
    assert status["enabled"] and status["samples"] == 30 and status["dataset_version"] == "v1"
    drift.observe(2, {"brightness": 1.0})  # swapped to a model without a reference: off, and says why
    status = drift.status(2)
    assert status["enabled"] is False and "no reference" in status["reason"]


def test_model_drift_reports_an_unreadable_reference(tmp_path: Path) -> None:
    (tmp_path / REFERENCE_FILE).write_text("{}")
    drift = ModelDrift(_service())
    drift.loaded(1, tmp_path)
    status = drift.status(1)
    assert status["enabled"] is False and "unreadable" in status["reason"]


def test_model_drift_turned_off(tmp_path: Path) -> None:
    write_reference(_normal_reference(np.random.default_rng(8)), tmp_path)
    drift = ModelDrift(_service(), enabled=False)
    drift.loaded(1, tmp_path)
    drift.observe(1, {"brightness": 1.0})
    assert drift.status(1) == {"enabled": False, "reason": "turned off in the settings"}
    assert drift.monitor.samples() == 0
