"""The Prometheus config and rules pass promtool, and the rule unit tests cover every alert.

promtool comes with the Debian ``prometheus`` package that ``scripts/setup.sh`` installs, so CI runs
these; on a machine without it they skip and say why.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.infra.infra_helpers import (
    PROMETHEUS_CONFIG,
    PROMETHEUS_DIR,
    ROOT,
    RULE_FILES,
    RULE_TESTS,
    SERVICES,
    alert_rules,
)

PROMTOOL = shutil.which("promtool")
pytestmark = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (scripts/setup.sh installs Debian's prometheus)"
)


def promtool(*args: str | Path, cwd: Path = PROMETHEUS_DIR) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


def test_config_is_valid_and_scrapes_every_service() -> None:
    result = promtool("check", "config", PROMETHEUS_CONFIG)
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(SERVICES) <= set(jobs)
    for name, port in zip(SERVICES, (8000, 8001, 8002, 8003), strict=True):
        assert jobs[name]["static_configs"] == [{"targets": [f"127.0.0.1:{port}"]}]
    # `check config` reads the rule files it names: make sure it names all of them
    assert config["rule_files"] == ["rules/*.yml"]


def test_rule_files_are_valid() -> None:
    assert RULE_FILES
    result = promtool("check", "rules", *RULE_FILES)
    assert result.returncode == 0, result.stdout + result.stderr


def test_rule_unit_tests_pass() -> None:
    assert RULE_TESTS
    result = promtool("test", "rules", *RULE_TESTS)
    assert result.returncode == 0, result.stdout + result.stderr


def _alert_tests() -> list[dict[str, Any]]:
    return [
        case
        for path in RULE_TESTS
        for test in yaml.safe_load(path.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
    ]


def test_every_alert_is_tested_firing_and_quiet() -> None:
    """Each alert has a case where it fires and a case where it must not."""
    cases = _alert_tests()
    for rule in alert_rules():
        mine = [case for case in cases if case["alertname"] == rule["alert"]]
        assert any(case["exp_alerts"] for case in mine), f"{rule['alert']}: no test where it fires"
        assert any(not case["exp_alerts"] for case in mine), f"{rule['alert']}: no test where it stays quiet"


def test_unit_tests_catch_alerts_that_never_fire(tmp_path: Path) -> None:
    """Break every alert (its expression can never be true): the unit tests must fail on each one.

    promtool runs every test group and reports each failed case, so one run checks them all.
    """
    shutil.copytree(PROMETHEUS_DIR / "rules", tmp_path / "rules")
    shutil.copytree(PROMETHEUS_DIR / "tests", tmp_path / "tests")
    path = tmp_path / "rules" / "alerts.yml"
    rules = yaml.safe_load(path.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule["expr"] = f"({rule['expr']}) and on () vector(0) > 1"  # same labels, never a sample
    path.write_text(yaml.safe_dump(rules, sort_keys=False))
    result = promtool("test", "rules", *sorted((tmp_path / "tests").glob("*.yml")), cwd=tmp_path)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    missed = [rule["alert"] for rule in alert_rules() if f"alertname: {rule['alert']}," not in output]
    assert not missed, f"the unit tests pass with these alerts broken: {missed}"


def _github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_alert_has_severity_summary_description_and_a_runbook_section() -> None:
    readme = (ROOT / "infra" / "README.md").read_text()
    anchors = {_github_anchor(m) for m in re.findall(r"^#+ (.+)$", readme, flags=re.MULTILINE)}
    for rule in alert_rules():
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        annotations = rule["annotations"]
        assert annotations["summary"] and annotations["description"], rule["alert"]
        page, _, anchor = annotations["runbook_url"].partition("#")
        assert page == "infra/README.md", rule["alert"]
        assert anchor in anchors, f"{rule['alert']}: no section #{anchor} in infra/README.md"
