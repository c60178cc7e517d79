"""Running ``ansible/`` in tests: the tools of this venv, the project's ansible.cfg, results as data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
ANSIBLE_DIR = ROOT / "ansible"
PLAYBOOKS = sorted((ANSIBLE_DIR / "playbooks").glob("*.yml"))
BIN = Path(sys.executable).parent  # ansible-playbook, ansible-lint: installed beside this interpreter


def ansible_env(**extra: str) -> dict[str, str]:
    """The environment the Ansible tools run in: the project's ansible.cfg, this venv first on PATH."""
    return {
        **os.environ,
        "ANSIBLE_CONFIG": str(ANSIBLE_DIR / "ansible.cfg"),
        "ANSIBLE_NOCOLOR": "1",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        **extra,
    }


def tool(name: str, *args: str, timeout_s: float = 300, **env: str) -> subprocess.CompletedProcess[str]:
    """Run an Ansible tool (``ansible-playbook``, ``ansible-lint``...) in ``ansible/``."""
    return subprocess.run(
        [str(BIN / name), *args],
        cwd=ANSIBLE_DIR,
        env=ansible_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


@dataclass
class PlaybookRun:
    """One ``ansible-playbook`` run, read from the JSON callback."""

    returncode: int
    stats: dict[str, dict[str, int]]  # host -> ok, changed, failed, unreachable, skipped...
    report: dict[str, Any]

    def changed_tasks(self) -> list[str]:
        """``host: task`` for every task result that reported a change."""
        return [
            f"{host}: {task['task']['name']}"
            for play in self.report.get("plays", [])
            for task in play["tasks"]
            for host, result in task["hosts"].items()
            if result.get("changed")
        ]

    def failures(self) -> str:
        """What failed, task by task, for an assertion message."""
        lines = []
        for play in self.report.get("plays", []):
            for task in play["tasks"]:
                for host, result in task["hosts"].items():
                    if result.get("failed") or result.get("unreachable"):
                        detail = {k: result.get(k) for k in ("msg", "stderr", "stdout") if result.get(k)}
                        lines.append(f"{host}: {task['task']['name']}: {json.dumps(detail)[:3000]}")
        return "\n".join(lines)


def run_playbook(playbook: str, inventory: Path, *args: str, timeout_s: float = 900) -> PlaybookRun:
    """``ansible-playbook -i INVENTORY playbooks/PLAYBOOK ARGS``, its results as a :class:`PlaybookRun`."""
    result = tool(
        "ansible-playbook",
        "-i",
        str(inventory),
        f"playbooks/{playbook}",
        *args,
        timeout_s=timeout_s,
        ANSIBLE_STDOUT_CALLBACK="ansible.posix.json",
    )
    try:
        report = json.loads(result.stdout)
    except json.JSONDecodeError:
        raise AssertionError(
            f"ansible-playbook {playbook}: {result.stdout[-3000:]}{result.stderr[-3000:]}"
        ) from None
    return PlaybookRun(result.returncode, report.get("stats", {}), report)
