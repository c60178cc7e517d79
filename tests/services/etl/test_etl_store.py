"""The job store and path checks, in process: the rules the HTTP tests rely on, case by case."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from services.etl.engine import report_counts
from services.etl.jobs import JobStore, relative_to_root, resolve_spec
from services.etl.schemas import JobRequest
from snap2caption.errors import BadRequest, Overloaded

SPEC = {"images": "/data/i", "annotations": ["/data/a.json"], "out": "/data/o", "options": {}}


@pytest.fixture()
def store(tmp_path: Path) -> JobStore:
    return JobStore(f"sqlite:///{tmp_path / 'jobs.sqlite'}")


def test_claim_takes_oldest_and_counts_attempts(store: JobStore) -> None:
    first = store.submit("coco", SPEC, max_queued=5, retry_after_s=1)
    second = store.submit("coco", SPEC, max_queued=5, retry_after_s=1)
    claimed = store.claim_next()
    assert claimed is not None and claimed.id == first.id
    assert (claimed.status, claimed.attempts) == ("running", 1)
    assert claimed.started_at is not None
    assert [row.id for row in store.recent()] == [second.id, first.id]


def test_queue_bound_is_overloaded_with_retry_after(store: JobStore) -> None:
    store.submit("coco", SPEC, max_queued=1, retry_after_s=9)
    with pytest.raises(Overloaded) as caught:
        store.submit("coco", SPEC, max_queued=1, retry_after_s=9)
    assert caught.value.retry_after == 9
    store.claim_next()  # running jobs do not count against the queue
    store.submit("coco", SPEC, max_queued=1, retry_after_s=9)


def test_recover_requeues_then_gives_up_after_max_attempts(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'jobs.sqlite'}"
    store = JobStore(url)
    job = store.submit("coco", SPEC, max_queued=5, retry_after_s=1)
    for attempt in (1, 2):
        assert store.claim_next() is not None  # ... and the process dies here
        restarted = JobStore(url)
        assert restarted.recover(max_attempts=3) == ([job.id], [])
        row = restarted.get(job.id)
        assert row is not None and (row.status, row.attempts) == ("queued", attempt)
    store.claim_next()  # the third start dies too: no more
    assert JobStore(url).recover(max_attempts=3) == ([], [job.id])
    row = store.get(job.id)
    assert row is not None and row.status == "failed"
    assert row.error and "gave up" in row.error and row.finished_at is not None


def test_graceful_requeue_gives_the_attempt_back(store: JobStore) -> None:
    job = store.submit("coco", SPEC, max_queued=5, retry_after_s=1)
    store.claim_next()
    store.progress(job.id, "decode", 3, 10)
    store.requeue(job.id)
    row = store.get(job.id)
    assert row is not None
    assert (row.status, row.attempts, row.stage, row.done) == ("queued", 0, None, 0)


def test_finish_records_counts_quarantine_and_errors(store: JobStore) -> None:
    ok = store.submit("coco", SPEC, max_queued=5, retry_after_s=1)
    bad = store.submit("coco", SPEC, max_queued=5, retry_after_s=1)
    store.succeed(
        ok.id, {"images_ok": 3}, [{"file": "x.jpg", "code": "corrupt_image", "reason": "truncated"}]
    )
    store.fail(bad.id, "boom")
    assert [row.id for row in store.recent(status="failed")] == [bad.id]
    row = store.get(ok.id)
    assert row is not None and row.counts == {"images_ok": 3} and row.quarantined and row.finished_at


def request(**paths: object) -> JobRequest:
    body = {"source": "coco", "images": "raw/images", "annotations": ["raw/captions.json"], "out": "out"}
    return JobRequest.model_validate({**body, **paths})


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    (data / "raw" / "images").mkdir(parents=True)
    (data / "raw" / "captions.json").write_text("{}")
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "captions.json").write_text("{}")
    os.symlink(tmp_path / "secret", data / "link")
    os.symlink(data / "raw", data / "inner")  # a symlink that stays inside is fine
    return data


def test_resolve_spec_makes_paths_absolute(root: Path) -> None:
    spec = resolve_spec(request(annotations=["inner/captions.json", str(root / "raw/captions.json")]), root)
    assert spec["images"] == str((root / "raw/images").resolve())
    assert spec["annotations"] == [str((root / "raw/captions.json").resolve())] * 2
    assert relative_to_root(spec["out"], root) == "out"


@pytest.mark.parametrize(
    ("paths", "needle"),
    [
        ({"images": "../secret"}, "outside the data root"),
        ({"images": "raw/../../secret"}, "outside the data root"),
        ({"annotations": ["link/captions.json"]}, "outside the data root"),
        ({"out": "link/out"}, "outside the data root"),
        ({"out": "/"}, "outside the data root"),
        ({"images": "raw/missing"}, "not an existing folder"),
        ({"annotations": ["raw/images"]}, "not an existing file"),
        ({"out": "raw/captions.json"}, "not a folder"),
        ({"out": "."}, "not the root itself"),
        ({"images": "raw/\x00images"}, "NUL"),
    ],
)
def test_resolve_spec_refuses(root: Path, paths: dict[str, object], needle: str) -> None:
    with pytest.raises(BadRequest, match=needle):
        resolve_spec(request(**paths), root)


def test_report_counts_flattens_splits() -> None:
    report = {
        "counts": {"images_ok": 2, "quarantined": 1},
        "splits": {"train": 2, "val": 0},
        "images_cached": 1,
    }
    assert report_counts(report) == {
        "images_ok": 2,
        "quarantined": 1,
        "split_train": 2,
        "split_val": 0,
        "images_cached": 1,
    }
