"""Ultralytics trainer callbacks: MLflow tracking and the wall-clock budget (CONVENTIONS.md, 7).

Both attach with ``trainer.add_callback(event, fn)``; the Ultralytics loop itself is not edited.
Ultralytics' own MLflow callback is switched off (``snap2caption.models.detector.yolo``): it would open its
own run in the process-global MLflow state; this one logs into the run the job created, through an
``MlflowClient``.
"""

from __future__ import annotations

import logging
import math
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlflow import MlflowClient

logger = logging.getLogger(__name__)

PLOT_SUFFIXES = (".png", ".jpg")
_UNSAFE_KEY = re.compile(r"[^\w./\- ]")


def metric_key(name: str) -> str:
    """An MLflow-safe metric key: ``metrics/mAP50-95(B)`` -> ``val/mAP50-95``."""
    name = name.replace("(B)", "").replace("metrics/", "val/")
    return _UNSAFE_KEY.sub("_", name)


class MlflowLogger:
    """Log a YOLO training run into an existing MLflow run.

    - ``on_pretrain_routine_end``: the Ultralytics arguments as params (``yolo.<arg>``);
    - ``on_fit_epoch_end``: train losses, validation metrics (precision, recall, mAP50, mAP50-95, val
      losses), learning rates and epoch time, at step = epoch number (1-based);
    - ``on_train_end``: every plot the run drew (PR / P / R / F1 curves, confusion matrices, label
      statistics, training curves, sample batches) as image artifacts under ``plots/``.

    Args:
        client: MLflow client on the tracking store.
        run_id: The run to log into (created and ended by the caller).
    """

    def __init__(self, client: MlflowClient, run_id: str) -> None:
        self.client = client
        self.run_id = run_id

    def attach(self, trainer: Any) -> None:
        """Register the hooks on an Ultralytics trainer."""
        trainer.add_callback("on_pretrain_routine_end", self.on_pretrain_routine_end)
        trainer.add_callback("on_fit_epoch_end", self.on_fit_epoch_end)
        trainer.add_callback("on_train_end", self.on_train_end)

    def on_pretrain_routine_end(self, trainer: Any) -> None:
        from mlflow.entities import Param

        params = [Param(f"yolo.{k}", str(v)[:500]) for k, v in sorted(vars(trainer.args).items())]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[start : start + 100])

    def on_fit_epoch_end(self, trainer: Any) -> None:
        from mlflow.entities import Metric

        values: dict[str, float] = {
            **trainer.label_loss_items(trainer.tloss, prefix="train"),
            **(trainer.metrics or {}),
            **getattr(trainer, "lr", {}),
        }
        if trainer.epoch_time:
            values["epoch_seconds"] = trainer.epoch_time
        now = int(time.time() * 1000)
        step = int(trainer.epoch) + 1
        metrics = [
            Metric(metric_key(k), float(v), now, step) for k, v in values.items() if math.isfinite(float(v))
        ]
        self.client.log_batch(self.run_id, metrics=metrics)

    def on_train_end(self, trainer: Any) -> None:
        save_dir = Path(trainer.save_dir)
        plots = sorted(p for p in save_dir.glob("*") if p.suffix in PLOT_SUFFIXES)
        for path in plots:
            self.client.log_artifact(self.run_id, str(path), "plots")
        results = save_dir / "results.csv"
        if results.is_file():
            self.client.log_artifact(self.run_id, str(results), "plots")
        logger.info("logged %d plots to MLflow run %s", len(plots), self.run_id)


