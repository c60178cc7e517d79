"""Where a training run came from: the git commit of the code and the version of the dataset.

Both go into MLflow tags, the registered version's tags and the model card, so a model can be traced back
to the exact code and data that made it.
"""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

import yaml

from snap2caption.data.etl import manifests_version

logger = logging.getLogger(__name__)


def git_commit(cwd: str | os.PathLike[str] | None = None) -> tuple[str, bool]:
    """``(commit sha, dirty)`` of the git checkout around ``cwd``; ``("unknown", False)`` outside one."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown", False
    return sha, bool(status.strip())


def _find_upwards(start: Path, name: str) -> Path | None:
    for folder in (start, *start.parents):
        if (folder / name).is_file():
            return folder / name
    return None


def dvc_md5(path: str | os.PathLike[str]) -> str | None:
    """The md5 that ``dvc.lock`` records for output ``path`` (a folder's ``.dir`` md5), or None.

    ``dvc.lock`` is looked for in the current folder and its parents; the output must be inside that folder.
    """
    target = Path(path).resolve()
    lock = _find_upwards(Path.cwd().resolve(), "dvc.lock")
    if lock is None or not target.is_relative_to(lock.parent):
        return None
    try:
        data = yaml.safe_load(lock.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        logger.warning("cannot read %s: %s", lock, exc)
        return None
    relative = target.relative_to(lock.parent).as_posix()
    for stage in (data.get("stages") or {}).values():
        for out in stage.get("outs") or []:
            if str(out.get("path", "")).rstrip("/") == relative and out.get("md5"):
                return str(out["md5"])
    return None


def dataset_version(data_dir: str | os.PathLike[str]) -> str:
    """A version string for an ETL output folder.

    ``dvc:<md5>`` when ``dvc.lock`` records the folder (the DVC-tracked dataset), else
    ``manifests:<sha256[:16]>`` over the names and bytes of its ``manifests/*.parquet`` (the version the
    ETL records in its drift reference, :func:`~snap2caption.data.etl.manifests_version`).
    """
    md5 = dvc_md5(data_dir)
    if md5:
        return f"dvc:{md5}"
    return manifests_version(Path(data_dir) / "manifests")
