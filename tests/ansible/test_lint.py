"""``ansible/`` lints clean and every playbook parses, against the hand-written example inventory."""

from __future__ import annotations

import pytest
import yaml

from tests.ansible.ansible_helpers import ANSIBLE_DIR, PLAYBOOKS, tool

EXAMPLE_INVENTORY = "inventories/example/hosts.yml"


def test_ansible_lint_passes_with_the_production_profile() -> None:
    result = tool("ansible-lint", "--nocolor", "--format=pep8", timeout_s=600)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    config = yaml.safe_load((ANSIBLE_DIR / ".ansible-lint").read_text())
    assert config["profile"] == "production"  # the strictest profile, not a weaker one that lets more by
    assert "Profile 'production' was required, and it passed" in result.stderr, result.stderr[-3000:]


def test_every_playbook_passes_syntax_check() -> None:
    assert {p.name for p in PLAYBOOKS} >= {"site.yml", "deploy.yml", "canary.yml", "rollback.yml"}
    result = tool(
        "ansible-playbook",
        "-i",
        EXAMPLE_INVENTORY,
        "--syntax-check",
        *(f"playbooks/{p.name}" for p in PLAYBOOKS),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("playbook: ") == len(PLAYBOOKS)


@pytest.mark.parametrize(
    ("playbook", "hosts"),
    [
        # every host of the example gets the role meant for it, and nothing more
        ("site.yml", {"s2c-api", "s2c-mlflow", "s2c-data", "s2c-gpu"}),
        ("deploy.yml", {"s2c-api", "s2c-data"}),
        ("canary.yml", {"s2c-api"}),
        ("train.yml", {"s2c-gpu"}),
    ],
)
def test_playbooks_target_the_right_hosts(playbook: str, hosts: set[str]) -> None:
    result = tool("ansible-playbook", "-i", EXAMPLE_INVENTORY, "--list-hosts", f"playbooks/{playbook}")
    assert result.returncode == 0, result.stderr[-3000:]
    listed = {line.strip() for line in result.stdout.splitlines() if line.startswith("      ")}
    assert listed == hosts, result.stdout


def test_canary_and_rollback_drive_the_release_commands() -> None:
    """The playbooks run `snap2caption release start|watch|rollback` on the API host (issue 16, item 1)."""
    canary = yaml.safe_load((ANSIBLE_DIR / "playbooks" / "canary.yml").read_text())
    commands = [
        t["ansible.builtin.command"]["cmd"] for t in canary[0]["tasks"] if "ansible.builtin.command" in t
    ]
    assert [c.split()[:3] for c in commands] == [
        ["snap2caption", "release", "start"],
        ["snap2caption", "release", "watch"],
    ]
    assert "--share {{ canary_share }}" in commands[0] and "--version {{ canary_version }}" in commands[0]
    rollback = yaml.safe_load((ANSIBLE_DIR / "playbooks" / "rollback.yml").read_text())
    [model_task] = rollback[0]["tasks"]
    assert (
        model_task["ansible.builtin.command"]["cmd"] == "snap2caption release rollback {{ rollback_model }}"
    )