class TimeBudget:
    """Fit training into a wall-clock budget: re-plan the epoch count after every epoch, never above the
    configured one, and end the last epoch early when the budget runs out in it.

    After each epoch (validation included) it projects the finish from the mean epoch time so far and sets
    the epoch count to what fits (at least the epoch just finished, at most the configured count), so a
    slow first epoch on a busy machine can be made up later. The time left after the whole epochs that fit
    buys one more, partial epoch when it holds at least ``min_partial`` of an epoch's training besides two
    validations: that epoch then stops between batches when only the time of two validations is left (its
    own, and Ultralytics' final one of the best weights), instead of the budget idling away up to an epoch
    (the starter detector, ~140 s epochs in 7 minutes, trained 2 epochs and stopped 2 minutes early when
    its first epoch took 139 s rather than 137). Whenever the count changes, the learning-rate schedule is
    rebuilt for the new length, as Ultralytics' own ``time=`` mode does, so the run still ends with a
    decayed learning rate and a final validation with plots.

    Args:
        budget_s: Seconds for the whole job, counted from ``started`` (data staging and setup included).
        started: ``time.monotonic()`` when the job started.
        min_partial: Least share of an epoch's training worth a partial last epoch.
    """

    def __init__(self, budget_s: float, started: float, min_partial: float = 0.25) -> None:
        self.budget_s = budget_s
        self.started = started
        self.min_partial = min_partial
        self.first_epoch_started: float | None = None
        self.planned_epochs: int | None = None
        self.plans: list[int] = []
        self.epoch_started: float | None = None
        self.train_s: list[float] = []  # training time of each whole epoch
        self.validation_started: float | None = None
        self.validation_s: float | None = None  # the last epoch's validation (and checkpoint)
        self.cut: int | None = None  # the epoch stopped between batches

    def attach(self, trainer: Any) -> None:
        """Register the hooks on an Ultralytics trainer."""
        trainer.add_callback("on_train_start", self.on_train_start)
        trainer.add_callback("on_train_epoch_start", self.on_train_epoch_start)
        trainer.add_callback("on_train_batch_end", self.on_train_batch_end)
        trainer.add_callback("on_train_epoch_end", self.on_train_epoch_end)
        trainer.add_callback("on_fit_epoch_end", self.on_fit_epoch_end)

    def on_train_start(self, trainer: Any) -> None:
        self.first_epoch_started = time.monotonic()
        self.planned_epochs = int(trainer.epochs)

    def on_train_epoch_start(self, trainer: Any) -> None:
        self.epoch_started = time.monotonic()

    def on_train_batch_end(self, trainer: Any) -> None:
        """Stop the epoch between batches once only the two validations' time is left (not in the first
        epoch: nothing is measured yet)."""
        if self.validation_s is None or trainer.stop:
            return
        left_s = self.budget_s - (time.monotonic() - self.started)
        if left_s <= 2 * self.validation_s:
            self.cut = int(trainer.epoch)
            logger.warning(
                "time budget %.1f min: ending epoch %d early, %.0f s left for its and the final validation",
                self.budget_s / 60, self.cut + 1, left_s,
            )  # fmt: skip
            trainer.stop = True

    def on_train_epoch_end(self, trainer: Any) -> None:
        now = time.monotonic()
        if self.epoch_started is not None and self.cut is None:
            self.train_s.append(now - self.epoch_started)
        self.validation_started = now

    def on_fit_epoch_end(self, trainer: Any) -> None:
        now = time.monotonic()
        assert self.first_epoch_started is not None and self.planned_epochs is not None
        if self.validation_started is not None:
            self.validation_s = now - self.validation_started
        epoch = int(trainer.epoch)
        if self.cut is not None:  # the budget ended this epoch: it is the last
            trainer.stop = True
            return
        mean_epoch = (now - self.first_epoch_started) / (epoch - int(trainer.start_epoch) + 1)
        left_s = self.budget_s - (now - self.started)
        whole = max(0, math.floor(left_s / mean_epoch))
        rest_s = left_s - whole * mean_epoch - 2 * (self.validation_s or 0.0)
        mean_train = sum(self.train_s) / len(self.train_s) if self.train_s else mean_epoch
        partial = 1 if self.validation_s is not None and rest_s >= self.min_partial * mean_train else 0
        fits = epoch + 1 + whole + partial
        new_epochs = max(epoch + 1, min(self.planned_epochs, fits))
        if new_epochs == trainer.epochs:
            return
        logger.warning(
            "time budget %.1f min: %.1f s per epoch, %.0f s left -> %d epochs (was %d, configured %d)%s",
            self.budget_s / 60, mean_epoch, left_s, new_epochs, trainer.epochs, self.planned_epochs,
            ", the last one ended early by the budget" if partial and new_epochs == fits else "",
        )  # fmt: skip
        self.plans.append(new_epochs)
        trainer.epochs = trainer.args.epochs = new_epochs
        trainer._setup_scheduler()  # the LR schedule decays over trainer.epochs
        trainer.scheduler.last_epoch = trainer.epoch
        trainer.stop = epoch + 1 >= new_epochs
