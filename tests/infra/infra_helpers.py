"""Paths, dashboard parsing and a real Prometheus process, shared by the monitoring tests."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.helpers import free_port, wait_for

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "infra" / "prometheus"
PROMETHEUS_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
RULE_FILES = sorted((PROMETHEUS_DIR / "rules").glob("*.yml"))
RULE_TESTS = sorted((PROMETHEUS_DIR / "tests").glob("*.yml"))
GRAFANA_DIR = ROOT / "infra" / "grafana"
DASHBOARDS = sorted((GRAFANA_DIR / "dashboards").glob("*.json"))
SERVICES = ("gateway", "captioner", "detector", "etl")

# What the live test puts for Grafana's variables: every value of a template variable (its allValue),
# and windows that hold every 1-s scrape the test makes (the traffic takes a minute or more on busy cores).
GRAFANA_SUBSTITUTIONS = {"__rate_interval": "5m", "__range": "10m", "__interval": "15s"}
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")


@dataclass(frozen=True)
class PanelQuery:
    """One target of one panel: where it is, and its PromQL before substitution."""

    dashboard: str  # uid
    panel: str  # title
    ref_id: str
    expr: str


def load_dashboard(path: Path) -> dict[str, Any]:
    """One dashboard JSON."""
    dashboard: dict[str, Any] = json.loads(path.read_text())
    return dashboard


def iter_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, rows' collapsed children included."""
    for panel in panels:
        yield panel
        yield from iter_panels(panel.get("panels", []))


def panel_queries(path: Path) -> list[PanelQuery]:
    """Every PromQL target of every panel of a dashboard."""
    dashboard = load_dashboard(path)
    return [
        PanelQuery(dashboard["uid"], panel["title"], target["refId"], target["expr"])
        for panel in iter_panels(dashboard["panels"])
        for target in panel.get("targets", [])
    ]


def variables_used(text: str) -> set[str]:
    """Names of the ``$var`` / ``${var}`` / ``${var:format}`` references in a string."""
    return {a or b for a, b in _VARIABLE.findall(text)}


def substitute(expr: str, values: Mapping[str, str]) -> str:
    """Replace Grafana variables in ``expr`` with ``values`` (KeyError names a variable left unset)."""
    return _VARIABLE.sub(lambda m: values[m.group(1) or m.group(2)], expr)


def template_values(dashboard: dict[str, Any]) -> dict[str, str]:
    """The value each template variable takes when "All" is selected, plus Grafana's built-ins."""
    values = dict(GRAFANA_SUBSTITUTIONS)
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            values[variable["name"]] = variable["allValue"]
    return values


def alert_rules() -> list[dict[str, Any]]:
    """Every alerting rule of the rule files."""
    return [
        rule
        for path in RULE_FILES
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
        if "alert" in rule
    ]


class PrometheusProcess:
    """A real ``prometheus`` on a free loopback port, with its own config and TSDB under ``workdir``.

    Args:
        workdir: Scratch folder for the config, the data and the log.
        scrape_targets: ``job -> ["host:port", ...]``.
        interval_s: Scrape and rule-evaluation interval.
    """

    def __init__(
        self, workdir: Path, scrape_targets: Mapping[str, list[str]], interval_s: float = 1.0
    ) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config_path = workdir / "prometheus.yml"
        self.log_path = workdir / "prometheus.log"
        self.process: subprocess.Popen[bytes] | None = None
        # one client for every call: httpx.get would build an SSL context each time (~40 ms of CPU)
        self.http = httpx.Client(base_url=self.url, timeout=10)
        self.config = config_for_targets(scrape_targets, interval_s, self_target=f"127.0.0.1:{self.port}")
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))

    def start(self, timeout_s: float = 30.0) -> PrometheusProcess:
        binary = shutil.which("prometheus")
        assert binary is not None, "prometheus is not installed (scripts/setup.sh installs it)"
        command = [
            binary,
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={self.workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=warn",
        ]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir)
        wait_for(self._ready, timeout_s, f"prometheus on {self.url}", interval_s=0.1)
        return self

    def _ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"prometheus exited with {self.process.returncode}:\n{self.log()}")
        try:
            return self.http.get("/-/ready").status_code == 200
        except httpx.TransportError:
            return False

    def api(self, path: str, **params: str) -> Any:
        """``GET /api/v1/<path>``'s ``data``, after checking the status is success."""
        response = self.http.get(f"/api/v1/{path}", params=params)
        body = response.json()
        assert body.get("status") == "success", f"{path} {params}: {response.status_code} {body}"
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's vector (or a scalar as a one-element list)."""
        data = self.api("query", query=expr)
        if data["resultType"] == "vector":
            result: list[dict[str, Any]] = data["result"]
            return result
        return [{"metric": {}, "value": data["result"]}]

    def stop(self) -> None:
        self.http.close()
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def config_for_targets(
    scrape_targets: Mapping[str, list[str]], interval_s: float, self_target: str
) -> dict[str, Any]:
    """The real ``prometheus.yml`` pointed at test ports, with the real rule files and a short interval.

    Jobs of the real config without a target here are dropped (a service the test does not run);
    a job the real config lacks is an error, so the test cannot scrape what production would not.
    """
    config: dict[str, Any] = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    interval = f"{int(interval_s * 1000)}ms"
    config["global"].update(scrape_interval=interval, evaluation_interval=interval, scrape_timeout=interval)
    config["rule_files"] = [str(PROMETHEUS_DIR / pattern) for pattern in config["rule_files"]]
    targets = {**scrape_targets, "prometheus": [self_target]}
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    unknown = set(targets) - jobs
    assert not unknown, f"jobs not in {PROMETHEUS_CONFIG}: {unknown}"
    kept = []
    for job in config["scrape_configs"]:
        if job["job_name"] in targets:
            job["static_configs"] = [{"targets": targets[job["job_name"]]}]
            kept.append(job)
    config["scrape_configs"] = kept
    return config
