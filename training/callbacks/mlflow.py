"""MLflow tracking as a callback: params, resolved config, per-step metrics, validation and test scores,
samples, the model card, git commit and dataset version.

It talks to the tracking store through ``MlflowClient`` with the registry's URI (``MLFLOW_TRACKING_URI``,
else the embedded SQLite), in an experiment made by ``Registry.ensure_experiment`` (which pins the local
artifact folder). A resumed run goes on logging into the same MLflow run.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from training.callbacks.base import Callback

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    from snap2caption.registry import Registry

logger = logging.getLogger(__name__)

_BATCH = 900  # MLflow accepts at most 1000 metrics and 100 params per log_batch call
_PARAM_BATCH = 100
_PARAM_MAX = 6000


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": "1"}`` (MLflow params are flat strings)."""
    flat: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, list | tuple) else str(value)
    return flat


class MlflowCallback(Callback):
    """Log a training run to MLflow.

    Args:
        registry: Gives the tracking URI and creates the experiment.
        experiment: Experiment name.
        run_name: MLflow run name.
        params: Flat or nested params (the resolved config, data facts) logged at start.
        tags: Run tags (``git_commit``, ``dataset_version``, ``config_sha256``...).
        config: The resolved config, logged as ``config.yaml``.
        log_every: Buffer per-step metrics and send them every this many steps.

    Attributes:
        run_id: The MLflow run (set at train start; restored on resume).
    """

    def __init__(
        self,
        registry: Registry,
        experiment: str,
        *,
        run_name: str | None = None,
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, str] | None = None,
        config: Mapping[str, Any] | None = None,
        log_every: int = 10,
    ) -> None:
        from mlflow import MlflowClient

        self.registry = registry
        self.experiment = experiment
        self.run_name = run_name
        self.params = flatten(params or {})
        self.tags = dict(tags or {})
        self.config = dict(config or {})
        self.log_every = log_every
        self.client: MlflowClient = MlflowClient(
            tracking_uri=registry.tracking_uri, registry_uri=registry.registry_uri
        )
        self.run_id: str | None = None
        self._pending: list[Metric] = []

    # ------------------------------------------------------------------------------------ helpers

    def _metrics(self, values: Mapping[str, float], step: int, prefix: str = "") -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._pending += [
            Metric(f"{prefix}{k}", float(v), now, step) for k, v in values.items() if math.isfinite(float(v))
        ]

    def flush(self) -> None:
        """Send buffered metrics."""
        if self.run_id is None:
            return
        while self._pending:
            chunk, self._pending = self._pending[:_BATCH], self._pending[_BATCH:]
            self.client.log_batch(self.run_id, metrics=chunk)

    def log_metrics(self, values: Mapping[str, float], step: int, prefix: str = "") -> None:
        """Log metrics now (``prefix`` prepended to each name)."""
        self._metrics(values, step, prefix)
        self.flush()

    def set_tags(self, tags: Mapping[str, str]) -> None:
        if self.run_id is not None:
            for key, value in tags.items():
                self.client.set_tag(self.run_id, key, str(value))

    def log_json(self, data: Any, artifact_file: str) -> None:
        if self.run_id is not None:
            self.client.log_text(self.run_id, json.dumps(data, indent=2) + "\n", artifact_file)

    # ------------------------------------------------------------------------------------ hooks

    def on_train_start(self, trainer: Any) -> None:
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException

        if self.run_id is not None:  # resumed: keep logging into the same run when it still exists
            try:
                self.client.get_run(self.run_id)
                self.set_tags({"resumed_from_step": str(trainer.state.step)})
                return
            except MlflowException:
                logger.warning("MLflow run %s of the checkpoint is gone; starting a new one", self.run_id)
        experiment_id = self.registry.ensure_experiment(self.experiment)
        run = self.client.create_run(experiment_id, run_name=self.run_name, tags=self.tags)
        self.run_id = run.info.run_id
        params = [Param(k[:250], v[:_PARAM_MAX]) for k, v in self.params.items()]
        for i in range(0, len(params), _PARAM_BATCH):
            self.client.log_batch(self.run_id, params=params[i : i + _PARAM_BATCH])
        if self.config:
            self.client.log_text(self.run_id, yaml.safe_dump(self.config, sort_keys=False), "config.yaml")
        logger.info(
            "MLflow run %s in experiment %r (%s)", self.run_id, self.experiment, self.registry.tracking_uri
        )

    def on_step_end(self, trainer: Any, logs: dict[str, float]) -> None:
        self._metrics(logs, trainer.state.step, "train_")
        if trainer.state.step % self.log_every == 0:
            self.flush()

    def on_eval_end(self, trainer: Any, result: Any) -> None:
        self.log_metrics(result.metrics, trainer.state.step, "val_")

    def on_train_end(self, trainer: Any) -> None:
        self.flush()
        summary = {"train_steps": float(trainer.state.step), "train_seconds": trainer.state.elapsed_s}
        if trainer.state.best_step >= 0:
            summary |= {
                "best_val_cider_d": trainer.state.best_score,
                "best_step": float(trainer.state.best_step),
            }
        self.log_metrics(summary, trainer.state.step)
        self.set_tags({"stop_reason": trainer.stop_reason})

    def on_test_end(self, trainer: Any, result: Any) -> None:
        self.log_metrics(result.metrics, trainer.state.step, f"{result.split}_")
        self.log_json(result.samples, f"samples/{result.split}.json")
        self.set_tags({"metrics_scorer": result.scorer})

    def on_model_saved(self, trainer: Any, artifact_dir: Path) -> None:
        # The registry uploads the whole folder when it registers; here only the small, readable files.
        if self.run_id is not None:
            for name in ("README.md", "config.json"):
                if (artifact_dir / name).is_file():
                    self.client.log_artifact(self.run_id, str(artifact_dir / name), "model_card")

    def on_run_end(self, trainer: Any, failed: bool) -> None:
        if self.run_id is None:
            return
        try:
            self.flush()
        finally:
            self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.run_id = state.get("run_id")
