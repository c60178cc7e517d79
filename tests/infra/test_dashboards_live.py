"""Every dashboard query returns data from a real Prometheus scraping the real services.

The stack is ``monitored_stack`` (``conftest.py``): the four services on loopback and a real Prometheus
scraping them every second with the real rule files. Traffic covers good requests, client errors and
server errors (the captioner's 503s, which also give the gateway partial results). Then every panel's
every query, with the template variables at "All", must give at least one finite sample, and every
template variable's ``label_values`` must find values.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

import httpx
import pytest
import yaml

from tests.helpers import ServiceProcess, wait_for
from tests.infra.conftest import MonitoredStack, encode
from tests.infra.infra_helpers import (
    DASHBOARDS,
    RULE_FILES,
    PanelQuery,
    PrometheusProcess,
    load_dashboard,
    panel_queries,
    substitute,
    template_values,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        shutil.which("prometheus") is None, reason="prometheus not installed (scripts/setup.sh)"
    ),
]

# Panels that cannot have data yet, each with the reason. The test fails when a panel lacks data and is
# not listed here, and also when a listed panel has data (then the entry is stale: delete it).
PENDING_PANELS: dict[tuple[str, str], str] = {}

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30), "yellow": (230, 230, 30)}


def _scraped_since(prometheus: PrometheusProcess, since: float) -> bool:
    """Every target answered a scrape that started after ``since`` (epoch seconds)."""
    targets = prometheus.api("targets")["activeTargets"]
    jobs = {job["job_name"] for job in prometheus.config["scrape_configs"]}
    return {t["labels"]["job"] for t in targets} == jobs and all(
        t["health"] == "up" and _epoch(t["lastScrape"]) > since + t["lastScrapeDuration"] for t in targets
    )


def _epoch(rfc3339: str) -> float:
    return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()


def _send_traffic(services: dict[str, ServiceProcess]) -> dict[str, list[int]]:
    """Good and bad requests to every service; returns the statuses each answered."""
    with contextlib.ExitStack() as stack:
        clients = {name: stack.enter_context(svc.client(timeout_s=30)) for name, svc in services.items()}
        return _traffic(clients)


def _traffic(clients: dict[str, httpx.Client]) -> dict[str, list[int]]:
    statuses: dict[str, list[int]] = {name: [] for name in clients}
    png = {colour: encode(rgb) for colour, rgb in COLOURS.items()}
    jpeg = encode((10, 10, 10), (120, 80), "JPEG")
    bad = {"text": b"just some text, not an image", "truncated": png["red"][:60]}

    def post(name: str, path: str, body: bytes, content_type: str = "image/png") -> httpx.Response:
        response = clients[name].post(path, content=body, headers={"content-type": content_type}, timeout=30)
        statuses[name].append(response.status_code)
        return response

    etl = clients["etl"]
    job = etl.post(
        "/v1/jobs",
        json={
            "source": "coco",
            "images": "small/images",
            "annotations": ["small/annotations/captions.json", "small/annotations/instances.json"],
            "out": "processed",
            "options": {"max_side": 64},
        },
    )
    assert job.status_code == 202, job.text
    statuses["etl"] += [
        job.status_code,
        etl.get("/v1/jobs").status_code,
        etl.get("/v1/jobs/no-such-job").status_code,
        etl.post("/v1/jobs", content=b"{not json", headers={"content-type": "application/json"}).status_code,
    ]

    for colour in COLOURS:
        post("captioner", "/v1/caption", png[colour])
        post("detector", "/v1/detect", png[colour])
        post("detector", "/v1/tags", png[colour])
        post("gateway", "/v1/analyze", png[colour], "application/octet-stream")
    post("gateway", "/v1/analyze", jpeg, "application/octet-stream")
    for name, path in [("captioner", "/v1/caption"), ("detector", "/v1/detect"), ("gateway", "/v1/analyze")]:
        post(name, path, bad["text"], "application/octet-stream")
        post(name, path, bad["truncated"], "application/octet-stream")
    # Pairs at once: the captioner's second is refused (503), and through the gateway that is a partial
    # result. Under heavy load the second may come after the first's batch has left the queue: try again
    # (for up to a minute, not a number of times: what it takes depends on how busy the cores are).
    refused = partial = False
    deadline = time.monotonic() + 60
    with ThreadPoolExecutor(2) as pool:
        while time.monotonic() < deadline:
            refused |= any(
                r.status_code == 503
                for r in pool.map(lambda c: post("captioner", "/v1/caption", png[c]), ("red", "blue"))
            )
            partial |= any(
                r.status_code == 200 and r.json().get("errors")
                for r in pool.map(lambda c: post("gateway", "/v1/analyze", png[c]), ("red", "blue"))
            )
            if refused and partial:
                break

    def job_done() -> bool:
        return etl.get(f"/v1/jobs/{job.json()['id']}").json()["status"] in ("succeeded", "failed")

    wait_for(job_done, 90, "the ETL job to finish", interval_s=0.1)
    return statuses


@pytest.fixture(scope="module")
def scraped(monitored_stack: MonitoredStack) -> dict[str, list[int]]:
    """Traffic sent between two scrapes of every target, and recorded by Prometheus and its rules."""
    prometheus = monitored_stack.prometheus
    start = time.time()
    wait_for(lambda: _scraped_since(prometheus, start - 3600), 30, "a first scrape of every target")
    statuses = _send_traffic(monitored_stack.services)
    sent = time.time()
    wait_for(lambda: _scraped_since(prometheus, sent), 30, "a scrape of every target after the traffic")
    time.sleep(1.5)  # one more rule evaluation on those samples
    return statuses


def _has_data(prometheus: PrometheusProcess, expr: str) -> bool:
    """At least one finite sample (a NaN quantile over no requests does not count)."""
    return any(math.isfinite(float(sample["value"][1])) for sample in prometheus.query(expr))


def test_traffic_had_good_and_bad_answers(scraped: dict[str, list[int]]) -> None:
    assert 503 in scraped["captioner"], scraped  # the server error the 5xx panels need
    for name in ("captioner", "detector", "gateway"):
        assert 200 in scraped[name] and {415, 422} <= set(scraped[name]), (name, scraped[name])
    assert {202, 200, 404, 400} <= set(scraped["etl"]), scraped["etl"]


def test_rule_files_are_loaded_and_healthy(
    monitored_stack: MonitoredStack, scraped: dict[str, list[int]]
) -> None:
    groups = monitored_stack.prometheus.api("rules")["groups"]
    expected = {
        (group["name"], rule.get("record") or rule.get("alert"))
        for path in RULE_FILES
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
    }
    loaded = {(group["name"], rule["name"]) for group in groups for rule in group["rules"]}
    assert loaded == expected
    unhealthy = [
        (rule["name"], rule.get("lastError"))
        for group in groups
        for rule in group["rules"]
        if rule["health"] != "ok"
    ]
    assert not unhealthy


def test_an_alert_becomes_active_from_live_traffic(
    monitored_stack: MonitoredStack, scraped: dict[str, list[int]]
) -> None:
    """The captioner's 503s make BatcherRejecting pending (firing after 2 minutes): rules see live data."""

    def rejecting() -> bool:
        alerts = monitored_stack.prometheus.api("alerts")["alerts"]
        return any(
            a["labels"]["alertname"] == "BatcherRejecting"
            and a["labels"]["job"] == "captioner"
            and a["labels"]["reason"] == "overloaded"
            and a["state"] in ("pending", "firing")
            for a in alerts
        )

    # Each evaluation (every second) may run late when the cores are busy: wait for it, within reason.
    wait_for(rejecting, 30, "BatcherRejecting to be pending for the captioner", interval_s=0.5)


