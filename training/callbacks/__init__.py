"""Trainer integrations as callbacks: progress, MLflow, checkpoints, early stopping (CONVENTIONS.md, 7)."""

from training.callbacks.base import Callback, CallbackList

__all__ = ["Callback", "CallbackList"]
