"""Trainer callbacks that make a training run a Ray Tune trial (CONVENTIONS.md, 7: the loops are not edited).

- :class:`ChildRun` (a :class:`~training.callbacks.base.Callback` of ``CaptionTrainer``): tags the run's
  MLflow run as a child of the search's parent run (the full training of the best config uses it alone).
- :class:`CaptionTrialCallback`: that, with the Tune trial's id and name, and each validation of the real
  loop reported to Tune as ``val_cider_d`` (what the scheduler compares).
- :class:`DetectorTrialCallback` (Ultralytics hooks, like ``training.detector.callbacks``): each epoch's
  validation mAP50-95 is reported as ``val_map50_95``.

One report per validation: ``training_iteration`` counts validations, which is what ASHA's rungs count. Each
report (and each trial's MLflow run, as the tag ``ray.node_id``) names the Ray node the trial ran on.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from training.callbacks.base import Callback

# MLflow's own tag for the parent of a nested run (the UI shows the child under its parent).
PARENT_TAG = "mlflow.parentRunId"
TRIAL_TAG = "tune.trial_id"
NODE_TAG = "ray.node_id"


def node_id() -> str:
    """The Ray node this trial runs on (on a cluster, shows where the work landed)."""
    import ray

    return str(ray.get_runtime_context().get_node_id())


def trial_tags(parent_run_id: str) -> dict[str, str]:
    """The tags that make a run the child of the search run, with this Tune trial's id, name and node."""
    from ray import tune

    context = tune.get_context()
    return {
        PARENT_TAG: parent_run_id,
        TRIAL_TAG: context.get_trial_id(),
        "mlflow.runName": context.get_trial_name(),
        NODE_TAG: node_id(),
    }


class ChildRun(Callback):
    """Tag the caption run's MLflow run with ``tags`` (e.g. the search's run as its parent).

    Args:
        tags: The tags, set once the MLflow callback has created its run.
    """

    def __init__(self, tags: Mapping[str, str]) -> None:
        self.tags = dict(tags)

    def on_train_start(self, trainer: Any) -> None:
        from training.callbacks.mlflow import MlflowCallback

        tracker = trainer.callbacks.find(MlflowCallback)  # it runs before the extra callbacks: its run exists
        if tracker is not None:
            tracker.set_tags(self.tags)


class CaptionTrialCallback(ChildRun):
    """Report each validation CIDEr-D of the caption loop to Ray Tune; tag the MLflow run as a trial of the
    search (runs inside a Tune trial).

    Args:
        parent_run_id: The search's MLflow run.
    """

    def __init__(self, parent_run_id: str) -> None:
        super().__init__(trial_tags(parent_run_id))

    def on_eval_end(self, trainer: Any, result: Any) -> None:
        from ray import tune

        state = trainer.state
        tune.report(
            {
                "val_cider_d": result.metrics["cider_d"],
                "best_val_cider_d": state.best_score,
                "step": state.step,
                "node": node_id(),
            }
        )


class DetectorTrialCallback:
    """Report each epoch's validation mAP50-95 of the Ultralytics loop to Ray Tune."""

    def attach(self, trainer: Any) -> None:
        """Register the hook on an Ultralytics trainer."""
        trainer.add_callback("on_fit_epoch_end", self.on_fit_epoch_end)

    def on_fit_epoch_end(self, trainer: Any) -> None:
        from ray import tune

        metrics = trainer.metrics or {}
        tune.report(
            {
                "val_map50_95": float(metrics.get("metrics/mAP50-95(B)", 0.0)),
                "val_map50": float(metrics.get("metrics/mAP50(B)", 0.0)),
                "epoch": int(trainer.epoch) + 1,
                "node": node_id(),
            }
        )
