"""Cached encoder features: reused when the key matches, never when encoder, manifest or index differ."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from snap2caption.cli import main
from snap2caption.models.backbones import build_encoder
from training.caption import features as features_module
from training.caption.data import SplitData, manifest_path
from training.caption.features import FeatureKey, cached_features, encoder_fingerprint


def _encoder(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_encoder("tiny", trainable="none")


@pytest.fixture()
def count_extractions(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    real = features_module.extract_features

    def counting(encoder, split, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(split.name)
        return real(encoder, split, **kwargs)

    monkeypatch.setattr(features_module, "extract_features", counting)
    return calls


def test_cache_is_reused_only_for_the_same_key(
    caption_data: Path, tmp_path: Path, count_extractions: list[str]
) -> None:
    val = SplitData.load(caption_data, "val")
    encoder = _encoder(0)
    first = cached_features(encoder, val, tmp_path, progress=False)
    assert first.shape == (len(val), 32, 8, 8) and first.dtype == torch.float16
    again = cached_features(encoder, val, tmp_path, progress=False)
    assert torch.equal(first, again) and count_extractions == ["val"]
    # Same encoder rebuilt from the same seed: same weights, same key.
    cached_features(_encoder(0), val, tmp_path, progress=False)
    assert count_extractions == ["val"]
    # Other weights: another key; the stale entry of this split is removed.
    other = cached_features(_encoder(1), val, tmp_path, progress=False)
    assert count_extractions == ["val", "val"] and not torch.equal(first, other)
    assert len(list((tmp_path / "tiny").glob("val-*.safetensors"))) == 1
    # Another dtype: another key.
    assert cached_features(_encoder(1), val, tmp_path, dtype="float32", progress=False).dtype == torch.float32


def test_a_changed_manifest_invalidates_the_cache(
    caption_data: Path, tmp_path: Path, count_extractions: list[str]
) -> None:
    data = tmp_path / "data"
    shutil.copytree(caption_data, data)
    encoder = _encoder(0)
    cached_features(encoder, SplitData.load(data, "val"), tmp_path / "cache", progress=False)
    table = pq.read_table(manifest_path(data, "val"))
    pq.write_table(table.slice(1), manifest_path(data, "val"))  # one image fewer
    shorter = SplitData.load(data, "val")
    result = cached_features(encoder, shorter, tmp_path / "cache", progress=False)
    assert result.shape[0] == len(shorter) == table.num_rows - 1
    assert count_extractions == ["val", "val"]


def test_an_index_that_does_not_match_is_never_trusted(
    caption_data: Path, tmp_path: Path, count_extractions: list[str]
) -> None:
    val = SplitData.load(caption_data, "val")
    encoder = _encoder(0)
    cached_features(encoder, val, tmp_path, progress=False)
    key = FeatureKey(
        "tiny",
        encoder_fingerprint(encoder),
        encoder.preprocess.to_dict(),
        val.manifest_sha256,
        "val",
        "float16",
    )
    _, index_path = key.paths(tmp_path)
    index = json.loads(index_path.read_text())
    index["image_ids"] = list(reversed(index["image_ids"]))
    index_path.write_text(json.dumps(index))
    cached_features(encoder, val, tmp_path, progress=False)
    assert count_extractions == ["val", "val"]


def test_features_command_fills_the_cache_training_reads(caption_data: Path, tmp_path: Path) -> None:
    args = [
        "train",
        "caption-features",
        "--config",
        "tiny",
        "--data",
        str(caption_data),
        "--out",
        str(tmp_path),
    ]
    result = CliRunner().invoke(
        main, [*args, "--splits", "val", "--no-progress", "model.encoder.trainable=none"]
    )
    assert result.exit_code == 0, result.output
    assert "val: features (" in result.output
    # Training builds its encoder from the same seed first, so it finds these features.
    torch.manual_seed(0)
    encoder = build_encoder("tiny", trainable="none")
    val = SplitData.load(caption_data, "val")
    key = FeatureKey(
        "tiny",
        encoder_fingerprint(encoder),
        encoder.preprocess.to_dict(),
        val.manifest_sha256,
        "val",
        "float16",
    )
    assert key.paths(tmp_path)[0].is_file()
    learning = CliRunner().invoke(
        main, [*args, "--out", str(tmp_path / "none"), "model.encoder.trainable=all"]
    )
    assert learning.exit_code == 0 and "no features to cache" in learning.output
    assert list((tmp_path / "none").iterdir()) == []


def test_onnxruntime_computes_the_same_features(caption_data: Path, tmp_path: Path) -> None:
    val = SplitData.load(caption_data, "val")
    encoder = _encoder(0)
    options = {"dtype": "float32", "progress": False}
    by_torch = cached_features(encoder, val, tmp_path / "torch", runtime="torch", **options)
    by_onnx = cached_features(encoder, val, tmp_path / "onnx", runtime="onnxruntime", **options)
    torch.testing.assert_close(by_onnx, by_torch, rtol=1e-4, atol=1e-4)


def frozen_tiny(caption_data: Path, tmp_path: Path, *overrides: str) -> tuple[Any, Any, Any]:
    """(config, splits, model) of an untrained ``tiny`` run with a frozen encoder, and ``overrides``."""
    from training.caption.config import CaptionRunConfig
    from training.caption.run import build_model, load_splits

    base = [f"run.data={caption_data}", f"run.out={tmp_path}", "model.encoder.trainable=none"]
    config = CaptionRunConfig.load("tiny", [*base, *overrides])
    splits = load_splits(config)
    return config, splits, build_model(config, splits, None, torch.device("cpu"))


def test_the_phases_after_training_encode_each_held_out_image_once_from_its_file(
    caption_data: Path, tmp_path: Path
) -> None:
    """Test, domain and calibration read one set of grids per split, made from the image files by the
    runtime that cached the training features (the test images were encoded twice, eagerly)."""
    from training.caption.data import image_loader
    from training.caption.run import encode_held_out

    config, splits, model = frozen_tiny(
        caption_data, tmp_path, "train.feature_runtime=onnxruntime", "train.test_max_images=2"
    )
    assert splits.test is not None and splits.val is not None and len(splits.test) > 2
    held_out = encode_held_out(config, model, splits, torch.device("cpu"))
    assert set(held_out) == {"test", "val"} and held_out["val"].shape[0] == len(splits.val)
    pixels = next(iter(image_loader(splits.test.paths[:2], model.preprocess, 2, 0)))
    with torch.inference_mode():
        expected = model.encoder(pixels)
    assert held_out["test"].dtype == torch.float32
    torch.testing.assert_close(held_out["test"], expected, rtol=1e-4, atol=1e-4)


def test_mirrored_grids_encode_the_rows_asked_for_as_their_view_sees_them(
    caption_data: Path, tmp_path: Path
) -> None:
    """The views of unsure held-out images are encoded on demand by the same runtime, mirrored."""
    from training.caption.data import image_loader
    from training.caption.run import held_out_runner, mirrored_grids

    config, splits, model = frozen_tiny(caption_data, tmp_path, "train.feature_runtime=onnxruntime")
    assert splits.val is not None and len(splits.val) > 2
    with held_out_runner(config, model, torch.device("cpu")) as run:
        grids = mirrored_grids(config, model, splits, run)["val"](3, [2, 0])
    pixels = next(iter(image_loader(splits.val.paths, model.preprocess, len(splits.val), 0)))
    with torch.inference_mode():
        expected = model.encoder(pixels[[2, 0]].flip(-1, -2))  # view 3: both mirrors
        unmirrored = model.encoder(pixels[[2, 0]])
    torch.testing.assert_close(grids, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(grids, unmirrored, rtol=1e-3, atol=1e-3)


def test_the_test_and_calibration_caption_unsure_images_over_their_views(
    caption_data: Path, tmp_path: Path
) -> None:
    """Given mirrored grids, the evaluation asks for each further view of the unsure images (all of them,
    below 1.0) and combines them; grids that do not change with the view agree with the one view."""
    from training.caption.evaluate import evaluate_split
    from training.caption.run import encode_held_out

    overrides = ("train.feature_runtime=torch", "model.decoding.views=3", "model.decoding.views_below=1.0")
    config, splits, model = frozen_tiny(caption_data, tmp_path, *overrides)
    assert splits.val is not None
    grids = encode_held_out(config, model, splits, torch.device("cpu"))["val"]
    asked: list[tuple[int, list[int]]] = []

    def mirrored(view: int, rows: list[int]) -> torch.Tensor:
        asked.append((view, rows))
        return grids[rows]

    views = evaluate_split(model, splits.val, features=grids, mirrored=mirrored, metrics=["CIDEr-D"])
    one = evaluate_split(model, splits.val, features=grids, metrics=["CIDEr-D"])
    everyone = list(range(len(splits.val)))
    assert asked == [(1, everyone), (2, everyone)]
    assert views.predictions == one.predictions
    assert views.confidences == pytest.approx(one.confidences, rel=1e-5)
