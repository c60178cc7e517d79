"""Both trainers alike: the same run section, loaded by the one loader, set by the same CLI options."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from snap2caption.cli import main
from snap2caption.config import ConfigError
from training.caption.config import CaptionRunConfig
from training.config import RunConfig
from training.detector.config import DetectorRunConfig

TRAINERS = [(CaptionRunConfig, "caption", "captioner"), (DetectorRunConfig, "detector", "detector")]


@pytest.mark.parametrize(("config_class", "command", "name"), TRAINERS)
def test_every_trainer_has_the_same_run_section(config_class: type, command: str, name: str) -> None:
    config = config_class.load("tiny")
    assert isinstance(config.run, RunConfig)
    assert (config.run.data, config.run.name, config.run.preset) == ("data/processed", name, "tiny")
    assert config.run.experiment_name == name  # MLflow experiments are named after the model
    # Run keys with or without their section, like any other key.
    config = config_class.load("tiny", ["data=/elsewhere", "run.name=mine", "register=false"])
    assert (config.run.data, config.run.name, config.run.register) == ("/elsewhere", "mine", False)
    assert config.run.experiment_name == "mine"
    assert config_class.load("tiny", ["experiment=trials"]).run.experiment_name == "trials"


@pytest.mark.parametrize(("config_class", "command", "name"), TRAINERS)
def test_every_trainer_takes_the_run_options(config_class: type, command: str, name: str) -> None:
    """Each run option sets its run key (an empty one is refused by the run section's own validation)."""
    result = CliRunner().invoke(
        main, ["train", command, "--config", "tiny", "--data", "", "--name", "", "epoch=1"]
    )
    assert result.exit_code == 2, result.output
    for problem in ("run.data may not be empty", "run.name may not be empty", "did you mean 'epochs'"):
        assert problem in result.output


@pytest.mark.parametrize(
    ("config_class", "overrides", "problems"),
    [
        (
            CaptionRunConfig,
            ["epoch=3", "lr=fast", "decoder.n_layer=two", "run.name="],
            [
                "unknown config key 'epoch' (did you mean 'epochs'?)",
                "run.name may not be empty",
                "model.decoder.n_layer must be an integer, got 'two'",
                "train.lr must be a number, got 'fast'",
            ],
        ),
        (
            DetectorRunConfig,
            ["epoch=3", "imgsz=40", "batch=0", "name="],
            [
                "unknown config key 'epoch' (did you mean 'epochs'?)",
                "run.name may not be empty",
                "train.imgsz must be a positive multiple of 32, got 40",
                "train.batch must be >= 1, got 0",
            ],
        ),
    ],
)
def test_every_problem_is_reported_at_once(
    config_class: type, overrides: list[str], problems: list[str]
) -> None:
    """Unknown keys, wrong types and each section's own validation, in one error."""
    with pytest.raises(ConfigError) as info:
        config_class.load("tiny", overrides)
    assert info.value.problems == problems
