"""The tagger's calibrated minimum score: the threshold rule on constructed tags, and the real ImageNet
tagger packaged with it (``config.json``, ``eval.json``, the card), used by default when loaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import skimage.data
from PIL import Image

from snap2caption.manifest import verify_manifest
from snap2caption.models import tagger as tagger_model
from snap2caption.models.tagger.config import TaggerConfig, read_config
from snap2caption.models.tagger.net import TaggerNet
from training.tagger.min_score import TARGET_PRECISION, pick_threshold
from training.tagger.package import package_tagger


def test_the_lowest_threshold_that_reaches_the_precision() -> None:
    scored = [(0.9, True), (0.5, True), (0.3, False), (0.2, True), (0.1, True), (0.05, False), (0.01, False)]
    # Top 5 kept: 4 of 5 right (0.8); top 4: 3 of 4 (0.75); top 2: 2 of 2. At 0.8 the lowest is 0.1's cut,
    # placed between 0.1 and 0.05.
    assert pick_threshold(scored, 0.8) == pytest.approx((0.1 * 0.05) ** 0.5)
    assert pick_threshold(scored, 0.9) == pytest.approx((0.5 * 0.3) ** 0.5)
    assert pick_threshold([(0.4, True), (0.2, True)], 0.9) == 0.2  # every tag kept: the lowest score
    assert pick_threshold([(0.4, False), (0.2, False)], 0.9) is None  # nothing reaches it
    assert pick_threshold([], 0.9) is None


def test_config_min_score_is_checked_and_defaults_to_zero() -> None:
    base = {"backbone": "tiny", "num_classes": 1, "preprocess": {}, "labels": ["a"], "names": ["a"]}
    assert TaggerConfig.from_dict(base).min_score == 0.0  # an artifact packaged before the calibration
    assert TaggerConfig.from_dict({**base, "min_score": 0.1}).min_score == 0.1
    for bad in (-0.1, 1.0, "0.1", True):
        with pytest.raises(ValueError, match="min_score"):
            TaggerConfig.from_dict({**base, "min_score": bad})


@pytest.fixture(scope="module")
def packaged(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, float]]:
    return package_tagger(tmp_path_factory.mktemp("tagger") / "artifact", TaggerNet.pretrained())


def test_the_real_tagger_is_packaged_with_a_calibrated_min_score(
    packaged: tuple[Path, dict[str, float]],
) -> None:
    folder, metrics = packaged
    verify_manifest(folder)  # config.json rewritten with the minimum, then hashed
    min_score = read_config(folder).min_score
    assert 0 < min_score < 1 and metrics["min_score"] == min_score
    report = json.loads((folder / "eval.json").read_text())["min_score"]
    assert report["calibrated"] and report["min_score"] == min_score
    assert report["precision"] >= TARGET_PRECISION and metrics["min_score_precision"] == report["precision"]
    assert report["photos_top1_right_kept"] == report["photos"] == 3  # every photo keeps its right top-1
    assert report["scenes"] == 50 and "scikit-image" in report["method"]
    card = (folder / "README.md").read_text()
    assert "## Minimum tag score" in card and f"{min_score:.4f}" in card and "synthetic shapes" in card


def test_low_tags_are_not_returned_by_default(packaged: tuple[Path, dict[str, float]]) -> None:
    """The issue's case: "plastic bag" at 0.0009 for the cat photo. The loaded tagger carries the minimum
    (the detector service's default, ``tests/services/detector/test_engine.py``)."""
    folder, _ = packaged
    for runtime in ("onnx", "torch"):
        tagger = tagger_model.load(folder, runtime)
        assert tagger.min_score == read_config(folder).min_score
        cat = Image.fromarray(skimage.data.chelsea())
        (everything,) = tagger.tag([cat], top_k=10)
        (kept,) = tagger.tag([cat], top_k=10, min_score=tagger.min_score)
        assert any(t.score < 0.01 for t in everything)  # what was shown before
        assert kept and kept[0].name == "cat" and all(t.score >= tagger.min_score for t in kept)
        assert len(kept) < len(everything)
