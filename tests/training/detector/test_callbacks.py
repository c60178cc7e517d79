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


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> dict[str, float]:
    """The callbacks' ``time.monotonic``, set by the test through ``clock["now"]``."""
    now = {"now": 0.0}
    monkeypatch.setattr(callbacks.time, "monotonic", lambda: now["now"])
    return now


def test_budget_cuts_then_extends_within_the_configured_epochs(clock: dict[str, float]) -> None:
    clock["now"] = 10.0
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


def test_budget_never_goes_above_the_configured_epochs(clock: dict[str, float]) -> None:
    budget = TimeBudget(budget_s=1000.0, started=0.0)
    trainer: Any = _Trainer(epochs=3)
    budget.on_train_start(trainer)
    clock["now"] = 1.0
    budget.on_fit_epoch_end(trainer)
    assert trainer.epochs == 3 and trainer.schedules == 0 and not trainer.stop


def test_the_time_left_after_whole_epochs_buys_a_last_one_cut_short(clock: dict[str, float]) -> None:
    """The bootstrap's case: a 7-minute budget, epochs of 128 s training + 10 s validation. Whole epochs
    alone fit 2 and leave ~2 minutes idle; the third runs until only two validations' time is left (its own
    and the final one)."""
    clock["now"] = 9.0
    budget = TimeBudget(budget_s=420.0, started=0.0)
    trainer: Any = _Trainer(epochs=10)
    budget.on_train_start(trainer)  # 9 s of setup

    def run_epoch(train_s: float, val_s: float) -> None:
        budget.on_train_epoch_start(trainer)
        for _ in range(int(train_s)):  # a batch a second
            clock["now"] += 1.0
            budget.on_train_batch_end(trainer)
            if trainer.stop:
                break
        budget.on_train_epoch_end(trainer)
        clock["now"] += val_s
        budget.on_fit_epoch_end(trainer)

    run_epoch(128, 10)  # at 147 s: 273 s left = one whole epoch and 135 s, room for a partial one
    assert (trainer.epochs, trainer.stop) == (3, False) and budget.validation_s == 10
    trainer.epoch = 1
    run_epoch(128, 10)  # at 285 s: 135 s left, the plan holds
    assert (trainer.epochs, trainer.stop) == (3, False) and budget.plans == [3]
    trainer.epoch = 2
    run_epoch(128, 10)  # cut when 20 s are left, validated, and no more
    assert trainer.stop and budget.cut == 2
    assert clock["now"] == pytest.approx(410.0)  # 10 s left for the final validation of the best weights
    assert budget.train_s == [128, 128]  # the cut epoch's training is not taken as an epoch's


def test_no_partial_epoch_for_a_sliver_of_time(clock: dict[str, float]) -> None:
    budget = TimeBudget(budget_s=160.0, started=0.0)
    trainer: Any = _Trainer(epochs=10)
    budget.on_train_start(trainer)
    budget.on_train_epoch_start(trainer)
    clock["now"] = 100.0
    budget.on_train_epoch_end(trainer)
    clock["now"] = 110.0  # 50 s left: two validations (20 s) and 30 s = 0.3 of an epoch's training
    budget.on_fit_epoch_end(trainer)
    assert trainer.epochs == 2
    budget.min_partial = 0.4  # asking for 0.4 of an epoch at least: none fits
    trainer.epochs = 10
    budget.on_fit_epoch_end(trainer)
    assert (trainer.epochs, trainer.stop) == (1, True)


def test_metric_keys_are_mlflow_safe() -> None:
    assert metric_key("metrics/mAP50-95(B)") == "val/mAP50-95"
    assert metric_key("train/box_loss") == "train/box_loss"
    assert metric_key("lr/pg0") == "lr/pg0"
    assert metric_key("test_ap50_95.circle") == "test_ap50_95.circle"
