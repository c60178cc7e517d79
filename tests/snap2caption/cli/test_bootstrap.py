"""`snap2caption bootstrap`: valid commands, only what the registry lacks, starter floors, one-line errors."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from snap2caption.cli.bootstrap import (
    BootstrapSettings,
    _check_floor,
    bootstrap,
    build_starter_models,
    missing_models,
    starter_steps,
)
from snap2caption.launcher import LaunchError
from snap2caption.manifest import write_manifest
from snap2caption.registry import GATES, Registry
from training.caption.config import CaptionRunConfig
from training.detector.config import DetectorRunConfig


def _overrides(command: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(arg for arg in command if "=" in arg and not arg.startswith("-"))


def _option(command: tuple[str, ...], name: str) -> str:
    return command[command.index(name) + 1]


def test_every_starter_command_is_a_valid_config(tmp_path: Path) -> None:
    deadline = time.monotonic() + 8.5 * 60
    settings = BootstrapSettings(minutes=8.5)
    steps = {
        s.name: s for s in starter_steps(tmp_path / "out", tmp_path / "data", settings, deadline=deadline)
    }
    assert {s.model for s in steps.values() if s.registers} == {"tagger", "captioner", "detector"}
    # Lane 0: the tagger, then the detector; lane 1: the caption features, then the captioner.
    assert [n for n in steps if steps[n].lane == 0] == ["tagger", "detector"]
    assert [n for n in steps if steps[n].lane == 1] == ["captioner-features", "captioner"]
    assert not steps["captioner-features"].registers
    features, caption_cmd = steps["captioner-features"].argv(), steps["captioner"].argv()
    assert _option(features, "--out") == _option(caption_cmd, "--features")  # training reads that cache
    for_features = CaptionRunConfig.load("starter", _overrides(features))
    caption = CaptionRunConfig.load("starter", _overrides(caption_cmd))
    # The cache is keyed by the encoder and how features are made: both commands must agree on them.
    assert for_features.model.encoder == caption.model.encoder
    assert (for_features.train.feature_dtype, for_features.train.feature_runtime) == (
        caption.train.feature_dtype,
        caption.train.feature_runtime,
    )
    detector = DetectorRunConfig.load("starter", _overrides(steps["detector"].argv()))
    # Started now, each training gets the time to the deadline, less what it does after training.
    assert caption.train.time_budget_min == pytest.approx(8.5, abs=0.02)
    assert caption.train.reserve_min == pytest.approx(0.75)
    assert detector.train.time_budget_min == pytest.approx(8.5 - 0.4, abs=0.02)
    assert for_features.train.threads == caption.train.threads == detector.train.threads == 1
    assert detector.run.data == str(tmp_path / "data")


def test_a_training_started_later_gets_the_time_left(tmp_path: Path) -> None:
    deadline = time.monotonic() + 4 * 60  # what is left after 5 of a 9-minute budget
    steps = {
        s.name: s
        for s in starter_steps(tmp_path / "out", tmp_path / "data", BootstrapSettings(), deadline=deadline)
    }
    caption = CaptionRunConfig.load("starter", _overrides(steps["captioner"].argv()))
    assert caption.train.time_budget_min == pytest.approx(4.0, abs=0.02)
    assert caption.train.reserve_min == pytest.approx(0.75)
    late = time.monotonic() - 60  # the deadline has passed: each training still gets its minimum
    steps = {
        s.name: s
        for s in starter_steps(tmp_path / "out", tmp_path / "data", BootstrapSettings(), deadline=late)
    }
    caption = CaptionRunConfig.load("starter", _overrides(steps["captioner"].argv()))
    detector = DetectorRunConfig.load("starter", _overrides(steps["detector"].argv()))
    assert caption.train.time_budget_min == detector.train.time_budget_min == 1.0
    assert caption.train.reserve_min == pytest.approx(0.33)  # a third of a short budget


def test_a_fixed_number_of_caption_steps_replaces_its_time_budget(tmp_path: Path) -> None:
    settings = BootstrapSettings(minutes=2.5, captioner_steps=30)
    steps = {s.name: s for s in starter_steps(tmp_path / "out", tmp_path / "data", settings)}
    caption = CaptionRunConfig.load("starter", _overrides(steps["captioner"].argv()))
    assert (caption.train.max_steps, caption.train.time_budget_min) == (30, 0)
    detector = DetectorRunConfig.load("starter", _overrides(steps["detector"].argv()))
    assert detector.train.time_budget_min == pytest.approx(
        2.5 - 0.4, abs=0.02
    )  # the detector keeps the budget


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


def test_every_gated_model_has_a_starter_floor(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SNAP2CAPTION_BOOTSTRAP_MIN_CAPTIONER_CIDER_D", "0.1")
    settings = BootstrapSettings()
    assert settings.floor("captioner", GATES["captioner"].metric) == (
        0.1,
        "SNAP2CAPTION_BOOTSTRAP_MIN_CAPTIONER_CIDER_D",
    )
    for step in starter_steps(Path("out"), Path("data"), settings):
        floor, variable = settings.floor(step.model, GATES[step.model].metric)
        assert floor > 0 and variable.startswith("SNAP2CAPTION_BOOTSTRAP_MIN_")


def test_a_starter_below_its_floor_is_not_promoted(tmp_path: Path, mlflow_template_db: Path) -> None:
    """On an empty registry the gate passes anything: the floor is what keeps an untrained model out."""
    db = tmp_path / "mlflow.db"
    shutil.copyfile(mlflow_template_db, db)
    registry = Registry(f"sqlite:///{db}")
    folder = tmp_path / "captioner"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    write_manifest(folder)
    registry.register("captioner", folder, metrics={"test_cider_d": 0.0003})  # what 0 training steps score
    settings = BootstrapSettings(minutes=1.0)
    log = tmp_path / "bootstrap-captioner.log"
    with pytest.raises(LaunchError) as info:
        _check_floor(registry, "captioner", settings, log)
    assert info.value.format_message() == (
        "models: captioner v1: test_cider_d 0.0003 is below the starter floor 0.5 "
        "(SNAP2CAPTION_BOOTSTRAP_MIN_CAPTIONER_CIDER_D); raise SNAP2CAPTION_BOOTSTRAP_MINUTES (now 1.0) "
        f"to train a better one; log: {log}"
    )
    registry.register("captioner", folder, metrics={"test_cider_d": 0.6})
    _check_floor(registry, "captioner", settings, log)  # v2 clears it


def test_a_build_that_fails_is_one_line_naming_its_log(tmp_path: Path, mlflow_template_db: Path) -> None:
    data = tmp_path / "data"
    (data / "manifests").mkdir(parents=True)  # an ETL output with no split in it
    db = tmp_path / "mlflow.db"
    shutil.copyfile(mlflow_template_db, db)
    with pytest.raises(LaunchError) as info:
        build_starter_models(
            data, tmp_path / "out", tmp_path / "log", BootstrapSettings(), tracking_uri=f"sqlite:///{db}",
            only=["captioner"],
        )  # fmt: skip
    message = info.value.format_message()
    log = tmp_path / "log" / "bootstrap-captioner-features.log"  # its first step, beside the tagger's
    assert message.startswith("models: captioner-features failed (exit 1): FileNotFoundError: no manifest ")
    assert "\n" not in message
    assert message.endswith(f"; log: {log}")
    assert "Traceback" in log.read_text()  # the whole story is in the log


def test_a_bad_budget_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SNAP2CAPTION_BOOTSTRAP_MINUTES", "0.5")
    (tmp_path / "manifests").mkdir()
    result = CliRunner().invoke(bootstrap, ["--data", str(tmp_path)])
    assert result.exit_code == 1
    assert result.output == (
        "Error: settings: SNAP2CAPTION_BOOTSTRAP_MINUTES: Input should be greater than or equal to 1\n"
    )
