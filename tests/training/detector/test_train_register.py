"""Tiny detector: train -> MLflow run -> register -> promote -> load from the registry -> detect; the gate."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import onnx
import pytest
import yaml
from mlflow import MlflowClient
from PIL import Image

from snap2caption.config import ConfigError
from snap2caption.manifest import PICKLE_SUFFIXES, verify_manifest, write_manifest
from snap2caption.models import detector as detector_model
from snap2caption.models.detector import Detection
from snap2caption.models.uri import resolve_model_dir
from snap2caption.registry import Registry
from training.detector.config import DetectorRunConfig


def test_artifact_is_complete_and_pickle_free(tiny_trained: Any, tiny_data: Path) -> None:
    folder: Path = tiny_trained.artifact_dir
    names = {p.name for p in folder.iterdir()}
    expected = {"model.safetensors", "model.yaml", "model.onnx", "config.json", "README.md", "eval.json"}
    expected.add("reference_stats.json")  # the ETL's drift reference of the training images
    expected |= {"domain.json", "domain.npz"}  # the training domain (tests/training/detector/test_domain.py)
    assert names == expected | {"MANIFEST.json"}
    verify_manifest(folder)
    assert not [p for p in folder.rglob("*") if p.suffix in PICKLE_SUFFIXES]
    # Nor anywhere in Ultralytics' run folder: the trainer keeps its checkpoints in memory.
    assert not [p for p in tiny_trained.work_dir.rglob("*") if p.suffix in PICKLE_SUFFIXES]

    config = json.loads((folder / "config.json").read_text())
    dataset = yaml.safe_load((tiny_data / "dataset.yaml").read_text())
    assert config["names"] == [dataset["names"][i] for i in sorted(dataset["names"])]
    assert (config["imgsz"], config["stride"], config["model"]) == (32, 32, "yolov8n.yaml")
    assert config["extra"]["metrics"]["test_map50_95"] == tiny_trained.evaluation["map50_95"]
    assert yaml.safe_load((folder / "model.yaml").read_text())["nc"] == len(config["names"])

    meta = {p.key: p.value for p in onnx.load(str(folder / "model.onnx")).metadata_props}
    assert json.loads(meta["names"]) == config["names"] and json.loads(meta["imgsz"]) == 32
    assert json.loads(meta["letterbox"])["pad_value"] == 114
    assert json.loads(meta["normalize"])["scale"] == pytest.approx(1 / 255)
    batch_dim = onnx.load(str(folder / "model.onnx")).graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param == "batch"  # dynamic batch
    card = " ".join((folder / "README.md").read_text().split())
    assert "pycocotools" in card and "AGPL-3.0" in card and "never presented as COCO quality" in card


def test_mlflow_run_has_params_epoch_metrics_and_plots(tiny_trained: Any) -> None:
    client = MlflowClient(tiny_trained.tracking_uri)
    run = client.get_run(tiny_trained.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model"] == "yolov8n.yaml" and run.data.params["imgsz"] == "32"
    assert run.data.params["yolo.amp"] == "False" and run.data.params["yolo.device"] == "cpu"
    history = client.get_metric_history(tiny_trained.run_id, "val/mAP50-95")
    assert [m.step for m in history] == [1, 2]  # per epoch
    assert "train/box_loss" in run.data.metrics and "test_map50_95" in run.data.metrics
    plots = {Path(a.path).name for a in client.list_artifacts(tiny_trained.run_id, "plots")}
    assert {
        "BoxPR_curve.png",
        "confusion_matrix.png",
        "confusion_matrix_normalized.png",
        "results.png",
    } <= plots


def test_registered_promoted_and_loaded_from_registry(tiny_trained: Any, tmp_path: Path) -> None:
    tracking_uri = tiny_trained.tracking_uri
    registry = Registry(tracking_uri)
    production = registry.resolve("detector", "production")
    assert production.version == 1 and "registered detector v1" in tiny_trained.output
    assert "promoted v1: no production version yet" in tiny_trained.output
    assert production.metrics["test_map50_95"] == pytest.approx(tiny_trained.evaluation["map50_95"])
    assert json.loads(production.tags["names"])[0] == "circle"

    folder = resolve_model_dir("models:/detector@production", tracking_uri=tracking_uri, cache_dir=tmp_path)
    detector = detector_model.load(folder, "onnx")
    image = Image.new("RGB", (80, 50), (200, 30, 30))
    results = detector.detect([image, image.convert("L")], conf=0.0, max_det=5)
    assert len(results) == 2 and all(isinstance(d, Detection) for d in results[0])
    assert 1 <= len(results[0]) <= 5
    for det in results[0]:
        x1, y1, x2, y2 = det.box_xyxy
        assert 0 <= x1 <= x2 <= 80 and 0 <= y1 <= y2 <= 50  # original pixels, clipped
        assert det.class_name == detector.names[det.class_id]


def test_promote_gate_refuses_a_worse_detector(tiny_trained: Any, tmp_path: Path) -> None:
    registry = Registry(tiny_trained.tracking_uri)
    worse = tmp_path / "worse"
    shutil.copytree(tiny_trained.artifact_dir, worse)
    write_manifest(worse)
    baseline = registry.resolve("detector", "production")
    metrics = {"test_map50_95": baseline.metrics["test_map50_95"] - 0.05, "test_map50": 0.0}
    candidate = registry.register("detector", worse, metrics=metrics)

    result = registry.promote("detector")
    assert result.status == "refused" and "test_map50_95" in result.message
    assert registry.resolve("detector", "production").version == baseline.version
    assert registry.resolve("detector", "candidate").version == candidate.version


def test_config_refuses_unknown_keys_and_bad_values() -> None:
    with pytest.raises(ConfigError, match="did you mean 'epochs'"):
        DetectorRunConfig.load("tiny", ["epoch=3"])
    with pytest.raises(ConfigError, match="multiple of 32"):
        DetectorRunConfig.load("tiny", ["imgsz=40"])
    with pytest.raises(ConfigError, match="presets: starter, tiny"):
        DetectorRunConfig.load("huge")
    starter = DetectorRunConfig.load("starter").train
    assert starter.model == "yolov8n.yaml" and starter.imgsz == 160
