"""The job store outlives the service: kill -9 mid-job resumes the job; SIGTERM re-queues it cleanly."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import ServiceProcess, wait_for
from tests.services.etl.etl_helpers import BIG_IMAGES, etl_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BIG = {
    "source": "coco",
    "images": "big/images",
    "annotations": ["big/annotations/captions.json", "big/annotations/instances.json"],
    "options": {"max_side": 128},
}
SMALL = {"source": "coco", "images": "small/images", "annotations": ["small/annotations/captions.json"]}


def submit(client: httpx.Client, body: dict[str, Any], out: str) -> str:
    response = client.post("/v1/jobs", json={**body, "out": out})
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def job(client: httpx.Client, job_id: str) -> dict[str, Any]:
    response = client.get(f"/v1/jobs/{job_id}")
    assert response.status_code == 200, response.text
    return dict(response.json())


def wait_status(client: httpx.Client, job_id: str, *statuses: str, timeout_s: float = 60) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        state = job(client, job_id)
        return state if state["status"] in statuses else None

    return wait_for(reached, timeout_s, f"job {job_id} to reach {statuses}")


def wait_mid_decode(client: httpx.Client, job_id: str) -> dict[str, Any]:
    """Wait until the job is running and part way through decoding its images."""

    def mid() -> dict[str, Any] | None:
        state = job(client, job_id)
        assert state["status"] in ("queued", "running"), f"job ended before it could be interrupted: {state}"
        progress = state["progress"]
        decoding = progress["stage"] == "decode" and 0 < progress["done"] < (progress["total"] or 0)
        return state if state["status"] == "running" and decoding else None

    return wait_for(mid, 60, "the job to be mid-decode", interval_s=0.02)


def job_processes(cwd: Path) -> list[int]:
    """Pids of ETL job processes whose working directory is ``cwd`` (Linux /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (
                os.readlink(entry / "cwd") == str(cwd)
                and b"services.etl.engine" in (entry / "cmdline").read_bytes()
            ):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


@pytest.mark.skipif(not Path("/proc/self/cwd").exists(), reason="needs Linux /proc to look for orphans")
def test_no_job_is_lost_to_a_crash_or_a_clean_shutdown(
    start_service: Callable[..., ServiceProcess], data_root: Path, tmp_path: Path
) -> None:
    env = etl_env(
        data_root,
        tmp_path / "jobs.sqlite",
        max_queued_jobs=1,
        shutdown_grace_s=0,
        retry_after_s=7,
        progress_interval_s=0.05,
    )

    # 1. A small job finishes; a big one is killed -9 with its service, mid-decode.
    first = start_service("etl", env=env, cwd=tmp_path)
    with first.client() as client:
        done_id = submit(client, SMALL, "out/restart-small")
        assert wait_status(client, done_id, "succeeded", "failed")["status"] == "succeeded"
        big_id = submit(client, BIG, "out/restart-big")
        wait_mid_decode(client, big_id)
        assert job_processes(tmp_path), "the job should run in its own process"
    first.kill()  # no lifespan shutdown, no cleanup: a crash
    # The job process notices its service is gone and takes itself (and any pool) down.
    wait_for(lambda: not job_processes(tmp_path), 10, "the orphaned job process to exit")

    # 2. A new process on the same database resumes the big job; the queue bound holds meanwhile;
    #    then SIGTERM stops it cleanly mid-job.
    second = start_service("etl", env=env, cwd=tmp_path)
    with second.client() as client:
        assert wait_mid_decode(client, big_id)["attempts"] == 2
        waiting_id = submit(client, SMALL, "out/restart-waiting")
        refused = client.post("/v1/jobs", json={**SMALL, "out": "out/refused"})
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "overloaded"
        assert refused.headers["retry-after"] == "7"
    # uvicorn re-raises the SIGTERM once its graceful shutdown is done, hence -SIGTERM; the log
    # shows the lifespan shutdown (which stops and re-queues the job) ran.
    assert second.stop(timeout_s=20) in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in second.log()
    assert not job_processes(tmp_path)

    # 3. A third process finishes everything; nothing was lost or run twice at once.
    third = start_service("etl", env=env, cwd=tmp_path)
    with third.client() as client:
        resumed = wait_status(client, big_id, "succeeded", "failed")
        assert resumed["status"] == "succeeded", resumed
        # Three starts: the crashed one counts, the one a clean shutdown cut short is given back.
        assert resumed["attempts"] == 2
        assert resumed["counts"]["images_ok"] == BIG_IMAGES
        waited = wait_status(client, waiting_id, "succeeded", "failed")
        assert (waited["status"], waited["attempts"]) == ("succeeded", 1)
        finished = job(client, done_id)
        assert (finished["status"], finished["attempts"]) == ("succeeded", 1)
        listed = [j["id"] for j in client.get("/v1/jobs").json()["jobs"]]
        assert listed == [waiting_id, big_id, done_id]
    assert (data_root / "out/restart-big/manifests/train.parquet").is_file()
