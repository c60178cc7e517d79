"""The trainer callbacks without a trainer: the time budget's re-planning and MLflow metric names."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from training.detector import callbacks
from training.detector.callbacks import TimeBudget, metric_key


class _Trainer(SimpleNamespace):
    """The attributes of an Ultralytics trainer that TimeBudget reads and writes."""

    def __init__(self, epochs: int) -> None:
        super().__init__(
            epoch=0, start_epoch=0, epochs=epochs, stop=False, args=SimpleNamespace(epochs=epochs)
        )
        self.scheduler = SimpleNamespace(last_epoch=-1)
        self.schedules = 0

    def _setup_scheduler(self) -> None:
        self.schedules += 1
        self.scheduler = SimpleNamespace(last_epoch=-1)


def test_budget_cuts_then_extends_within_the_configured_epochs(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = {"now": 10.0}
    monkeypatch.setattr(callbacks.time, "monotonic", lambda: clock["now"])
    budget = TimeBudget(budget_s=100.0, started=0.0)
    trainer: Any = _Trainer(epochs=10)
    budget.on_train_start(trainer)  # 10 s of setup

    clock["now"] = 50.0  # a slow first epoch: 40 s, 50 s left -> 1 more fits
    budget.on_fit_epoch_end(trainer)
    assert (trainer.epochs, trainer.args.epochs, trainer.stop) == (2, 2, False)
    assert trainer.schedules == 1 and trainer.scheduler.last_epoch == 0

    trainer.epoch, clock["now"] = 1, 60.0  # then fast ones: 25 s mean, 40 s left -> 1 more, 3 in all
    budget.on_fit_epoch_end(trainer)
    assert (trainer.epochs, trainer.stop) == (3, False)

    trainer.epoch, clock["now"] = 2, 99.0  # out of time, and epoch 3 of 3 is done: no new plan
    budget.on_fit_epoch_end(trainer)  # (Ultralytics stops after its final epoch by itself)
    assert trainer.epochs == 3 and budget.plans == [2, 3]

    trainer.epoch, trainer.epochs, clock["now"] = 1, 5, 200.0  # over budget mid-plan: stop now
    budget.on_fit_epoch_end(trainer)
    assert (trainer.epochs, trainer.stop) == (2, True)


def test_budget_never_goes_above_the_configured_epochs(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = {"now": 0.0}
    monkeypatch.setattr(callbacks.time, "monotonic", lambda: clock["now"])
    budget = TimeBudget(budget_s=1000.0, started=0.0)
    trainer: Any = _Trainer(epochs=3)
    budget.on_train_start(trainer)
    clock["now"] = 1.0
    budget.on_fit_epoch_end(trainer)
    assert trainer.epochs == 3 and trainer.schedules == 0 and not trainer.stop


def test_metric_keys_are_mlflow_safe() -> None:
    assert metric_key("metrics/mAP50-95(B)") == "val/mAP50-95"
    assert metric_key("train/box_loss") == "train/box_loss"
    assert metric_key("lr/pg0") == "lr/pg0"
    assert metric_key("test_ap50_95.circle") == "test_ap50_95.circle"
