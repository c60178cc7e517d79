"""Calibrated caption confidence: the Platt fit recovers a known miscalibration, stays monotone, ECE is the
textbook one, ``calibration.json`` is checked on load, and both runtimes serve the same calibrated value."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from snap2caption.errors import ArtifactError
from snap2caption.manifest import write_manifest
from snap2caption.models import caption
from snap2caption.models.caption.calibration import (
    CALIBRATION_FILE,
    MIN_SLOPE,
    Calibration,
    expected_calibration_error,
    fit_platt,
    read_calibration,
    write_calibration,
)
from snap2caption.models.caption.export import export_for_serving
from tests.snap2caption.models.caption.conftest import saved_tiny


def _logit(p: np.ndarray) -> np.ndarray:
    return np.log(p) - np.log1p(-p)


def overconfident(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Raw confidences and right/wrong labels drawn from ``P(right) = sigmoid(0.5 logit(raw) - 0.7)``:
    a model that claims more than it delivers."""
    rng = np.random.default_rng(seed)
    raw = rng.uniform(0.05, 0.99, n)
    truth = 1 / (1 + np.exp(-(0.5 * _logit(raw) - 0.7)))
    return raw, rng.random(n) < truth


def test_platt_recovers_a_known_miscalibration_and_lowers_ece() -> None:
    raw, right = overconfident(3000, seed=0)
    slope, intercept = fit_platt(raw, right)
    assert slope == pytest.approx(0.5, abs=0.1) and intercept == pytest.approx(-0.7, abs=0.2)

    held_raw, held_right = overconfident(2000, seed=1)  # measured on other draws than the fit's
    fitted = Calibration(slope, intercept, "synthetic", "fit", raw.size, int(right.sum()))
    before = expected_calibration_error(held_raw, held_right)
    after = expected_calibration_error(fitted.apply(held_raw), held_right)
    assert before > 0.12 and after < 0.04 and after < before / 4


def test_the_map_is_strictly_increasing_even_when_confidence_says_nothing() -> None:
    rng = np.random.default_rng(2)
    raw = rng.uniform(0.1, 0.9, 300)
    right = rng.random(300) < 0.3  # independent of the raw confidence
    slope, intercept = fit_platt(raw, right)
    assert slope >= MIN_SLOPE
    mapped = Calibration(slope, intercept, "", "fit", 300, int(right.sum())).apply(
        np.linspace(0.01, 0.99, 50)
    )
    assert np.all(np.diff(mapped) > 0)  # ranking unchanged
    assert abs(float(mapped.mean()) - right.mean()) < 0.1  # about the base rate


@pytest.mark.parametrize("labels", ["all right", "all wrong", "separable"])
def test_degenerate_labels_give_a_finite_fit(labels: str) -> None:
    raw = np.linspace(0.2, 0.95, 40)
    right = {"all right": raw > 0, "all wrong": raw < 0, "separable": raw > 0.6}[labels]
    slope, intercept = fit_platt(raw, right)
    assert math.isfinite(slope) and math.isfinite(intercept) and slope >= MIN_SLOPE
    p = Calibration(slope, intercept, "", "fit", 40, int(right.sum())).apply(raw)
    assert np.all((p > 0) & (p < 1))


def test_ece_uses_ten_equal_width_bins() -> None:
    # Bin [0.1, 0.2): mean 0.15, 1 of 2 right -> gap 0.35; bin [0.9, 1.0]: mean 0.95, 2 of 2 right -> gap
    # 0.05 (1.0 falls in the last bin). ECE = 0.5 * 0.35 + 0.5 * 0.05.
    p = [0.1, 0.2 - 1e-9, 0.9, 1.0]
    assert expected_calibration_error(p, [True, False, True, True]) == pytest.approx(0.2, abs=1e-6)
    assert expected_calibration_error([0.7] * 10, [True] * 7 + [False] * 3) == pytest.approx(0.0)
    with pytest.raises(ValueError):
        expected_calibration_error([], [])