def test_every_panel_query_returns_data(
    monitored_stack: MonitoredStack, scraped: dict[str, list[int]]
) -> None:
    prometheus = monitored_stack.prometheus
    queries: list[tuple[PanelQuery, str]] = []
    for path in DASHBOARDS:
        values = template_values(load_dashboard(path))
        queries += [(query, substitute(query.expr, values)) for query in panel_queries(path)]
    assert len(queries) > 40

    # Histogram quantiles and rates may need one more scrape or rule evaluation (later than planned when
    # the cores are busy): retry what is empty, for a while.
    empty = {query for query, expr in queries if not _has_data(prometheus, expr)}
    deadline = time.monotonic() + 30
    while empty and time.monotonic() < deadline:
        time.sleep(1)
        empty = {query for query, expr in queries if query in empty and not _has_data(prometheus, expr)}

    panels_without_data = {(q.dashboard, q.panel) for q in empty}
    missing = sorted(
        f"{q.dashboard} / {q.panel} / {q.ref_id}: {q.expr}"
        for q in empty
        if (q.dashboard, q.panel) not in PENDING_PANELS
    )
    assert not missing, "panels without data:\n" + "\n".join(missing)
    stale = sorted(set(PENDING_PANELS) - panels_without_data)
    assert not stale, f"these panels have data now: remove them from PENDING_PANELS: {stale}"


def test_every_template_variable_finds_values(
    monitored_stack: MonitoredStack, scraped: dict[str, list[int]]
) -> None:
    for path in DASHBOARDS:
        for variable in load_dashboard(path)["templating"]["list"]:
            if variable["type"] != "query":
                continue
            # label_values(metric, label) -> the label's values among the metric's series
            inner = variable["query"]["query"].removeprefix("label_values(").removesuffix(")")
            metric, label = (part.strip() for part in inner.rsplit(",", 1))
            result: list[dict[str, Any]] = monitored_stack.prometheus.query(f"count by ({label}) ({metric})")
            assert [r["metric"].get(label) for r in result if r["metric"].get(label)], (
                path.name,
                variable["name"],
            )
