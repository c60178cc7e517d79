"""`snap2caption bootstrap`: the commands it runs are valid, and it builds only what the registry lacks."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from snap2caption.cli.bootstrap import bootstrap, missing_models, starter_models
from snap2caption.cli.train import _caption_config
from snap2caption.models.artifact import write_manifest
from snap2caption.registry import Registry
from training.detection.config import load_config


def _overrides(command: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(arg for arg in command if "=" in arg and not arg.startswith("-"))


def test_every_starter_command_is_a_valid_config(tmp_path: Path) -> None:
    models = {m.name: m for m in starter_models(tmp_path / "out", tmp_path / "data", minutes=8.5)}
    assert set(models) == {"tagger", "captioner", "detector"}
    assert models["tagger"].stage < models["captioner"].stage == models["detector"].stage  # side by side
    caption = _caption_config("starter", _overrides(models["captioner"].command))
    detector = load_config("starter", _overrides(models["detector"].command))
    # The budget goes to the two trainings, one thread each, on top of the tagger's share.
    assert caption.train.time_budget_min == detector.time_budget_min == pytest.approx(7.0)
    assert caption.train.threads == detector.threads == 1
    assert detector.data == str(tmp_path / "data")


def test_missing_models_reads_the_registry(tmp_path: Path, mlflow_template_db: Path) -> None:
    db = tmp_path / "mlflow.db"
    shutil.copyfile(mlflow_template_db, db)
    uri = f"sqlite:///{db}"
    assert missing_models(["captioner", "detector", "tagger"], uri) == ["captioner", "detector", "tagger"]
    folder = tmp_path / "tagger"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    write_manifest(folder)
    registry = Registry(uri)
    registry.register("tagger", folder, metrics={"test_top1": 1.0})
    assert missing_models(["tagger"], uri) == ["tagger"]  # a candidate is not production
    assert registry.promote("tagger").promoted
    assert missing_models(["captioner", "detector", "tagger"], uri) == ["captioner", "detector"]


def test_bootstrap_refuses_a_folder_that_is_not_an_etl_output(tmp_path: Path) -> None:
    result = CliRunner().invoke(bootstrap, ["--data", str(tmp_path)])
    assert result.exit_code != 0 and "is not an ETL output" in result.output
