"""What runs in the search's driver process beside Ray Tune: ASHA that writes its decisions down, and the
progress lines.

Ray Tune saves trial states when it checkpoints an experiment, but not its scheduler: a trial that ASHA
stopped early ends ``TERMINATED`` like a trial that ran to its end, and a restored search starts a fresh
scheduler. :class:`RecordedASHA` therefore appends every rung decision to a file in the search folder
(one JSON line each: trial, validation count, score, decision), which survives a resume and is what the
search reads to tell ``stopped`` from ``finished``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ray.tune import Callback
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

logger = logging.getLogger(__name__)


class RecordedASHA(ASHAScheduler):
    """Ray's ASHA, appending each decision it takes on a reported score to ``record`` (JSON lines).

    Args:
        record: The decisions file (``<search>/scheduler.jsonl``).
        **options: ``ASHAScheduler``'s own (``time_attr``, ``max_t``, ``grace_period``,
            ``reduction_factor``).
    """

    def __init__(self, record: str, **options: Any) -> None:
        super().__init__(**options)
        self.record = record

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
        decision: str = super().on_trial_result(tune_controller, trial, result)
        if self._time_attr in result and self._metric in result:
            iteration = int(result[self._time_attr])
            line = {
                "trial_id": trial.trial_id,
                "iteration": iteration,
                "score": float(result[self._metric]),
                "decision": decision,
                # ASHA also stops a trial that reached max_t: that one was not cut short.
                "early": decision == TrialScheduler.STOP and iteration < self._max_t,
            }
            with open(self.record, "a", encoding="utf-8") as f:
                f.write(json.dumps(line) + "\n")
            if line["early"]:
                logger.info(
                    "ASHA stops trial %s after %d validations (%s %.4f)",
                    trial.trial_id,
                    iteration,
                    self._metric,
                    line["score"],
                )
        return decision


def read_decisions(record: str | Path) -> list[dict[str, Any]]:
    """The decisions :class:`RecordedASHA` wrote, in order (none when the file is missing)."""
    path = Path(record)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


class TrialLog(Callback):
    """One log line per reported validation and per trial outcome: the search's progress.

    Args:
        metric: The score the search compares.
    """

    def __init__(self, metric: str) -> None:
        self.metric = metric

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        logger.info("trial %s started: %s", trial.trial_id, trial.config)

    def on_trial_result(
        self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any], **info: Any
    ) -> None:
        done = sum(t.status in ("TERMINATED", "ERROR") for t in trials)
        logger.info(
            "trial %s validation %d: %s %.4f  [%d/%d trials done]",
            trial.trial_id,
            result.get("training_iteration", 0),
            self.metric,
            float(result.get(self.metric, float("nan"))),
            done,
            len(trials),
        )

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        logger.info("trial %s ended", trial.trial_id)

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        logger.warning("trial %s failed (the search goes on)", trial.trial_id)
