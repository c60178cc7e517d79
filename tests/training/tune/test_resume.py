"""``snap2caption tune caption --resume``: a search whose driver was killed (SIGKILL, in the middle of the
search) goes on from Ray Tune's saved experiment state: the trial that had ended is kept, the one that had
not runs again, and the same MLflow parent run is finished.

The driver is killed at a known point, not after a guessed delay: once the first trial has ended, a Tune
callback in the driver makes Tune save its experiment state to the search folder now (Tune saves it only
every so often, and the second trial could end before the next save), checks that the saved state lists
the ended trial, and kills its own process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

from snap2caption.cli import main
from snap2caption.registry import Registry
from training.tune.report import PARENT_TAG, TRIAL_TAG
from training.tune.search import SEARCH_FILE, TRIALS_FILE

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[3]
# The tiny model on cached features, 30 steps, validated at the end: a short trial that still trains.
OVERRIDES = [
    "model.encoder.trainable=none",
    "train.max_steps=30",
    "train.captions_per_image=1",
    "train.threads=1",
]
SEARCH = ["--samples", "2", "--scheduler", "fifo", "--max-concurrent", "1", "--seed", "0"]

# The driver: the real search, plus a callback that kills it (only where KILL_DRIVER=1: a restored search
# unpickles the callback too) once a trial has ended and Tune's experiment state, saved on the spot through
# the controller that called the callback, lists it as ended.
DRIVER = textwrap.dedent(
    """
    import glob, os, signal, sys
    from pathlib import Path
    from ray import tune
    from training.caption.config import CaptionRunConfig
    from training.tune.search import SearchSettings, search

    def controller():
        frame = sys._getframe(1)
        while frame is not None:
            owner = frame.f_locals.get("self")
            if type(owner).__name__ == "TuneController":
                return owner
            frame = frame.f_back
        raise RuntimeError("no TuneController up the stack")

    class KillDriverAfterFirstTrial(tune.Callback):
        def __init__(self, experiment):
            self.experiment, self.ended = experiment, False

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.ended = True

        def on_step_end(self, iteration, trials, **info):
            if not self.ended or os.environ.get("KILL_DRIVER") != "1":
                return
            controller().checkpoint(force=True, wait=True)
            saved = glob.glob(os.path.join(self.experiment, "experiment_state-*.json"))
            if any("TERMINATED" in Path(p).read_text() for p in saved):
                os.kill(os.getpid(), signal.SIGKILL)

    data, out, *overrides = sys.argv[1:]
    config = CaptionRunConfig.load("tiny", [("run.data", data), *overrides])
    settings = SearchSettings(samples=2, scheduler="fifo", max_concurrent=1, seed=0)
    space = {"train.lr": {"choice": [5.0e-3]}}
    kill = KillDriverAfterFirstTrial(os.path.join(out, "ray", "caption-search"))
    search("caption", config, out, settings, space=space, callbacks=[kill])
    """
)


def test_a_killed_search_resumes_keeping_the_ended_trial(
    caption_data: Path, registry: Registry, tmp_path: Path, ray_tmp: Path
) -> None:
    out = tmp_path / "search"
    env = os.environ | {"KILL_DRIVER": "1", "PYTHONPATH": str(REPO)}
    killed = subprocess.run(
        [sys.executable, "-c", DRIVER, str(caption_data), str(out), *OVERRIDES],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert killed.returncode == -9, killed.stderr[-4000:]
    assert not (out / TRIALS_FILE).exists()  # the search had not ended
    parent_run_id = json.loads((out / SEARCH_FILE).read_text())["parent_run_id"]

    # The search's base config and space are the saved ones; the command line names the search folder.
    result = CliRunner().invoke(
        main,
        ["tune", "caption", "--config", "tiny", "--out", str(out), "--resume", *SEARCH],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    assert "best: trial" in result.output and "baseline (the base config)" in result.output

    trials = json.loads((out / TRIALS_FILE).read_text())
    assert [t["status"] for t in trials] == ["finished", "finished"]
    assert {t["params"]["train.lr"] for t in trials} == {1.0e-2, 5.0e-3}  # the baseline, the sample

    client = MlflowClient(registry.tracking_uri)
    parent = client.get_run(parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["resumed"] == "true"
    children = client.search_runs([parent.info.experiment_id], f"tags.{PARENT_TAG} = '{parent_run_id}'")
    runs: dict[str, list[str]] = {}
    for run in children:
        runs.setdefault(run.data.tags[TRIAL_TAG], []).append(run.info.status)
    by_lr = {t["params"]["train.lr"]: t["trial_id"] for t in trials}
    # The baseline ended before the kill: one run, not trained again. The sample was cut by the kill (its
    # run, if it had started one, ended as KILLED) and trained again to its end.
    assert runs[by_lr[1.0e-2]] == ["FINISHED"]
    assert sorted(runs[by_lr[5.0e-3]]) in (["FINISHED"], ["FINISHED", "KILLED"])
