"""The data pipeline is byte-for-byte reproducible: the same params give the same files and the same dvc.lock.

`dvc repro etl` runs the repository's real stages (scaled down to 80 scenes) in two scratch projects whose
folders differ (and differ in length, as clones do); a third builds the same stages by hand with one
worker process instead of a pool. Every file each run leaves must hash the same, at the same relative path,
and both locks must record the same output hashes, so a fresh clone's `dvc repro` matches the committed lock.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from snap2caption.launcher import child_env

REPO = Path(__file__).resolve().parents[2]
DVC = str(Path(sys.executable).with_name("dvc"))
OUTPUTS = ("data/synth", "data/processed")
pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, cwd=cwd, env=child_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{args}: {result.stdout}{result.stderr}"
    return result


def _project(root: Path) -> Path:
    """A scratch git + DVC project with the repository's pipeline, ignore rules and params (80 scenes)."""
    root.mkdir(parents=True)
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(REPO / name, root / name)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["synth"]["images"] = 80  # over 64: synth renders in a process pool, and the ETL decodes in one
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    for cmd in (
        ["git", "init", "-q"],
        [DVC, "init", "-q"],
        [DVC, "config", "core.analytics", "false"],
        # DVC's state (file hashes by inode and mtime) and index live in /var/tmp/dvc by default, shared by
        # every project on the machine and keyed by folder; each project here keeps its own.
        [DVC, "config", "core.site_cache_dir", str(root / ".dvc" / "site")],
    ):
        _run(cmd, root)
    return root


def _hashes(root: Path, ignored: set[str]) -> dict[str, str]:
    """sha256 of every file under the pipeline's outputs, by path relative to ``root``."""
    found = {}
    for output in OUTPUTS:
        for path in sorted((root / output).rglob("*")):
            rel = path.relative_to(root).as_posix()
            if path.is_file() and rel not in ignored:
                found[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def _differences(found: dict[str, str], expected: dict[str, str]) -> str:
    """What a failed comparison shows: the paths missing, extra or with other bytes (a few of each)."""
    missing = sorted(expected.keys() - found.keys())
    extra = sorted(found.keys() - expected.keys())
    changed = sorted(k for k in expected.keys() & found.keys() if expected[k] != found[k])
    return "; ".join(
        f"{name} {paths[:5]} ({len(paths)})"
        for name, paths in [("missing", missing), ("extra", extra), ("changed", changed)]
    )


def _outs(root: Path) -> dict[str, dict[str, object]]:
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    return {out["path"]: out for stage in lock["stages"].values() for out in stage.get("outs", [])}


def test_two_runs_in_different_folders_give_identical_files_and_locks(tmp_path: Path) -> None:
    first = _project(tmp_path / "a")
    second = _project(tmp_path / "another-clone-in-a-longer-folder" / "b")
    for project in (first, second):
        _run([DVC, "repro", "etl"], project)
        status = _run([DVC, "status", "etl"], project)
        assert "up to date" in status.stdout.lower(), status.stdout + status.stderr

    # The ETL's incremental cache holds absolute paths and file times: DVC leaves it out of the hash.
    cache = "data/processed/.etl_cache.json"
    assert (first / cache).is_file()
    assert _run([DVC, "check-ignore", cache], first).stdout.strip() == cache
    files = _hashes(first, ignored={cache})
    assert len(files) > 2 * 80  # images, labels, manifests, annotations: the comparison is not vacuous
    second_files = _hashes(second, ignored={cache})
    assert second_files == files, _differences(second_files, files)
    assert _outs(first) == _outs(second)

    # The same stage commands with one worker instead of a pool: the order work finishes in changes nothing.
    third = tmp_path / "c"
    third.mkdir()
    lock = yaml.safe_load((first / "dvc.lock").read_text())
    for stage in ("synth", "etl"):
        _run(["/bin/sh", "-c", f"{lock['stages'][stage]['cmd']} --workers 1"], third)
    third_files = _hashes(third, ignored={cache})
    assert third_files == files, _differences(third_files, files)
