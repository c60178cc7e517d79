"""The roles' templates that only real hosts run, rendered for the example inventory's hosts and checked:
Prometheus' configuration by promtool with the project's rules, MLflow's unit by what it must say."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.ansible.ansible_helpers import ROOT, tool

RENDER = Path(__file__).with_name("render.yml")


def render(host: str, templates: list[str], out: Path) -> None:
    variables = {"render_host": host, "render_out": str(out), "render_templates": templates}
    result = tool(
        "ansible-playbook", "-i", "inventories/example/hosts.yml", str(RENDER), "-e", json.dumps(variables)
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool not installed (scripts/setup.sh installs it)"
)
def test_prometheus_config_scrapes_the_inventorys_hosts_and_passes_promtool(tmp_path: Path) -> None:
    render("s2c-mlflow", ["monitoring/templates/prometheus.yml.j2"], tmp_path)
    shutil.copytree(ROOT / "infra" / "prometheus" / "rules", tmp_path / "rules")
    checked = subprocess.run(
        ["promtool", "check", "config", str(tmp_path / "prometheus.yml")], capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 2 rule files found" in checked.stdout, checked.stdout
    config = yaml.safe_load((tmp_path / "prometheus.yml").read_text())
    targets = {job["job_name"]: job["static_configs"][0]["targets"] for job in config["scrape_configs"]}
    assert targets == {
        "gateway": ["192.168.100.10:8000"],
        "captioner": ["192.168.100.10:8001"],
        "detector": ["192.168.100.10:8002"],
        "etl": ["192.168.100.12:8003"],
        "prometheus": ["127.0.0.1:9090"],
    }
    # everything but the targets is the loopback configuration of `make up`
    loopback = yaml.safe_load((ROOT / "infra" / "prometheus" / "prometheus.yml").read_text())
    assert config["global"] == loopback["global"] and config["rule_files"] == loopback["rule_files"]


def test_mlflow_unit_serves_artifacts_to_the_private_network_and_the_proxy(tmp_path: Path) -> None:
    render("s2c-mlflow", ["registry/templates/mlflow.service.j2"], tmp_path)
    unit = (tmp_path / "mlflow.service").read_text()
    [exec_start] = [line for line in unit.splitlines() if line.startswith("ExecStart=")]
    args = exec_start.split()
    assert args[args.index("--allowed-hosts") + 1].split(",") == [
        "192.168.100.11:*", "localhost:*", "127.0.0.1:*", "203.0.113.10:*",  # the API host's proxy
    ]  # fmt: skip
    assert "--serve-artifacts" in args and "--backend-store-uri" in args
    assert "/var/lib/snap2caption/mlflow-artifacts" in args  # on the data volume (base_data_mount)