def sample() -> Calibration:
    return Calibration(0.8, -0.3, "pairs", "val", 200, 90, "test", 210, 0.21, 0.04)


def test_file_round_trip_and_absence(tmp_path: Path) -> None:
    assert read_calibration(tmp_path) is None  # an older artifact: raw confidence is served
    write_calibration(sample(), tmp_path)
    assert read_calibration(tmp_path) == sample()
    data = json.loads((tmp_path / CALIBRATION_FILE).read_text())
    assert data["method"] == "platt" and data["bins"] == 10 and "equal-width" in data["binning"]


@pytest.mark.parametrize(
    "change",
    [
        {"slope": -1.0},  # would reverse the ranking
        {"slope": "1"},
        {"intercept": float("inf")},
        {"format": "other"},
        {"ece_after": 2.0},
        {"n_fit": 1.5},
        {"missing": "slope"},
    ],
)
def test_a_malformed_file_is_refused(tmp_path: Path, change: dict[str, object]) -> None:
    data = sample().to_dict()
    if "missing" in change:
        del data[str(change["missing"])]
    else:
        data.update(change)
    (tmp_path / CALIBRATION_FILE).write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="not a valid caption calibration"):
        read_calibration(tmp_path)


def test_not_json_is_refused(tmp_path: Path) -> None:
    (tmp_path / CALIBRATION_FILE).write_text("{slope: 1")
    with pytest.raises(ArtifactError, match="not a valid caption calibration"):
        read_calibration(tmp_path)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _, folder = saved_tiny(tmp_path_factory.mktemp("calibrated") / "artifact")
    export_for_serving(folder)
    return folder


def with_file(source: Path, folder: Path, text: str | None) -> Path:
    """A copy of ``source`` with ``calibration.json`` holding ``text`` (none when None), re-hashed."""
    shutil.copytree(source, folder)
    if text is not None:
        (folder / CALIBRATION_FILE).write_text(text)
    write_manifest(folder)
    return folder


def test_both_runtimes_serve_the_same_calibrated_confidence(exported: Path, tmp_path: Path) -> None:
    calibration = Calibration(2.0, 0.5, "pairs", "val", 100, 40)
    folder = with_file(exported, tmp_path / "a", json.dumps(calibration.to_dict()))
    pixels = np.random.default_rng(3).standard_normal((4, 3, 64, 64)).astype(np.float32)
    torch_runtime = caption.load(folder, "torch")
    onnx_runtime = caption.load(folder, "onnx")
    assert torch_runtime.calibration == onnx_runtime.calibration == calibration
    by_torch, by_onnx = torch_runtime.generate(pixels), onnx_runtime.generate(pixels)
    for a, b in zip(by_torch, by_onnx, strict=True):
        assert a.text == b.text
        expected = calibration.probability(math.exp(a.confidence))
        assert a.calibrated == pytest.approx(expected, abs=1e-9) and a.probability == a.calibrated
        assert b.calibrated == pytest.approx(a.calibrated, abs=1e-4)
        assert a.calibrated != pytest.approx(a.raw_probability, abs=1e-3)  # the map really moved it

    plain = caption.load(exported, "onnx")  # no calibration.json: the raw confidence, as before
    assert plain.calibration is None
    for c in plain.generate(pixels):
        assert c.calibrated is None and c.probability == math.exp(c.confidence)


@pytest.mark.parametrize("runtime", ["torch", "onnx"])
def test_loading_refuses_a_malformed_calibration(exported: Path, tmp_path: Path, runtime: str) -> None:
    data = {**sample().to_dict(), "slope": 0.0}
    folder = with_file(exported, tmp_path / "bad", json.dumps(data))  # hashed: only the content is wrong
    with pytest.raises(ArtifactError, match="slope must be finite and > 0"):
        caption.load(folder, runtime)
