"""Which backend calls one ``/v1/analyze`` makes, counted by the backends themselves: a real gateway process
in front of scripted backend processes (``fake_backend``) that count every call they get and keep its query.

The detector is called once per image, for tags and objects together (its ``/v1/analyze``, one decode for
both models), and only with the parts and options the request's features need; the captioner once, when a
feature needs the caption. The counts are read after the answer came back, so they are final.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.gateway_stack import post_analyze
from tests.helpers import ServiceProcess, image_bytes
from tests.services.gateway.fake_backend import Fakes, fakes, healthy  # noqa: F401 (fixtures)

pytestmark = pytest.mark.integration

DEFAULT_MAX_TAGS = 3  # not the settings' default, so the test sees the gateway's setting arrive


@pytest.fixture(scope="module")
def gateway(fakes: Fakes) -> Iterator[ServiceProcess]:  # noqa: F811
    service = fakes.gateway(default_max_tags=str(DEFAULT_MAX_TAGS))
    yield service
    service.stop(timeout_s=10)


def test_a_full_analysis_calls_the_detector_once_for_tags_and_objects(
    healthy: Fakes,  # noqa: F811
    gateway: ServiceProcess,
) -> None:
    response = post_analyze(gateway.url, image_bytes("red"))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["errors"] == []
    assert body["caption"]["text"] == "a fake cat on a mat"
    assert [t["name"] for t in body["tags"]] == ["tabby"] and [o["label"] for o in body["objects"]] == ["cat"]
    assert set(body["models"]) == {"caption", "tags", "objects"}
    # One call answered both parts, so both report its time.
    timings = body["timings"]
    assert timings["detector_tags_ms"] == timings["detector_objects_ms"] > 0

    detector = healthy.detector.seen()
    assert detector["calls"] == {"analyze": 1}
    (query,) = detector["queries"]
    assert query["features"] == "tags,objects" and query["top_k"] == str(DEFAULT_MAX_TAGS)
    assert "conf" not in query and "min_score" not in query  # the detector's own defaults
    assert healthy.captioner.seen()["calls"] == {"caption": 1}


@pytest.mark.parametrize(
    ("params", "captioner_calls", "detector_query"),
    [
        ({"features": "caption"}, 1, None),
        ({"features": "tags"}, 0, {"features": "tags", "top_k": str(DEFAULT_MAX_TAGS)}),
        ({"features": "objects", "min_confidence": "0.5"}, 0, {"features": "objects", "conf": "0.5"}),
        # Alt text asks for every part: the caption, and the labels its fallback is built from.
        ({"features": "alt_text"}, 1, {"features": "tags,objects", "top_k": str(DEFAULT_MAX_TAGS)}),
        (
            {"features": "objects,tags", "max_tags": "2", "min_confidence": "0.25"},
            0,
            {"features": "tags,objects", "top_k": "2", "min_score": "0.25", "conf": "0.25"},
        ),
    ],
    ids=["caption", "tags", "objects", "alt-text", "tags-and-objects"],
)
def test_each_feature_set_calls_what_it_needs_once(
    healthy: Fakes,  # noqa: F811
    gateway: ServiceProcess,
    params: dict[str, str],
    captioner_calls: int,
    detector_query: dict[str, str] | None,
) -> None:
    response = post_analyze(gateway.url, image_bytes("blue"), params=params)
    assert response.status_code == 200, response.text
    assert response.json()["errors"] == []
    assert sum(healthy.captioner.seen()["calls"].values()) == captioner_calls
    detector = healthy.detector.seen()
    if detector_query is None:
        assert detector["calls"] == {}
        return
    assert detector["calls"] == {"analyze": 1}
    (query,) = detector["queries"]
    assert {k: v for k, v in query.items() if k != "timeout_ms"} == detector_query


def test_a_batch_calls_the_detector_once_per_image(
    healthy: Fakes,  # noqa: F811
    gateway: ServiceProcess,
) -> None:
    files: list[tuple[str, Any]] = [
        ("files", (f"{c}.png", image_bytes(c), "image/png")) for c in ("red", "green", "blue")
    ]
    response = post_analyze(
        gateway.url, path="/v1/analyze/batch", files=files, params={"features": "tags,objects"}
    )
    assert response.status_code == 200, response.text
    assert response.json()["succeeded"] == 3
    assert healthy.detector.seen()["calls"] == {"analyze": 3}
    assert healthy.captioner.seen()["calls"] == {}
