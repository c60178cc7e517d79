"""The drift reference's way: the ETL writes it, training puts it in the artifact, loaders read it back."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from snap2caption.data.etl import CACHE_NAME, EtlConfig, manifests_version, run_etl
from snap2caption.data.synth import SynthConfig, write_synth
from snap2caption.imaging.decode import decode_file, probe_image
from snap2caption.models.artifact import (
    ArtifactError,
    load_caption_model,
    read_drift_reference,
    save_caption_model,
    verify_artifact,
)
from snap2caption.models.caption import CaptionConfig, CaptionModel
from snap2caption.models.tokenizer import CaptionTokenizer
from snap2caption.monitoring.drift import REFERENCE_FILE, build_reference, read_reference
from snap2caption.monitoring.stats import decoded_stats
from training.caption.evaluate import EvalResult
from training.caption.run import drift_reference
from training.provenance import dataset_version

CONFIGS = Path(__file__).resolve().parents[3] / "training" / "configs" / "caption"


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
    verify_artifact(folder)  # the reference is in the manifest
    assert REFERENCE_FILE in json.loads((folder / "MANIFEST.json").read_text())["files"]
    assert read_drift_reference(folder) == reference
    load_caption_model(folder)
    (folder / REFERENCE_FILE).write_text((folder / REFERENCE_FILE).read_text().replace("train", "trainX"))
    with pytest.raises(ArtifactError):
        verify_artifact(folder)
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
