"""The domain model: fit, conformal threshold, files, and refusal of bad files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from snap2caption.errors import ArtifactError
from snap2caption.models.domain import (
    DOMAIN_ARRAYS_FILE,
    DOMAIN_FILE,
    fit_domain,
    load_domain,
)

DIM = 32


def in_domain(rng: np.random.Generator, n: int) -> np.ndarray:
    """Features on a low-dimensional subspace with a little noise, like a frozen encoder on simple scenes."""
    basis = np.linspace(0.5, 2.0, 4 * DIM).reshape(4, DIM)
    return rng.normal(size=(n, 4)) @ basis + 0.05 * rng.normal(size=(n, DIM))


def test_false_rejection_rate_holds_on_fresh_in_domain_images_and_far_images_are_rejected() -> None:
    rng = np.random.default_rng(0)
    domain = fit_domain(in_domain(rng, 400), in_domain(rng, 400), feature="toy", false_rejection_rate=0.05)

    fresh = in_domain(rng, 4000)
    # Conformal bound: expected rejection <= alpha; 4000 draws keep the sample within a few points of it.
    assert domain.rejection_rate(fresh) < 0.08
    # Off the subspace (what a different kind of image does in a frozen encoder's space): all rejected,
    # each with the smallest score there is.
    far = fresh + rng.normal(scale=1.0, size=fresh.shape)
    checks = domain.check(far[:50])
    assert not any(c.in_domain for c in checks)
    assert all(c.domain_score == pytest.approx(1 / 401) for c in checks)


def test_threshold_matches_the_in_domain_decision() -> None:
    rng = np.random.default_rng(1)
    domain = fit_domain(in_domain(rng, 200), in_domain(rng, 99), feature="toy", false_rejection_rate=0.1)
    t = domain.threshold
    below, above = domain.check(np.stack([domain.mean, domain.mean]))[0], None
    assert below.in_domain
    # Walk along one direction until the distance passes the threshold: the decision flips exactly there.
    direction = domain.components[0] * np.sqrt(domain.variances[0])
    steps = np.linspace(0, 3 * t, 600)
    checks = domain.check(domain.mean + steps[:, None] * direction)
    for check in checks:
        assert check.in_domain == (check.distance <= t + 1e-9)
    above = checks[-1]
    assert not above.in_domain
    info = domain.info()
    assert info["calibration_rejection_rate"] <= 0.1


def test_save_and_load_round_trip(tmp_path) -> None:
    rng = np.random.default_rng(2)
    domain = fit_domain(in_domain(rng, 100), in_domain(rng, 60), feature="toy", extra={"dataset": "v1"})
    domain.save(tmp_path)
    loaded = load_domain(tmp_path, feature="toy")
    assert loaded is not None
    x = in_domain(rng, 20)
    assert np.allclose(loaded.distances(x), domain.distances(x))
    assert loaded.info() == domain.info()
    assert json.loads((tmp_path / DOMAIN_FILE).read_text())["extra"] == {"dataset": "v1"}


def test_folder_without_domain_files_has_none(tmp_path) -> None:
    assert load_domain(tmp_path) is None


def test_bad_domain_files_are_refused(tmp_path) -> None:
    rng = np.random.default_rng(3)
    fit_domain(in_domain(rng, 50), in_domain(rng, 60), feature="toy").save(tmp_path)
    with pytest.raises(ArtifactError, match="feature space"):
        load_domain(tmp_path, feature="other")

    meta = json.loads((tmp_path / DOMAIN_FILE).read_text())
    (tmp_path / DOMAIN_FILE).write_text(json.dumps({**meta, "false_rejection_rate": 1.5}))
    with pytest.raises(ArtifactError, match="false_rejection_rate"):
        load_domain(tmp_path)
    (tmp_path / DOMAIN_FILE).write_text(json.dumps({**meta, "dim": DIM + 1}))
    with pytest.raises(ArtifactError, match="dim"):
        load_domain(tmp_path)

    (tmp_path / DOMAIN_ARRAYS_FILE).write_bytes(b"not an npz")
    (tmp_path / DOMAIN_FILE).write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="cannot read"):
        load_domain(tmp_path)
    (tmp_path / DOMAIN_ARRAYS_FILE).unlink()
    with pytest.raises(ArtifactError, match="must come together"):
        load_domain(tmp_path)


def test_fit_refuses_what_it_cannot_calibrate() -> None:
    rng = np.random.default_rng(4)
    with pytest.raises(ValueError, match="calibration images"):
        fit_domain(in_domain(rng, 50), in_domain(rng, 5), feature="toy", false_rejection_rate=0.01)
    with pytest.raises(ValueError, match="at least 2"):
        fit_domain(in_domain(rng, 1), in_domain(rng, 100), feature="toy")
    with pytest.raises(ValueError, match="features must be"):
        fit_domain(in_domain(rng, 10), np.zeros((100, DIM + 1)), feature="toy")
