"""Real Ray Tune searches over the real trainers (tiny presets, synthetic data, a local Ray): trials as MLflow
child runs, ASHA stopping a weak caption trial on validation CIDEr-D, a failing trial reported, the best
config written and loadable by the trainer; the detector reporting mAP50-95 per epoch.

ASHA stops a trial at a rung when its score is below the top ``1 / reduction_factor`` of the scores recorded
at that rung before it; a trial alone at a rung is never stopped. So the stop below is made independent of
timing: trials run one at a time (``max_concurrent=1``), the first is the base config (the baseline, which
learns), and the weak trial's learning rate (1e-7) cannot move its weights, so its CIDEr-D stays below the
baseline's at the first rung, whatever the machine. The assertions read ASHA's recorded decisions.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from snap2caption.registry import Registry
from tests.training.caption.conftest import tiny_run
from training.caption.config import CaptionRunConfig
from training.detector.config import DetectorRunConfig
from training.tune.driver import read_decisions
from training.tune.report import PARENT_TAG, TRIAL_TAG
from training.tune.search import (
    BEST_FILE,
    SCHEDULER_FILE,
    TRIALS_FILE,
    SearchSettings,
    TrialSummary,
    rank,
    search,
    train_best,
)

pytestmark = pytest.mark.slow

# Cached features of the frozen tiny encoder; 60 steps, a validation every 30: two reports per trial, ASHA's
# rungs at the first and second validation. One caption per image learns fastest: at this learning rate the
# baseline scores val CIDEr-D 0.033 at step 30 and 0.075 at step 60 (seeded, one thread; measured), where a
# learning rate of 1e-7 leaves the weights as they were and scores 0.
STEPS = (
    "model.encoder.trainable=none",
    "train.max_steps=60",
    "train.eval_every=30",
    "train.captions_per_image=1",
    "train.threads=1",
    "train.lr=1e-2",
)
# The baseline (lr 1e-2, batch 8) first; then a learning rate that cannot learn crossed with a batch the ~58
# training images cannot fill (that trial fails in the trainer: "cannot fill one batch").
SPACE = {"train.lr": {"choice": [1.0e-7]}, "train.batch_size": {"grid": [8, 4096]}}


def test_caption_search_tracks_trials_stops_the_weak_one_reports_failures_and_writes_the_best(
    caption_data: Path, registry: Registry, tmp_path: Path, ray_tmp: Path
) -> None:
    config = tiny_run(caption_data, tmp_path / "unused", *STEPS)
    settings = SearchSettings(samples=2, scheduler="asha", max_concurrent=1, grace_evals=1)

    result = search("caption", config, tmp_path / "search", settings, space=SPACE)

    by_params = {(t.params["train.lr"], t.params["train.batch_size"]): t for t in result.trials}
    assert {k: t.status for k, t in by_params.items()} == {
        (1.0e-2, 8): "finished",
        (1.0e-7, 8): "stopped",
        (1.0e-7, 4096): "failed",
    }
    good, weak, failed = by_params[(1.0e-2, 8)], by_params[(1.0e-7, 8)], by_params[(1.0e-7, 4096)]
    assert result.baseline is good and result.best is good
    assert good.evals == 2 and good.score is not None and good.score > 0
    assert "cannot fill one batch" in (failed.error or "") and failed.score is None

    # ASHA's rule, on its recorded decisions: the baseline reached the first rung first and went on; the weak
    # trial scored below it there and was stopped, before its second validation.
    decisions = read_decisions(tmp_path / "search" / SCHEDULER_FILE)
    first = [d for d in decisions if d["iteration"] == 1]
    assert [d["trial_id"] for d in first] == [good.trial_id, weak.trial_id]
    assert first[0]["decision"] == "CONTINUE" and first[0]["score"] > 0
    assert first[1]["decision"] == "STOP" and first[1]["early"]
    assert first[1]["score"] < first[0]["score"]
    assert not [d for d in decisions if d["trial_id"] == weak.trial_id and d["iteration"] > 1]

    # The best config: the base with the best trial's parameters, loadable by the trainer as it is.
    search_dir = tmp_path / "search"
    best = CaptionRunConfig.load(search_dir / BEST_FILE)
    assert best.train.lr == 1.0e-2 and best.train.batch_size == 8 and best.run.register
    assert best.model == config.model and Path(best.run.out) == search_dir / "best"
    trials = json.loads((search_dir / TRIALS_FILE).read_text())
    assert sorted(t["status"] for t in trials) == ["failed", "finished", "stopped"]

    # MLflow: the search run and one child per trial that trained, with params, metrics and provenance.
    client = MlflowClient(registry.tracking_uri)
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["best_val_cider_d"] == pytest.approx(good.score)
    assert parent.data.metrics["baseline_val_cider_d"] == pytest.approx(good.score)
    assert parent.data.metrics["trials_failed"] == 1 and parent.data.metrics["trials_stopped"] == 1
    assert parent.data.tags["git_commit"] and parent.data.tags["dataset_version"]
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.{PARENT_TAG} = '{result.parent_run_id}'"
    )
    status = {run.data.tags[TRIAL_TAG]: run.info.status for run in children}
    assert status == {good.trial_id: "FINISHED", weak.trial_id: "KILLED"}
    stopped = next(run for run in children if run.data.tags[TRIAL_TAG] == weak.trial_id)
    assert stopped.data.tags["tune.stopped_early"] == "true"
    child = next(run for run in children if run.data.tags[TRIAL_TAG] == good.trial_id)
    assert child.data.params["train.lr"] == "0.01"
    assert child.data.metrics["val_cider_d"] == pytest.approx(good.score)
    assert child.data.tags["git_commit"] == parent.data.tags["git_commit"]
    assert child.data.tags["dataset_version"] == parent.data.tags["dataset_version"]

    # --register: the best config trained again by the usual trainer, registered as candidate, a child run.
    trained = train_best("caption", result)
    assert trained.registered is not None and trained.out_dir == search_dir / "best"
    version = registry.resolve("captioner", "candidate")
    assert version.version == trained.registered.version == 1
    best_run = client.get_run(trained.run_id)
    assert (
        best_run.data.tags[PARENT_TAG] == result.parent_run_id
        and best_run.data.tags["mlflow.runName"] == "best"
    )
    assert best_run.data.params["train.lr"] == "0.01"


def test_detector_search_reports_map_per_epoch_and_survives_a_failing_trial(
    tiny_data: Path, registry: Registry, tmp_path: Path, ray_tmp: Path
) -> None:
    config = DetectorRunConfig.load(
        "tiny", [("run.data", str(tiny_data)), ("train.epochs", 2), ("train.time_budget_min", 0)]
    )
    # The baseline, then a model YAML that does not exist: that trial fails, the search goes on.
    space = {"train.model": {"choice": ["missing-model.yaml"]}}
    settings = SearchSettings(samples=2, scheduler="asha", max_concurrent=1)

    result = search("detector", config, tmp_path / "search", settings, space=space)

    assert [t.status for t in result.trials] == ["finished", "failed"]
    good, failed = result.trials
    assert result.best is good and result.baseline is good
    assert good.evals == 2 and good.score is not None  # one mAP50-95 per epoch
    assert failed.error and failed.score is None
    best = DetectorRunConfig.load(tmp_path / "search" / BEST_FILE)
    assert best.train == config.train and best.run.register

    client = MlflowClient(registry.tracking_uri)
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials_failed"] == 1
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.{PARENT_TAG} = '{result.parent_run_id}'"
    )
    finished = [run for run in children if run.info.status == "FINISHED"]
    assert [run.data.tags[TRIAL_TAG] for run in finished] == [good.trial_id]
    # What Tune compared is what the trainer's own MLflow logger recorded for each epoch.
    history = client.get_metric_history(finished[0].info.run_id, "val/mAP50-95")
    assert sorted(m.step for m in history) == [1, 2]
    assert max(m.value for m in history) == pytest.approx(good.score)
    assert finished[0].data.tags["git_commit"] == parent.data.tags["git_commit"]
    assert yaml.safe_load((tmp_path / "search" / BEST_FILE).read_text())["train"]["epochs"] == 2


def test_a_trial_that_failed_after_scoring_is_listed_but_never_best() -> None:
    """The trial scored best, then failed exporting its model (as P = 16 once did): nothing to register."""
    trials = [
        TrialSummary("stopped", {}, "stopped", 0.3, 1),
        TrialSummary("crashed", {}, "failed", 2.9, 4, error="export failed"),
        TrialSummary("unscored", {}, "failed", None, 0, error="cannot fill one batch"),
        TrialSummary("finished", {}, "finished", 1.8, 4),
    ]
    ranked, best = rank(trials)
    assert [t.trial_id for t in ranked] == ["finished", "stopped", "crashed", "unscored"]
    assert best is not None and best.trial_id == "finished"
    assert rank(trials[1:3]) == ([trials[1], trials[2]], None)
