"""Drift references (``snap2caption.monitoring.reference``): PSI and the histograms, then the reference's way:
the ETL writes it, training puts it in the artifact, loaders read it back."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from snap2caption.data.etl import CACHE_NAME, EtlConfig, manifests_version, run_etl
from snap2caption.data.synth import SynthConfig, write_synth
from snap2caption.errors import ArtifactIntegrityError
from snap2caption.imaging.decode import decode_file, probe_image
from snap2caption.manifest import verify_manifest
from snap2caption.models.caption.artifact import load_caption_model, read_drift_reference, save_caption_model
from snap2caption.models.caption.config import CaptionConfig
from snap2caption.models.caption.model import CaptionModel
from snap2caption.models.caption.tokenizer import CaptionTokenizer
from snap2caption.monitoring.reference import (
    REFERENCE_FILE,
    DriftReferenceError,
    FeatureReference,
    build_reference,
    categorical_reference,
    numeric_reference,
    psi,
    read_reference,
    write_reference,
)
from snap2caption.monitoring.stats import decoded_stats
from training.caption.evaluate import EvalResult
from training.caption.run import drift_reference
from training.provenance import dataset_version

REPO = Path(__file__).resolve().parents[3]
CONFIGS = REPO / "training" / "configs" / "caption"


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


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("synth")
    write_synth(folder, SynthConfig(images=40, seed=3, image_size=64), progress=False)
    return folder


def _etl(synth: Path, out: Path) -> EtlConfig:
    annotations = [synth / "annotations" / "captions.json", synth / "annotations" / "instances.json"]
    return EtlConfig(source="coco", images=synth / "images", annotations=annotations, out=out, workers=1)


def test_etl_writes_the_train_split_reference_with_the_shared_function(synth: Path, tmp_path: Path) -> None:
    cfg = _etl(synth, tmp_path / "out")
    report = run_etl(cfg, progress=False)
    manifests = cfg.out / "manifests"
    reference = read_reference(manifests)
    assert reference is not None
    assert reference.count == report.splits["train"] > 0 and reference.split == "train"
    # The dataset version is training's own formula for an ETL folder DVC does not track.
    assert reference.dataset_version == manifests_version(manifests) == dataset_version(cfg.out)
    # Recomputed here, image by image, from the source files: the same histograms.
    rows = pq.read_table(manifests / "train.parquet").to_pylist()
    stats = []
    for row in rows:
        path = cfg.images / row["source_file"]
        decoded = decode_file(path, max_side=cfg.max_side)
        stats.append(decoded_stats(decoded, probe_image(path.read_bytes())).to_dict())
    assert reference == build_reference(stats, dataset_version=reference.dataset_version)
    # Synthetic scenes are all 64 x 64 JPEGs: point masses, each alone in its bin.
    assert max(reference.features["width"].proportions) == 1.0
    assert reference.features["format"].proportions[0] == 1.0  # "jpeg" first
    assert len(set(reference.features["brightness"].proportions)) > 1


def test_a_rerun_keeps_the_reference_and_an_old_cache_decodes_again(synth: Path, tmp_path: Path) -> None:
    cfg = _etl(synth, tmp_path / "out")
    run_etl(cfg, progress=False)
    path = cfg.out / "manifests" / REFERENCE_FILE
    before = (path.read_bytes(), path.stat().st_mtime_ns)
    again = run_etl(cfg, progress=False)
    assert again.images_decoded == 0
    assert (path.read_bytes(), path.stat().st_mtime_ns) == before
    # A cache written before drift statistics existed: its verdicts lack "stats".
    cache_path = cfg.out / CACHE_NAME
    cache = json.loads(cache_path.read_text())
    for entry in cache["sources"].values():
        entry.get("image", {}).pop("stats", None)
    cache_path.write_text(json.dumps(cache))
    third = run_etl(cfg, progress=False)
    assert third.images_decoded == third.images_ok
    assert path.read_bytes() == before[0]


@pytest.fixture(scope="module")
def tiny() -> tuple[CaptionModel, CaptionTokenizer]:
    tokenizer = CaptionTokenizer.train(["a red circle", "two blue squares"], vocab_size=400, min_frequency=1)
    torch.manual_seed(0)
    return CaptionModel(CaptionConfig.from_yaml(CONFIGS / "tiny.yaml"), tokenizer).eval(), tokenizer


def test_caption_artifact_round_trip_keeps_the_reference(
    synth: Path, tmp_path: Path, tiny: tuple[CaptionModel, CaptionTokenizer]
) -> None:
    cfg = _etl(synth, tmp_path / "data")
    run_etl(cfg, progress=False)
    reference = read_reference(cfg.out / "manifests")
    assert reference is not None
    folder = save_caption_model(*tiny, tmp_path / "model", drift_reference=reference)
    verify_manifest(folder)  # the reference is in the manifest
    assert REFERENCE_FILE in json.loads((folder / "MANIFEST.json").read_text())["files"]
    assert read_drift_reference(folder) == reference
    load_caption_model(folder)
    (folder / REFERENCE_FILE).write_text((folder / REFERENCE_FILE).read_text().replace("train", "trainX"))
    with pytest.raises(ArtifactIntegrityError):
        verify_manifest(folder)
    # Saved again without one (an older training code path): no stale reference, and it still loads.
    save_caption_model(*tiny, folder)
    assert read_drift_reference(folder) is None
    load_caption_model(folder)


def test_training_adds_the_model_confidence_and_its_dataset_version(synth: Path, tmp_path: Path) -> None:
    cfg = _etl(synth, tmp_path / "data")
    run_etl(cfg, progress=False)
    test = EvalResult("test", {}, "python", {}, confidences=[0.2, 0.4, 0.6, 0.8] * 10)
    reference = drift_reference(cfg.out, "dvc:1234", test)
    assert reference is not None and reference.dataset_version == "dvc:1234"
    confidence = reference.features["caption_confidence"]
    assert confidence.count == 40 and "test split" in reference.sources["caption_confidence"]
    assert set(reference.features) > {"width", "brightness", "colourfulness", "caption_confidence"}
    assert drift_reference(tmp_path / "no-such-data", "v", test) is None


# ------------------------------------------------------------------------------------ no serving stack


@pytest.mark.parametrize(
    "module",
    ["snap2caption.monitoring", "snap2caption.data.etl", "training.caption.run", "training.detector.train"],
)
def test_the_etl_and_training_import_no_metrics_and_no_web_framework(module: str) -> None:
    """The offline half of monitoring creates no Prometheus metrics, so the ETL and training import
    neither prometheus_client nor FastAPI: they run without the ``serve`` extra."""
    # A fresh interpreter: this one imported the services long ago.
    code = (
        f"import sys, {module}\n"
        "loaded = [m for m in ('prometheus_client', 'fastapi') if m in sys.modules]\n"
        "sys.exit(f'{loaded} imported' if loaded else 0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
