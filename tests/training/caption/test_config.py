"""Run config: presets with run, model and train sections, key=value overrides, unknown keys refused with a
hint, every problem at once."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from snap2caption.cli import main
from snap2caption.config import ConfigError
from snap2caption.models.caption.config import CaptionConfig
from training.caption.config import CaptionRunConfig, TrainConfig
from training.config import CONFIGS_DIR

PRESETS = CONFIGS_DIR / "caption"


@pytest.mark.parametrize("preset", ["tiny", "starter", "paper"])
def test_presets_have_run_model_and_train_sections(preset: str) -> None:
    run = CaptionRunConfig.load(preset)
    assert run.model == CaptionConfig.from_yaml(PRESETS / f"{preset}.yaml")
    assert isinstance(run.train, TrainConfig)
    assert (run.run.data, run.run.name, run.run.preset) == ("data/processed", "captioner", preset)
    assert CaptionRunConfig.from_dict(run.to_dict()) == run


def test_starter_trains_inside_its_budget_on_cached_features() -> None:
    train = CaptionRunConfig.load("starter").train
    assert 0 < train.time_budget_min <= 10 and train.reserve_min < train.time_budget_min
    assert train.feature_cache and CaptionRunConfig.load("starter").model.encoder.trainable == "none"


def test_overrides_with_or_without_section() -> None:
    run = CaptionRunConfig.load(
        "tiny", ["lr=1e-3", "train.batch_size=4", "model.decoder.n_layer=1", "lora.r=2", "precision=bf16"]
    )
    assert run.train.lr == 0.001 and run.train.batch_size == 4 and run.train.precision == "bf16"
    assert run.model.decoder.n_layer == 1 and run.model.lora.r == 2
    assert run.with_overrides(["seed=7"]).train.seed == 7
    assert run.sha256() != run.with_overrides(["seed=7"]).sha256()
    # The hash names what trains the model: where the run reads and writes is left out.
    assert run.sha256() == run.with_overrides(["out=/elsewhere", "data=/other"]).sha256()


@pytest.mark.parametrize(
    ("override", "suggestion"),
    [
        ("epoch=3", "epochs"),
        ("train.batchsize=4", "train.batch_size"),
        ("grad_acum=2", "grad_accum"),
        ("model.decoder.nlayer=2", "model.decoder.n_layer"),
        ("time_budget=5", "time_budget_min"),
    ],
)
def test_unknown_keys_are_refused_with_the_nearest_one(override: str, suggestion: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"did you mean '{suggestion}'")):
        CaptionRunConfig.load("tiny", [override])


def test_unknown_key_in_the_yaml_train_section(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text((PRESETS / "tiny.yaml").read_text() + "  warmup: 3\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"did you mean 'train\.warmup_steps'"):
        CaptionRunConfig.load(path)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("precision=fp8", "precision must be one of"),
        ("batch_size=0", "batch_size must be >= 1"),
        ("lr=fast", "lr must be a number"),
        ("time_budget_min=0.5", "reserve_min must be below"),
        ("device=tpu", "device must be"),
        ("domain_false_rejection_rate=0", r"domain_false_rejection_rate must be in \(0, 0\.5\)"),
        ("domain_false_rejection_rate=0.5", r"domain_false_rejection_rate must be in \(0, 0\.5\)"),
    ],
)
def test_bad_train_values_are_refused(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        CaptionRunConfig.load("tiny", [override])


def test_unknown_preset_suggests_one() -> None:
    with pytest.raises(ConfigError, match="did you mean 'starter'"):
        CaptionRunConfig.load("startr")


def test_cli_refuses_an_unknown_key_with_a_suggestion(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main, ["train", "caption", "--config", "tiny", "--data", str(tmp_path), "weight_decy=0.1"]
    )
    assert result.exit_code == 2
    assert "did you mean 'weight_decay'" in result.output


def test_registering_needs_mlflow() -> None:
    with pytest.raises(ConfigError, match=r"run\.register needs run\.mlflow"):
        CaptionRunConfig.load("tiny", ["mlflow=false"])
    assert not CaptionRunConfig.load("tiny", ["mlflow=false", "register=false"]).run.mlflow


def test_cli_reports_every_problem_at_once(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["train", "caption", "--config", "tiny", "epoch=3", "--name", ""])
    assert result.exit_code == 2
    assert "did you mean 'epochs'" in result.output and "run.name may not be empty" in result.output
