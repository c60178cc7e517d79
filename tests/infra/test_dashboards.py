"""The Grafana dashboards and provisioning are well-formed (Grafana itself is not installable here:
Debian bookworm has no ``grafana`` package, so the JSON is checked for what Grafana needs, and every
query is run through a real Prometheus by ``test_dashboards_live.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.infra.infra_helpers import (
    DASHBOARDS,
    GRAFANA_DIR,
    GRAFANA_SUBSTITUTIONS,
    ROOT,
    iter_panels,
    load_dashboard,
    panel_queries,
    variables_used,
)

DATASOURCE = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}


def _provisioned_datasource() -> dict[str, Any]:
    config = yaml.safe_load((GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml").read_text())
    [datasource] = config["datasources"]
    return dict(datasource)


def test_the_three_dashboards_exist_with_unique_uids() -> None:
    uids = [load_dashboard(path)["uid"] for path in DASHBOARDS]
    assert sorted(uids) == ["snap2caption-api", "snap2caption-data", "snap2caption-models"]
    for path in DASHBOARDS:
        assert path.name == f"{load_dashboard(path)['uid']}.json"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_dashboard_is_valid_grafana_json(path: Path) -> None:
    dashboard = load_dashboard(path)
    assert dashboard["title"].startswith("Snap2Caption / ")
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 36
    assert "snap2caption" in dashboard["tags"]
    variables = dashboard["templating"]["list"]
    source = variables[0]
    assert (source["name"], source["type"], source["query"]) == ("DS_PROMETHEUS", "datasource", "prometheus")
    assert source["current"]["value"] == _provisioned_datasource()["uid"]
    defined = {v["name"] for v in variables} | set(GRAFANA_SUBSTITUTIONS)
    for variable in variables[1:]:
        assert variable["type"] == "query" and variable["datasource"] == DATASOURCE
        assert variable["query"]["query"].startswith("label_values(")
        assert variable["allValue"] == ".+" and variable["includeAll"]

    panels = list(iter_panels(dashboard["panels"]))
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    boxes: list[tuple[int, int, int, int]] = []
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
        box = (grid["x"], grid["y"], grid["x"] + grid["w"], grid["y"] + grid["h"])
        for other in boxes:  # no two panels overlap
            assert box[2] <= other[0] or other[2] <= box[0] or box[3] <= other[1] or other[3] <= box[1], (
                panel["title"]
            )
        boxes.append(box)
        if panel["type"] == "row":
            continue
        assert panel["type"] in ("timeseries", "stat"), panel["title"]
        assert panel["datasource"] == DATASOURCE, panel["title"]
        targets = panel["targets"]
        assert targets, f"{panel['title']}: no query"
        assert len({t["refId"] for t in targets}) == len(targets)
        for target in targets:
            assert target["datasource"] == DATASOURCE and target["expr"].strip()
            undefined = variables_used(target["expr"]) - defined
            assert not undefined, f"{panel['title']}: undefined variables {undefined}"


def test_provisioning_points_grafana_at_prometheus_and_the_dashboards() -> None:
    datasource = _provisioned_datasource()
    assert (datasource["type"], datasource["uid"], datasource["access"]) == (
        "prometheus",
        "prometheus",
        "proxy",
    )
    assert datasource["url"] == "http://127.0.0.1:9090"  # infra/prometheus/prometheus.yml's own target
    providers = yaml.safe_load((GRAFANA_DIR / "provisioning" / "dashboards" / "snap2caption.yml").read_text())
    [provider] = providers["providers"]
    assert provider["type"] == "file"
    # docker-compose mounts the dashboards where the provider reads them, and the provisioning folder
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    volumes = compose["services"]["grafana"]["volumes"]
    assert f"./infra/grafana/dashboards:{provider['options']['path']}:ro" in volumes
    assert "./infra/grafana/provisioning:/etc/grafana/provisioning:ro" in volumes
    assert "./infra/prometheus:/etc/prometheus:ro" in compose["services"]["prometheus"]["volumes"]


# The gateway's series that say which release track answered (services/gateway/metrics.py).
TRACKED_METRICS = (
    "snap2caption_gateway_backend_requests_total", "snap2caption_gateway_backend_duration_seconds",
    "snap2caption_circuit_breaker_state", "snap2caption_caption_confidence", "snap2caption_caption_words",
    "snap2caption_tags_per_image", "snap2caption_objects_per_image", "snap2caption_alt_text_fallbacks_total",
    "snap2caption_partial_results_total",
)  # fmt: skip


def test_every_panel_of_a_tracked_series_is_split_by_track() -> None:
    """During a canary the operator compares the tracks: no panel may add canary and production up."""
    import re

    checked = 0
    for path in DASHBOARDS:
        for query in panel_queries(path):
            if not any(name in query.expr for name in TRACKED_METRICS):
                continue
            checked += 1
            groupings = re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", query.expr)
            assert groupings, f"{query.panel} / {query.ref_id}: aggregates without grouping"
            for labels in groupings:
                assert "track" in {label.strip() for label in labels.split(",")}, (
                    f"{query.panel} / {query.ref_id} adds the tracks up: {query.expr}"
                )
    assert checked >= 10


def test_the_api_dashboard_has_the_release_panels() -> None:
    [api] = [path for path in DASHBOARDS if path.stem == "snap2caption-api"]
    exprs = " ".join(query.expr for query in panel_queries(api))
    for name in (
        "snap2caption_release_canary_share", "snap2caption_release_canary_version",
        "snap2caption_release_decisions",
    ):  # fmt: skip
        assert name in exprs
