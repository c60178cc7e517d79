"""The callback protocol the trainers call; integrations hook in here instead of editing the loop.

A trainer calls, in order: ``on_train_start`` once; per optimizer step ``on_eval_end`` (when the step ran a
validation) and then ``on_step_end``; ``on_train_end`` when the loop is over (the last weights are still in
the model); ``on_test_end`` after the final test evaluation; ``on_model_saved`` once the artifact folder is
written; and ``on_run_end`` last, whether the run succeeded or not.

A callback that must survive a resume returns JSON-able state from ``state_dict`` (stored in checkpoints)
and takes it back in ``load_state_dict``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any


class Callback:
    """Base class: every hook is a no-op. ``trainer`` is the running trainer (its ``state``, ``model``...)."""

    def on_train_start(self, trainer: Any) -> None:
        """Before the first step (also after a resume)."""

    def on_step_end(self, trainer: Any, logs: dict[str, float]) -> None:
        """After each optimizer step; ``logs``: loss, lr, grad_norm, images_per_s, epoch."""

    def on_eval_end(self, trainer: Any, result: Any) -> None:
        """After a validation pass (``result`` is an ``EvalResult``)."""

    def on_train_end(self, trainer: Any) -> None:
        """When the loop stops (steps done, time budget, early stop); the last weights are in the model."""

    def on_test_end(self, trainer: Any, result: Any) -> None:
        """After the final test evaluation of the selected weights."""

    def on_model_saved(self, trainer: Any, artifact_dir: Path) -> None:
        """After the model artifact folder is written."""

    def on_run_end(self, trainer: Any, failed: bool) -> None:
        """Last; ``failed`` when the run raised."""

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state to put in checkpoints."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


class CallbackList(Callback):
    """Several callbacks called in order; their states keyed by class name."""

    def __init__(self, callbacks: Sequence[Callback] = ()) -> None:
        self.callbacks = list(callbacks)

    def __iter__(self) -> Iterator[Callback]:
        return iter(self.callbacks)

    def find(self, kind: type[Any]) -> Any | None:
        """The first callback of type ``kind``, or None."""
        return next((cb for cb in self.callbacks if isinstance(cb, kind)), None)

    def on_train_start(self, trainer: Any) -> None:
        for cb in self.callbacks:
            cb.on_train_start(trainer)

    def on_step_end(self, trainer: Any, logs: dict[str, float]) -> None:
        for cb in self.callbacks:
            cb.on_step_end(trainer, logs)

    def on_eval_end(self, trainer: Any, result: Any) -> None:
        for cb in self.callbacks:
            cb.on_eval_end(trainer, result)

    def on_train_end(self, trainer: Any) -> None:
        for cb in self.callbacks:
            cb.on_train_end(trainer)

    def on_test_end(self, trainer: Any, result: Any) -> None:
        for cb in self.callbacks:
            cb.on_test_end(trainer, result)

    def on_model_saved(self, trainer: Any, artifact_dir: Path) -> None:
        for cb in self.callbacks:
            cb.on_model_saved(trainer, artifact_dir)

    def on_run_end(self, trainer: Any, failed: bool) -> None:
        for cb in self.callbacks:
            cb.on_run_end(trainer, failed)

    def state_dict(self) -> dict[str, Any]:
        return {type(cb).__name__: cb.state_dict() for cb in self.callbacks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for cb in self.callbacks:
            if type(cb).__name__ in state:
                cb.load_state_dict(state[type(cb).__name__])
