"""The detector's training domain in the service: an image outside it gets no objects (withheld and
counted) unless the request includes them; ``/v1/analyze`` does the same for its objects; tags are not
checked. In process (FastAPI's test client) on ``detector-domain``: the random detector with a domain fitted
on synthetic scenes (``conftest.with_domain``)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from services.detector.app import create_app
from services.detector.config import Settings
from snap2caption.imaging import decode_image
from snap2caption.models import detector as detector_model
from snap2caption.models.detector import Detector
from tests.services.detector.conftest import (
    DOMAIN_DETECTOR,
    Artifacts,
    assert_same_objects,
    photo_bytes,
    synthetic_scenes,
)
from training.detector.domain import real_photos

# The photos issue 13 was filed on (scikit-image's; motorcycle_left is stereo_motorcycle's left view).
ISSUE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left")


@pytest.fixture(scope="module")
def client(artifacts: Artifacts, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    settings = Settings(
        tracking_uri=artifacts.uri,
        model_cache_dir=tmp_path_factory.mktemp("domain-cache"),
        poll_interval_s=0,
        detector_model=DOMAIN_DETECTOR,
    )
    with TestClient(create_app(settings)) as test_client:
        deadline = time.monotonic() + 60
        while test_client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, test_client.get("/readyz").text
            time.sleep(0.1)
        yield test_client


@pytest.fixture(scope="module")
def direct(artifacts: Artifacts) -> Detector:
    return detector_model.load(artifacts.domain_detector, "onnx")


def detect(client: TestClient, data: bytes, path: str = "/v1/detect", **params: Any) -> dict[str, Any]:
    response = client.post(path, content=data, headers={"content-type": "image/png"}, params=params)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def test_real_photos_get_no_objects_unless_asked_for(client: TestClient, direct: Detector) -> None:
    photos = real_photos()
    assert photos is not None
    out_of_domain, withheld = [], 0
    for name, image in photos:
        data = photo_bytes(image)
        expected = direct.analyze([decode_image(data).image])[0]
        assert expected.domain is not None
        [result] = detect(client, data)["results"]
        everything = detect(client, data, include_out_of_domain="true")
        [flagged] = everything["results"]
        assert everything["options"]["include_out_of_domain"] is True
        assert result["in_domain"] == flagged["in_domain"] == expected.domain.in_domain, name
        assert (
            result["domain_score"] == flagged["domain_score"] == pytest.approx(expected.domain.domain_score)
        )
        assert_same_objects(flagged["objects"], expected.objects)  # asked for: all of them, flagged
        assert flagged["withheld"] == 0
        if result["in_domain"]:
            assert_same_objects(result["objects"], expected.objects)
            assert result["withheld"] == 0
        else:
            out_of_domain.append(name)
            assert result["objects"] == []  # no detections as such
            assert result["withheld"] == len(expected.objects)
            withheld += result["withheld"]
    assert set(ISSUE_PHOTOS) <= set(out_of_domain), out_of_domain
    assert withheld > len(out_of_domain)  # the random detector finds boxes everywhere: real withholding


def test_synthetic_scenes_keep_their_objects(client: TestClient, direct: Detector) -> None:
    scenes = synthetic_scenes(60, seed=23)  # a seed neither the fit nor the calibration saw
    in_domain = 0
    for data in scenes:
        [result] = detect(client, data)["results"]
        expected = direct.analyze([decode_image(data).image])[0]
        assert expected.domain is not None and result["in_domain"] == expected.domain.in_domain
        if result["in_domain"]:
            in_domain += 1
            assert_same_objects(result["objects"], expected.objects)
            assert result["withheld"] == 0
    # False-rejection rate 0.02, calibrated on 200 scenes: P(Binomial(60, 0.02) > 6) = 1.4e-4, and the
    # calibration's own spread (Beta(4, 197)) puts the rate above 0.1 with probability ~2e-5.
    assert in_domain >= 0.9 * len(scenes), in_domain


def test_analyze_withholds_objects_but_not_tags(client: TestClient) -> None:
    photos = dict(real_photos(ISSUE_PHOTOS[:1]) or [])
    data = photo_bytes(photos["astronaut"])
    body = detect(client, data, path="/v1/analyze")
    [objects], [tags] = body["objects"]["results"], body["tags"]["results"]
    assert (objects["in_domain"], objects["objects"]) == (False, []) and objects["withheld"] > 0
    assert tags["tags"] and "in_domain" not in tags  # the tagger is an ImageNet model: not checked
    body = detect(client, data, path="/v1/analyze", include_out_of_domain="true")
    assert len(body["objects"]["results"][0]["objects"]) == objects["withheld"]


def test_readiness_says_the_detector_has_a_domain(client: TestClient, artifacts: Artifacts) -> None:
    domain = client.get("/readyz").json()["checks"]["detector"]["domain"]
    assert domain["feature"] == "backbone.layers2+4.pooled"
    assert (domain["false_rejection_rate"], domain["n_fit"], domain["n_calibration"]) == (0.02, 200, 200)
    assert Path(artifacts.domain_detector, "domain.json").is_file()
