"""End to end with real tiny models: train -> MLflow run -> register -> promote -> eval from the registry ->
a worse model refused by the gate -> forced override recorded -> rollback -> reload reproduces captions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from snap2caption.cli import main
from snap2caption.manifest import verify_manifest
from snap2caption.models.caption.artifact import load_caption_model
from snap2caption.models.caption.calibration import read_calibration
from snap2caption.registry import PRODUCTION, Registry
from tests.training.caption.conftest import tiny_run
from training.caption.data import SplitData
from training.caption.evaluate import evaluate_split
from training.caption.run import train_caption

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")


def test_train_register_promote_refuse_override_rollback(
    caption_data: Path, registry: Registry, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    tracked = ("run.tracking_uri", registry.tracking_uri)
    good = train_caption(tiny_run(caption_data, tmp_path / "good", "max_steps=200", "eval_every=50", tracked))
    v1 = good.registered
    assert v1 is not None and v1.aliases == ("candidate",)
    assert good.test is not None and v1.metrics["test_cider_d"] == good.test.metrics["cider_d"] > 0.1
    assert {"test_bleu_4", "test_pair_precision", "test_pair_recall", "val_cider_d"} <= set(v1.metrics)
    assert v1.tags["dataset_version"].startswith("manifests:") and v1.tags["git_commit"]

    # The MLflow run: params, resolved config, per-step and validation metrics, samples, model card, tags.
    client = MlflowClient(registry.tracking_uri)
    run = client.get_run(good.run_id)
    assert run.data.params["train.max_steps"] == "200" and run.data.params["model.decoder.n_layer"] == "2"
    assert {
        "train_loss", "train_lr", "train_images_per_s", "val_cider_d", "test_cider_d",
        "calibration_ece_before", "calibration_ece_after",
    } <= set(run.data.metrics)  # fmt: skip
    assert len(client.get_metric_history(good.run_id, "train_loss")) == 200
    assert run.data.tags["git_commit"] == v1.tags["git_commit"] and run.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(good.run_id)}
    assert {"config.yaml", "samples", "model_card"} <= artifacts

    # The artifact: no pickle, every file in the manifest, a model card that says what the data was.
    files = sorted(p.name for p in good.artifact_dir.iterdir())
    assert files == [
        "MANIFEST.json", "README.md", "calibration.json", "config.json", "model.safetensors", "onnx",
        "reference_stats.json", "tokenizer.json",
    ]  # fmt: skip
    assert sorted(p.name for p in (good.artifact_dir / "onnx").iterdir()) == [
        "decoder.int8.onnx", "decoder.onnx", "encoder.onnx",
    ]  # fmt: skip
    verify_manifest(good.artifact_dir)
    # The confidence calibration: fitted on the validation split, its ECE measured on the test split.
    calibration = read_calibration(good.artifact_dir)
    assert calibration is not None and calibration.fit_split == "val" and calibration.eval_split == "test"
    assert calibration.n_fit == len(SplitData.load(caption_data, "val")) and calibration.n_eval == len(
        good.test.predictions
    )
    assert calibration.ece_before is not None and calibration.ece_after is not None
    assert good.summary["calibration"]["ece_after"] == calibration.ece_after
    assert run.data.metrics["calibration_ece_after"] == pytest.approx(calibration.ece_after)
    assert "pair" in calibration.right
    card = (good.artifact_dir / "README.md").read_text()
    assert "Trained on the synthetic shapes benchmark" in card
    assert "## Intended use" in card and "## Limits" in card and "test_cider_d" not in card
    assert f"| cider_d | {good.test.metrics['cider_d']:.4f} |" in card

    assert registry.promote("captioner").status == "promoted"

    # `eval caption` on the production alias downloads, verifies and reproduces the registered metrics.
    out = tmp_path / "eval"
    args = ["eval", "caption", "--model", "models:/captioner@production", "--data", str(caption_data)]
    result = CliRunner().invoke(main, [*args, "--out", str(out), "--scorer", "python"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "metrics.json").read_text())
    assert report["model"]["version"] == v1.version
    assert report["metrics"]["cider_d"] == pytest.approx(v1.metrics["test_cider_d"], abs=1e-9)

    # A model reloaded from the registry artifact alone reproduces the captions training measured.
    folder, info = registry.download("captioner", PRODUCTION, tmp_path / "download")
    assert info.version == v1.version
    model, _ = load_caption_model(folder)
    again = evaluate_split(model, SplitData.load(caption_data, "test"), scorer="python")
    assert again.predictions == good.test.predictions

    # A worse model (two steps) becomes the candidate; the gate refuses it.
    bad = train_caption(tiny_run(caption_data, tmp_path / "bad", "max_steps=2", tracked))
    assert bad.registered is not None and bad.registered.version == v1.version + 1
    refused = registry.promote("captioner")
    assert refused.status == "refused" and "fails" in refused.message
    assert registry.resolve("captioner", PRODUCTION).version == v1.version

    # Forcing it needs a reason, which is recorded.
    forced = CliRunner().invoke(
        main, ["registry", "promote", "captioner", "--force", "--reason", "demo of an override"]
    )
    assert forced.exit_code == 0, forced.output
    assert registry.resolve("captioner", PRODUCTION).version == bad.registered.version
    (override,) = registry.override_history("captioner")
    assert override["reason"] == "demo of an override" and override["version"] == str(bad.registered.version)

    # Rollback restores the good model.
    assert registry.rollback("captioner").version == v1.version
    assert registry.resolve("captioner", PRODUCTION).version == v1.version
