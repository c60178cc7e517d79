"""Evaluation: (colour, shape) pair scoring, a split's metrics and samples, the `eval caption` command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from snap2caption.cli import main
from snap2caption.metrics import pycocoevalcap_usable
from snap2caption.models.caption.artifact import save_caption_model
from snap2caption.models.caption.model import build_caption_model
from tests.training.caption.conftest import tiny
from training.caption.data import SplitData
from training.caption.evaluate import evaluate_split, named_pairs, named_shapes, pair_scores, pairs_right

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")


def test_named_pairs_reads_colour_shape_phrases() -> None:
    caption = "two small red circles, a blue star above the green square and a large orange cross"
    assert named_pairs(caption) == {
        ("red", "circle"),
        ("blue", "star"),
        ("green", "square"),
        ("orange", "cross"),
    }
    assert named_pairs("a picture of a circle on a plain background") == set()
    assert named_shapes("two circles and a cross") == {"circle", "cross"}


def test_pair_scores_count_right_and_wrong_objects() -> None:
    references = {
        "1": ["a red circle and a blue square", "there is a red circle and a blue square"],
        "2": ["a green star", "a single star"],
    }
    predictions = {"1": "a red circle and a green square", "2": "a green star"}
    scores = pair_scores(references, predictions)
    # Predicted pairs: (red, circle) right, (green, square) wrong, (green, star) right; 3 expected.
    assert scores["pair_precision"] == pytest.approx(2 / 3)
    assert scores["pair_recall"] == pytest.approx(2 / 3)
    assert scores["pair_exact"] == pytest.approx(1 / 2)
    assert scores["shape_precision"] == 1.0 and scores["shape_recall"] == 1.0
    # One image at a time, as the confidence calibration marks captions right or wrong: pair_exact.
    right = [pairs_right(references[i], predictions[i]) for i in ("1", "2")]
    assert right == [False, True] and sum(right) / 2 == scores["pair_exact"]
    assert pairs_right(references["1"], "two shapes: a blue square below a red circle")


@pytest.fixture(scope="module")
def random_artifact(caption_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained tiny model saved as an artifact: nonsense captions, but real plumbing."""
    train = SplitData.load(caption_data, "train")
    torch.manual_seed(0)
    model, tok = build_caption_model(tiny().model, [c for caps in train.captions for c in caps])
    return save_caption_model(model.eval(), tok, tmp_path_factory.mktemp("artifact") / "model")


def test_evaluate_split_reports_metrics_and_samples(caption_data: Path, random_artifact: Path) -> None:
    from snap2caption.models.caption.artifact import load_caption_model

    model, _ = load_caption_model(random_artifact)
    test = SplitData.load(caption_data, "test")
    result = evaluate_split(model, test, scorer="python", num_samples=3, batch_size=4)
    assert set(result.predictions) == set(test.image_ids)
    assert {"bleu_4", "rouge_l", "cider_d", "pair_precision", "pair_recall"} <= set(result.metrics)
    assert "meteor" not in result.metrics  # the python scorer has no METEOR
    assert len(result.samples) == 3
    sample = result.samples[0]
    assert (
        sample["references"] == test.captions[0]
        and sample["prediction"] == result.predictions[test.image_ids[0]]
    )
    assert result.prefixed("test")["test_cider_d"] == result.metrics["cider_d"]


@pytest.mark.skipif(not pycocoevalcap_usable(), reason="needs pycocoevalcap and java")
def test_eval_command_writes_metrics_with_meteor(
    caption_data: Path, random_artifact: Path, tmp_path: Path
) -> None:
    # The one test that starts the JVMs (PTB tokenizer, METEOR 1.5): the reference scorers end to end.
    out = tmp_path / "eval"
    args = [
        "eval",
        "caption",
        "--model",
        str(random_artifact),
        "--data",
        str(caption_data),
        "--out",
        str(out),
    ]
    result = CliRunner().invoke(
        main, [*args, "--split", "val", "--samples", "2", "--scorer", "pycocoevalcap"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "metrics.json").read_text())
    assert report["scorer"] == "pycocoevalcap" and report["dataset"]["split"] == "val"
    assert {"bleu_1", "bleu_4", "meteor", "rouge_l", "cider_d", "pair_recall"} <= set(report["metrics"])
    assert report["model"]["uri"] == str(random_artifact.resolve())
    assert report["dataset"]["version"].startswith("manifests:")
    assert len(json.loads((out / "samples.json").read_text())) == 2


def test_eval_command_reports_a_missing_model(caption_data: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main, ["eval", "caption", "--model", str(tmp_path / "nope"), "--data", str(caption_data)]
    )
    assert result.exit_code == 1 and "is neither models:/NAME@ALIAS" in result.output
