"""Search spaces: plain data to Ray Tune domains, keys checked against the trainer's config before Ray
starts; the command's usage errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from snap2caption.cli import main
from snap2caption.config import ConfigError
from training.caption.config import CaptionRunConfig
from training.detector.config import DetectorRunConfig
from training.tune.space import caption_space, check_space, detector_space, to_tune


def test_the_default_spaces_name_config_keys_and_fit_the_base_model() -> None:
    for preset in ("tiny", "starter", "paper"):
        config = CaptionRunConfig.load(preset)
        space = caption_space(config)
        check_space(space, CaptionRunConfig)
        longest = config.model.tokenizer.max_caption_tokens + 2
        assert all(
            p + longest <= config.model.decoder.n_positions for p in space["model.prefix_len"]["choice"]
        )
        # LoRA only on a pretrained decoder; the decoder's size only on one trained from scratch.
        assert ("model.lora.r" in space) == config.model.lora.enabled
        assert ("model.decoder.n_layer" in space) == (config.model.decoder.pretrained is None)
        # Every value the search tries for a model setting makes a valid model on its own: the starter's
        # mlp-only settings (cell coordinates, column order) kept the transformer mapping out of its search.
        for key, spec in space.items():
            if key.startswith("model.") and "choice" in spec:
                for value in spec["choice"]:
                    config.model.with_overrides([f"{key}={value}"])
        assert ("model.mapping.type" in space) == (preset != "starter")
    check_space(detector_space(DetectorRunConfig.load("starter")), DetectorRunConfig)


def test_to_tune_builds_domains_and_lists_every_problem() -> None:
    from ray.tune.search.sample import Categorical, Float

    domains = to_tune({"train.lr": {"loguniform": [1e-4, 1e-2]}, "train.seed": 3, "x": {"grid": [1, 2]}})
    assert isinstance(domains["train.lr"], Float) and domains["train.seed"] == 3
    assert domains["x"] == {"grid_search": [1, 2]}
    assert isinstance(to_tune({"a": {"choice": [1, 2]}})["a"], Categorical)
    with pytest.raises(ConfigError) as err:
        to_tune({"a": {"normal": [0, 1]}, "b": {"uniform": [1]}})
    assert "a: expected one of" in str(err.value) and "b: uniform takes a list" in str(err.value)


def test_a_misspelt_key_fails_with_the_nearest_one() -> None:
    with pytest.raises(ConfigError, match=r"train\.lr"):
        check_space({"train.lrr": {"choice": [1e-3]}}, CaptionRunConfig)


def test_the_command_refuses_bad_input_before_ray_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SNAP2CAPTION_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    runner = CliRunner()
    resume = runner.invoke(main, ["tune", "caption", "--config", "tiny", "--resume"])
    assert resume.exit_code == 2 and "--resume needs --out" in resume.output
    typo = runner.invoke(main, ["tune", "detector", "--config", "tiny", "epochz=3"])
    assert typo.exit_code == 2 and "epochs" in typo.output
    space = tmp_path / "space.yaml"
    space.write_text("train.lrr: {choice: [0.001]}\n")
    bad = runner.invoke(
        main, ["tune", "caption", "--config", "tiny", "--space", str(space), "--out", str(tmp_path)]
    )
    assert bad.exit_code == 2 and "train.lr" in bad.output
    nothing = runner.invoke(
        main, ["tune", "caption", "--config", "tiny", "--out", str(tmp_path / "no"), "--resume"]
    )
    assert nothing.exit_code == 2 and "nothing to resume" in nothing.output
