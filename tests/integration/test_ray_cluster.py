"""More than one node, for real: a Ray head and a second Ray node, each started by ``ray start`` as its own
process tree on loopback (:mod:`tests.ray_cluster`), and the ``snap2caption`` CLI joining them by address.

Each node offers one CPU and each training worker asks for one, so two workers can only run one per node;
the test still reads the node of each rank from the run's own output.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from snap2caption.registry import Registry
from tests.ray_cluster import RayCluster, ray_cluster  # noqa: F401 (fixture)
from tests.training.caption.conftest import caption_data, registry  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


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
    env = ray_cluster.env | {"MLFLOW_TRACKING_URI": registry.tracking_uri}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=480)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]

    nodes = dict(re.findall(r"rank (\d+): Ray node (\w+)", done.stdout))
    assert sorted(nodes) == ["0", "1"], done.stdout
    assert nodes["0"] != nodes["1"], f"both ranks ran on one node: {done.stdout}"
    assert "caption: 4 steps" in done.stdout
    assert (out / "model" / "model.safetensors").is_file()  # rank 0 saved the artifact...
    versions = MlflowClient(registry.tracking_uri).search_model_versions("name='captioner'")
    assert [int(v.version) for v in versions] == [1]  # ...and registered it, once
