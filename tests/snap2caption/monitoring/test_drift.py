"""PSI, reference histograms, the sliding-window monitor and its gauges, the per-version glue."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import REGISTRY

from snap2caption.monitoring.drift import (
    REFERENCE_FILE,
    DriftMonitor,
    DriftReference,
    DriftReferenceError,
    FeatureReference,
    ModelDrift,
    build_reference,
    categorical_reference,
    numeric_reference,
    psi,
    read_reference,
    write_reference,
)

_services = itertools.count()


def _service() -> str:
    """A fresh ``service`` label per test: the gauges are process-wide."""
    return f"test-drift-{next(_services)}"


def _gauge(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


# ------------------------------------------------------------------------------------------------ PSI


def test_psi_known_value() -> None:
    # (0.9 - 0.5) ln(0.9 / 0.5) + (0.1 - 0.5) ln(0.1 / 0.5) = 0.4 ln 1.8 + 0.4 ln 5
    expected = 0.4 * math.log(1.8) + 0.4 * math.log(5.0)
    assert psi([0.5, 0.5], [0.9, 0.1]) == pytest.approx(expected, rel=1e-3)
    assert psi([0.5, 0.5], [0.9, 0.1], epsilon=0.0) == pytest.approx(expected, rel=1e-12)


def test_psi_takes_counts_and_is_zero_for_identical_distributions() -> None:
    assert psi([10, 30, 60], [1, 3, 6]) == pytest.approx(0.0, abs=1e-12)
    assert psi([0.2, 0.3, 0.5], [0.2, 0.3, 0.5]) == pytest.approx(0.0, abs=1e-12)


def test_psi_of_disjoint_distributions_is_large_but_finite() -> None:
    value = psi([1, 0], [0, 1])
    assert math.isfinite(value) and value > 10  # about 2 ln(1 / epsilon)
    # A bin empty in the reference only: still finite thanks to the smoothing.
    assert 0.25 < psi([0.5, 0.5, 0.0], [0.4, 0.4, 0.2]) < 10


def test_psi_is_symmetric_in_its_arguments() -> None:
    assert psi([0.1, 0.9], [0.6, 0.4]) == pytest.approx(psi([0.6, 0.4], [0.1, 0.9]))


@pytest.mark.parametrize(("p", "q"), [([0.5, 0.5], [1.0]), ([0, 0], [1, 1]), ([-1, 2], [1, 1])])
def test_psi_refuses_bad_input(p: list[float], q: list[float]) -> None:
    with pytest.raises(ValueError):
        psi(p, q)


# ------------------------------------------------------------------------------------------ references


def test_numeric_reference_is_equal_frequency() -> None:
    ref = numeric_reference(list(range(1000)), bins=10)
    assert ref.bins == 10
    assert ref.proportions == pytest.approx([0.1] * 10)
    assert ref.bin_counts([-5, 0, 99, 100, 999, 10_000]).tolist() == [3, 1, 0, 0, 0, 0, 0, 0, 0, 2]


def test_a_point_mass_gets_a_bin_of_its_own() -> None:
    ref = numeric_reference([256.0] * 200)  # every synthetic image is 256 px wide
    assert ref.proportions == (0.0, 1.0, 0.0)
    assert psi(ref.proportions, ref.bin_counts([256] * 50)) < 0.01
    assert psi(ref.proportions, ref.bin_counts([300] * 50)) > 5
    assert psi(ref.proportions, ref.bin_counts([200] * 50)) > 5
    # Recomputed floats a rounding error away still count as the mass.
    assert ref.bin_counts([256.0 * (1 + 1e-9)]).tolist() == [0, 1, 0]


def test_mixed_point_mass_and_continuous_values() -> None:
    rng = np.random.default_rng(0)
    values = [1.0] * 500 + rng.uniform(2, 3, 500).tolist()
    ref = numeric_reference(values)
    assert sum(ref.proportions) == pytest.approx(1.0)
    mass_bin = int(ref.bin_counts([1.0]).argmax())
    assert ref.proportions[mass_bin] == pytest.approx(0.5)


def test_categorical_reference_has_an_other_bin() -> None:
    ref = categorical_reference(["jpeg"] * 3 + ["png"], ["jpeg", "png", "webp"])
    assert ref.proportions == (0.75, 0.25, 0.0, 0.0)
    assert ref.bin_counts(["png", "heic", "jpeg"]).tolist() == [1, 1, 0, 1]


def test_reference_round_trips_through_json(tmp_path: Path) -> None:
    rows = [
        {
            "width": 64,
            "height": 48,
            "aspect": 4 / 3,
            "brightness": float(b),
            "colourfulness": 3.0,
            "format": "png",
        }
        for b in range(100)
    ]
    reference = build_reference(rows, dataset_version="manifests:abc", split="train")
    assert reference.count == 100 and reference.features["format"].kind == "categorical"
    assert reference.sources["brightness"] == "train split"
    path = write_reference(reference, tmp_path)
    assert path.name == REFERENCE_FILE
    assert read_reference(tmp_path) == reference
    assert json.loads(path.read_text())["dataset_version"] == "manifests:abc"
    extended = reference.with_features({"caption_confidence": numeric_reference([0.5, 0.6])})
    assert set(extended.features) == {*reference.features, "caption_confidence"}


def test_missing_reference_is_none_and_a_bad_one_raises(tmp_path: Path) -> None:
    assert read_reference(tmp_path) is None
    (tmp_path / REFERENCE_FILE).write_text('{"format": "something else"}')
    with pytest.raises(DriftReferenceError):
        read_reference(tmp_path)
    (tmp_path / REFERENCE_FILE).write_text("not json")
    with pytest.raises(DriftReferenceError):
        read_reference(tmp_path)


def test_feature_reference_refuses_inconsistent_bins() -> None:
    with pytest.raises(DriftReferenceError):
        FeatureReference("numeric", (0.5, 0.5), 2, edges=(1.0, 2.0))
    with pytest.raises(DriftReferenceError):
        FeatureReference("numeric", (0.3, 0.3, 0.4), 2, edges=(2.0, 1.0))


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
