"""The ETL service over real HTTP: job lifecycle, listing, and every bad request as an envelope."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.gateway_stack import metric
from tests.helpers import ServiceProcess, wait_for
from tests.services.etl.etl_helpers import CORRUPT, SMALL_IMAGES

pytestmark = pytest.mark.integration

SMALL = {
    "source": "coco",
    "images": "small/images",
    "annotations": ["small/annotations/captions.json", "small/annotations/instances.json"],
}


def job_body(out: str, **overrides: Any) -> dict[str, Any]:
    return {**SMALL, "out": out, "options": {"max_side": 64, "seed": 3}, **overrides}


def wait_finished(
    client: httpx.Client, job_id: str, timeout_s: float = 30.0
) -> tuple[dict[str, Any], set[str]]:
    """Poll a job until it ends; return its last state and every status seen on the way."""
    seen: set[str] = set()

    def finished() -> dict[str, Any] | None:
        job = client.get(f"/v1/jobs/{job_id}").json()
        seen.add(job["status"])
        return job if job["status"] in ("succeeded", "failed") else None

    return wait_for(finished, timeout_s, f"job {job_id} to finish"), seen


def assert_envelope(response: httpx.Response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert error["request_id"] == response.headers["x-request-id"]
    assert "Traceback" not in response.text
    return str(error["message"])


def test_job_lifecycle_reports_counts_and_quarantine(etl: ServiceProcess, data_root: Path) -> None:
    quarantined = ("snap2caption_etl_images_total", {"outcome": "quarantined"})
    quarantined_before = metric(etl.url, quarantined[0], **quarantined[1]) or 0  # other tests' jobs
    with etl.client() as client:
        response = client.post("/v1/jobs", json=job_body("out/lifecycle"))
        assert response.status_code == 202, response.text
        job = response.json()
        assert job["status"] == "queued"
        assert job["attempts"] == 0
        assert job["images"] == "small/images"  # shown relative to the data root
        assert response.headers["location"] == f"/v1/jobs/{job['id']}"

        done, seen = wait_finished(client, job["id"])
    # Whether a poll lands while it runs is timing (test_etl_restart.py waits for "running" itself).
    assert seen <= {"queued", "running", "succeeded"}, seen
    assert done["status"] == "succeeded", done
    assert done["attempts"] == 1
    counts = done["counts"]
    assert counts["records"] == SMALL_IMAGES
    assert counts["images_ok"] == SMALL_IMAGES - 1
    assert counts["quarantined"] == 1
    assert sum(counts[f"split_{s}"] for s in ("train", "val", "test")) == SMALL_IMAGES - 1
    [bad] = done["quarantined"]
    assert bad["file"] == CORRUPT
    assert bad["code"] == "corrupt_image"
    assert bad["reason"]
    assert done["progress"]["stage"] and done["progress"]["done"] == done["progress"]["total"]
    assert done["started_at"] <= done["finished_at"]
    options = done["options"]
    assert (options["max_side"], options["seed"]) == (64, 3)
    assert options["val_fraction"] is not None  # defaults are filled in and stored with the job
    assert (data_root / "out/lifecycle/manifests/train.parquet").is_file()

    metrics = httpx.get(f"{etl.url}/metrics").text
    assert 'snap2caption_etl_jobs_total{status="succeeded"}' in metrics
    assert metric(etl.url, quarantined[0], **quarantined[1]) == quarantined_before + 1
    assert "snap2caption_etl_job_duration_seconds_count" in metrics


def test_failed_job_says_why(etl: ServiceProcess, data_root: Path) -> None:
    broken = data_root / "broken.json"
    broken.write_text('{"images": "not a list"}')
    with etl.client() as client:
        response = client.post("/v1/jobs", json=job_body("out/broken", annotations=["broken.json"]))
        assert response.status_code == 202, response.text
        done, _ = wait_finished(client, response.json()["id"])
    assert done["status"] == "failed"
    assert done["error"]
    assert done["counts"] == {}


def test_list_is_newest_first_with_limit_and_status(etl: ServiceProcess) -> None:
    # Its own jobs only: other tests of the module may or may not have run before (random order).
    with etl.client() as client:
        ids = [client.post("/v1/jobs", json=job_body(f"out/list-{i}")).json()["id"] for i in range(3)]
        listed = client.get("/v1/jobs", params={"limit": 2}).json()["jobs"]
        assert [job["id"] for job in listed] == ids[:0:-1]  # the newest two
        assert all("quarantined" not in job for job in listed)  # the list stays small; ask one job for it
        assert len(client.get("/v1/jobs", params={"limit": 1}).json()["jobs"]) == 1
        everything = [job["id"] for job in client.get("/v1/jobs", params={"limit": 1000}).json()["jobs"]]
        assert set(ids) <= set(everything)
        for job_id in ids:  # finished before the next test, which may count what jobs do
            done, _ = wait_finished(client, job_id)
            assert done["status"] == "succeeded", done
        succeeded = client.get("/v1/jobs", params={"status": "succeeded"}).json()["jobs"]
        assert ids[0] in {job["id"] for job in succeeded}
        assert {job["status"] for job in succeeded} == {"succeeded"}


BAD_BODIES = {
    "missing images folder": (job_body("out/x", images="nowhere/images"), "images"),
    "missing annotation file": (
        job_body("out/x", annotations=["small/annotations/nope.json"]),
        "annotations[0]",
    ),
    "dot-dot escape": (job_body("out/x", images="small/../../outside/images"), "outside the data root"),
    "absolute path outside": (job_body("/tmp/etl-out"), "outside the data root"),
    "symlink escape": (job_body("out/x", annotations=["escape/captions.json"]), "outside the data root"),
    "output symlink escape": (job_body("escape/out"), "outside the data root"),
    "output is the root": (job_body("."), "out"),
    "output holds the images": (job_body("small"), "overlaps"),
    "unknown source": (job_body("out/x", source="imagenet"), "body.source"),
    "missing field": ({k: v for k, v in job_body("out/x").items() if k != "out"}, "body.out"),
    "wrong type": (job_body("out/x", annotations="small/annotations/captions.json"), "body.annotations"),
    "empty annotations": (job_body("out/x", annotations=[]), "body.annotations"),
    "unknown option": (job_body("out/x", options={"max_sides": 3}), "max_sides"),
    "bad option value": (job_body("out/x", options={"val_fraction": 2}), "val_fraction"),
    "inconsistent words": (job_body("out/x", options={"min_words": 80}), "max_words"),
}


@pytest.mark.parametrize("case", list(BAD_BODIES))
def test_bad_job_requests_are_400_envelopes(etl: ServiceProcess, case: str) -> None:
    body, needle = BAD_BODIES[case]
    message = assert_envelope(httpx.post(f"{etl.url}/v1/jobs", json=body), 400, "bad_request")
    assert needle in message


@pytest.mark.parametrize(
    ("content", "needle"),
    [(b'{"source": "coco", ', "malformed JSON"), (b"", "body"), (b"[1, 2]", "body")],
)
def test_malformed_and_empty_bodies_are_400(etl: ServiceProcess, content: bytes, needle: str) -> None:
    response = httpx.post(f"{etl.url}/v1/jobs", content=content, headers={"content-type": "application/json"})
    assert needle in assert_envelope(response, 400, "bad_request")


def test_unknown_job_route_and_method(etl: ServiceProcess) -> None:
    assert "nope" in assert_envelope(httpx.get(f"{etl.url}/v1/jobs/nope"), 404, "not_found")
    assert_envelope(httpx.get(f"{etl.url}/v1/nothing-here"), 404, "not_found")
    assert_envelope(httpx.delete(f"{etl.url}/v1/jobs"), 405, "method_not_allowed")
    assert_envelope(httpx.get(f"{etl.url}/v1/jobs", params={"limit": 0}), 400, "bad_request")


def test_health_and_readiness(etl: ServiceProcess) -> None:
    assert httpx.get(f"{etl.url}/healthz").json()["service"] == "etl"
    ready = httpx.get(f"{etl.url}/readyz").json()
    assert ready["checks"]["store"] == "ok"
    started = time.monotonic()
    assert httpx.get(f"{etl.url}/openapi.json").status_code == 200
    assert time.monotonic() - started < 5
