"""Progress: a tqdm bar with loss, learning rate and images/s; log lines instead when there is no terminal."""

from __future__ import annotations

import logging
from typing import Any

from tqdm import tqdm

from training.callbacks.base import Callback

logger = logging.getLogger(__name__)


class ProgressCallback(Callback):
    """A bar over the optimizer steps (the stderr of a terminal), or an INFO line every ``log_every`` steps.

    Args:
        log_every: Steps between log lines when the bar is off.
        enabled: Show the bar: True, False, or None for "only on a terminal" (tqdm's rule).
    """

    def __init__(self, log_every: int = 10, enabled: bool | None = None) -> None:
        self.log_every = log_every
        self.enabled = enabled
        self.bar: tqdm[Any] | None = None
        self._loss: float | None = None  # exponential moving average, for a readable bar
        self._val = ""

    def on_train_start(self, trainer: Any) -> None:
        self.bar = tqdm(
            total=trainer.total_steps,
            initial=trainer.state.step,
            desc="train caption",
            unit="step",
            disable=None if self.enabled is None else not self.enabled,
            dynamic_ncols=True,
        )

    def on_step_end(self, trainer: Any, logs: dict[str, float]) -> None:
        loss = logs["loss"]
        self._loss = loss if self._loss is None else 0.9 * self._loss + 0.1 * loss
        assert self.bar is not None
        fields = {
            "loss": f"{self._loss:.3f}",
            "lr": f"{logs['lr']:.2e}",
            "img/s": f"{logs['images_per_s']:.0f}",
        }
        if self._val:
            fields["val_cider"] = self._val
        self.bar.set_postfix(fields, refresh=False)
        self.bar.update(1)
        if self.bar.disable and trainer.state.step % self.log_every == 0:
            logger.info(
                "step %d/%d epoch %.2f loss %.4f lr %.2e %.0f img/s%s",
                trainer.state.step,
                trainer.total_steps,
                logs["epoch"],
                self._loss,
                logs["lr"],
                logs["images_per_s"],
                f" val_cider_d {self._val}" if self._val else "",
            )

    def on_eval_end(self, trainer: Any, result: Any) -> None:
        self._val = f"{result.metrics['cider_d']:.3f}"
        logger.info(
            "step %d: val CIDEr-D %.4f (best %.4f at step %d)",
            trainer.state.step,
            result.metrics["cider_d"],
            trainer.state.best_score,
            trainer.state.best_step,
        )

    def on_train_end(self, trainer: Any) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
