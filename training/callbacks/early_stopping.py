"""Early stopping on the validation score the trainer tracks (CIDEr-D for captions)."""

from __future__ import annotations

from typing import Any

from training.callbacks.base import Callback


class EarlyStopping(Callback):
    """Stop after ``patience`` validations without a new best score.

    Stateless: it reads the trainer's validation history (``trainer.state``), which checkpoints restore, so a
    resumed run stops where the uninterrupted one would have. Keeping the best weights is the trainer's job
    (model selection happens with or without early stopping).

    Args:
        patience: Validations without improvement before stopping; 0 never stops.
    """

    def __init__(self, patience: int) -> None:
        self.patience = patience

    def _check(self, trainer: Any) -> None:
        waited = trainer.state.evals_since_best
        if self.patience and trainer.state.evals and waited >= self.patience:
            trainer.stop(
                f"early stopping: no better val CIDEr-D in {waited} evaluations "
                f"(best {trainer.state.best_score:.4f} at step {trainer.state.best_step})"
            )

    def on_train_start(self, trainer: Any) -> None:
        self._check(trainer)

    def on_eval_end(self, trainer: Any, result: Any) -> None:
        self._check(trainer)
