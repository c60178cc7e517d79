"""More than one node, for real: a Ray head and a second Ray node, each started by ``ray start`` as its own
process tree on loopback (:mod:`tests.ray_cluster`), and the three ``snap2caption`` Ray commands (``train
--workers``, ``tune``, ``backfill``) joining them by address, each as its own process.

Each node offers one CPU. A training worker and a search trial ask for one each, so two of them can only run
one per node; a backfill's caption actor asks for 0.6 CPU and each decode task for 0.5, so once the actor
is up (the backfill waits for it before any image flows) decoding can only run on the other node. The tests
still read where the work ran from each run's own output (rank and trial nodes, the backfill's per-stage
nodes), not from this arithmetic.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from snap2caption.backfill.output import read_results
from snap2caption.registry import Registry
from tests.gateway_stack import CAPTIONS, _register_models
from tests.helpers import COLOURS, image_bytes
from tests.ray_cluster import RayCluster, ray_cluster  # noqa: F401 (fixture)
from tests.training.caption.conftest import caption_data, registry  # noqa: F401 (fixtures)
from training.tune.report import NODE_TAG, PARENT_TAG

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _run(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """A ``snap2caption`` command joining the cluster, as its own process; it must succeed."""
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=480)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


def test_two_worker_training_runs_one_rank_on_each_node(
    ray_cluster: RayCluster,  # noqa: F811
    caption_data: Path,  # noqa: F811
    registry: Registry,  # noqa: F811
    tmp_path: Path,
) -> None:
    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "snap2caption", "train", "caption", "--config", "tiny",
        "--data", str(caption_data), "--out", str(out), "--workers", "2", "--address", ray_cluster.address,
        "model.encoder.trainable=none", "max_steps=4", "batch_size=4", "threads=1",
    ]  # fmt: skip
    # The registry fixture set MLFLOW_TRACKING_URI in os.environ; the cluster's env was taken before it.
    done = _run(command, ray_cluster.env | {"MLFLOW_TRACKING_URI": registry.tracking_uri})

    nodes = dict(re.findall(r"rank (\d+): Ray node (\w+)", done.stdout))
    assert sorted(nodes) == ["0", "1"], done.stdout
    assert nodes["0"] != nodes["1"], f"both ranks ran on one node: {done.stdout}"
    assert "caption: 4 steps" in done.stdout
    assert (out / "model" / "model.safetensors").is_file()  # rank 0 saved the artifact...
    versions = MlflowClient(registry.tracking_uri).search_model_versions("name='captioner'")
    assert [int(v.version) for v in versions] == [1]  # ...and registered it, once


def test_search_runs_one_trial_on_each_node(
    ray_cluster: RayCluster,  # noqa: F811
    caption_data: Path,  # noqa: F811
    registry: Registry,  # noqa: F811
    tmp_path: Path,
) -> None:
    space = tmp_path / "space.yaml"
    space.write_text("train.lr: {choice: [3.0e-3]}\n")  # the base config, then one other learning rate
    out = tmp_path / "search"
    command = [
        sys.executable, "-m", "snap2caption", "tune", "caption", "--config", "tiny",
        "--data", str(caption_data), "--out", str(out), "--samples", "2", "--space", str(space),
        "--scheduler", "fifo", "--address", ray_cluster.address,
        "model.encoder.trainable=none", "train.max_steps=8", "train.eval_every=4",
        "train.captions_per_image=1", "train.threads=1",
    ]  # fmt: skip
    done = _run(command, ray_cluster.env | {"MLFLOW_TRACKING_URI": registry.tracking_uri})

    trials = json.loads((out / "trials.json").read_text())
    assert [t["status"] for t in trials] == ["finished", "finished"], trials
    assert all(t["evals"] == 2 for t in trials), trials
    nodes = {t["node"] for t in trials}
    assert len(nodes) == 2 and None not in nodes, f"both trials ran on one node: {done.stdout}"
    assert (out / "best.yaml").is_file()
    # Each trial is an MLflow child run of the search's run, tagged with the node it ran on.
    client = MlflowClient(registry.tracking_uri)
    [parent] = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], "tags.`tune.kind` = 'caption'"
    )
    children = client.search_runs([parent.info.experiment_id], f"tags.{PARENT_TAG} = '{parent.info.run_id}'")
    assert {run.data.tags[NODE_TAG] for run in children} == nodes


def test_backfill_decodes_on_one_node_and_captions_on_the_other(
    ray_cluster: RayCluster,  # noqa: F811
    mlflow_template_db: Path,
    tmp_path: Path,
) -> None:
    """One caption actor of 0.6 CPU, alive before any image flows (the backfill waits for its actors), leaves
    0.4 CPU on its node: the decode tasks (0.5 CPU each) can only run on the other node."""
    (tmp_path / "registry").mkdir()
    registry_uri = _register_models(tmp_path / "registry", mlflow_template_db)
    library = tmp_path / "library"
    library.mkdir()
    for copy in range(3):
        for colour in COLOURS:
            (library / f"{colour}{copy}.png").write_bytes(image_bytes(colour))
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "snap2caption", "backfill", "--input", str(library), "--out", str(out),
        "--features", "caption", "--actors", "1", "--actor-cpus", "0.6", "--batch-size", "2",
        "--tracking-uri", registry_uri, "--address", ray_cluster.address, "--no-progress",
    ]  # fmt: skip
    _run(command, ray_cluster.env)

    summary = json.loads((out / "summary.json").read_text())
    images = 3 * len(COLOURS)
    assert (summary["found"], summary["done"], summary["quarantined"]) == (images, images, 0)
    [decoded_on] = summary["nodes"]["decode"]
    [captioned_on] = summary["nodes"]["caption"]
    assert decoded_on != captioned_on, f"the backfill ran on one node only: {summary['nodes']}"
    caption_of = dict(zip(COLOURS, CAPTIONS, strict=True))
    rows = read_results(out).to_pylist()
    assert {row["path"]: row["caption"] for row in rows} == {
        f"{c}{copy}.png": caption_of[c] for c in COLOURS for copy in range(3)
    }
