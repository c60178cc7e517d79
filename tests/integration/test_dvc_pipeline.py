"""`dvc repro etl` runs the repository's real data stages offline end to end, and a second run does nothing.

The model stages (features, training, eval, export) have their own tests; here only the data stages run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture()
def dvc_project(tmp_path: Path) -> Path:
    """A scratch git + DVC project holding the repo's dvc.yaml and params.yaml, scaled down."""
    if shutil.which("git") is None:
        pytest.fail("git is required for DVC")
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["synth"]["images"] = 40  # same stages and flags, fewer images
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    dvc = str(Path(sys.executable).with_name("dvc"))
    for cmd in (
        ["git", "init", "-q"],
        [dvc, "init", "-q"],
        [dvc, "config", "core.analytics", "false"],
        # Its own DVC state and index, not the machine-wide /var/tmp/dvc that other projects share.
        [dvc, "config", "core.site_cache_dir", str(tmp_path / ".dvc" / "site")],
    ):
        assert _run(cmd, tmp_path).returncode == 0
    return tmp_path


def test_dvc_repro_runs_offline_and_second_run_is_a_noop(dvc_project: Path) -> None:
    dvc = str(Path(sys.executable).with_name("dvc"))
    first = _run([dvc, "repro", "etl"], dvc_project)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "Running stage 'synth'" in first.stdout and "Running stage 'etl'" in first.stdout

    manifests = dvc_project / "data" / "processed" / "manifests"
    rows = sum(pq.read_table(manifests / f"{split}.parquet").num_rows for split in ("train", "val", "test"))
    assert rows == 40
    lock = yaml.safe_load((dvc_project / "dvc.lock").read_text())
    assert {"synth", "etl"} <= set(lock["stages"])

    second = _run([dvc, "repro", "etl"], dvc_project)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "Running stage" not in second.stdout
    assert "up to date" in second.stdout.lower()
    status = _run([dvc, "status", "etl"], dvc_project)
    assert "up to date" in status.stdout.lower(), status.stdout

    # A changed parameter re-runs exactly the stage that depends on it.
    params = yaml.safe_load((dvc_project / "params.yaml").read_text())
    params["etl"]["max_side"] = 128
    (dvc_project / "params.yaml").write_text(yaml.safe_dump(params))
    third = _run([dvc, "repro", "etl"], dvc_project)
    assert third.returncode == 0, third.stdout + third.stderr
    assert "Running stage 'etl'" in third.stdout and "Running stage 'synth'" not in third.stdout
