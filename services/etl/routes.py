"""ETL job routes: submit, inspect and list jobs."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response

from services.etl.config import Settings
from services.etl.engine import JobRunner, effective_options, etl_config
from services.etl.jobs import JobRow, JobStore, relative_to_root, resolve_spec, utc
from services.etl.schemas import Job, JobList, JobRequest, JobStatus, JobSummary
from snap2caption.errors import NotFound
from snap2caption.http import error_responses

router = APIRouter(prefix="/v1", tags=["jobs"])


def get_store(request: Request) -> JobStore:
    return request.app.state.store


def get_runner(request: Request) -> JobRunner:
    return request.app.state.runner


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


StoreDep = Annotated[JobStore, Depends(get_store)]
RunnerDep = Annotated[JobRunner, Depends(get_runner)]
SettingsDep = Annotated[Settings, Depends(get_settings)]


@router.post(
    "/jobs",
    status_code=202,
    response_model=Job,
    summary="Queue an ETL job",
    responses=error_responses(400, 503),
)
def submit_job(
    body: JobRequest, response: Response, store: StoreDep, runner: RunnerDep, settings: SettingsDep
) -> Job:
    """Check the request (paths inside data_root, a configuration the ETL accepts) and queue it."""
    spec = resolve_spec(body, settings.data_root)
    # Refuse now what the ETL would refuse later, and store the options with defaults filled in.
    spec["options"] = effective_options(etl_config(body.source, spec))
    row = store.submit(body.source, spec, settings.max_queued_jobs, settings.retry_after_s)
    runner.notify()
    response.headers["Location"] = f"/v1/jobs/{row.id}"
    return to_job(row, settings)


@router.get("/jobs/{job_id}", response_model=Job, summary="One job", responses=error_responses(404))
def get_job(job_id: str, store: StoreDep, settings: SettingsDep) -> Job:
    """Status, progress, counts, quarantined files and error of one job."""
    row = store.get(job_id)
    if row is None:
        raise NotFound(f"no job with id {job_id!r}")
    return to_job(row, settings)


@router.get("/jobs", response_model=JobList, summary="Jobs, newest first")
def list_jobs(
    store: StoreDep,
    settings: SettingsDep,
    limit: Annotated[int, Query(ge=1, le=1000, description="At most this many jobs.")] = 50,
    status: Annotated[JobStatus | None, Query(description="Only jobs in this status.")] = None,
) -> JobList:
    """The most recent jobs, without their quarantine lists (ask for one job for those)."""
    return JobList(jobs=[to_summary(row, settings) for row in store.recent(limit=limit, status=status)])


def _view(row: JobRow, settings: Settings) -> dict[str, Any]:
    spec = row.spec
    return {
        "id": row.id,
        "status": row.status,
        "source": row.source,
        "images": relative_to_root(spec["images"], settings.data_root),
        "annotations": [relative_to_root(p, settings.data_root) for p in spec["annotations"]],
        "out": relative_to_root(spec["out"], settings.data_root),
        "progress": {"stage": row.stage, "done": row.done or 0, "total": row.total},
        "counts": row.counts or {},
        "error": row.error,
        "attempts": row.attempts,
        "created_at": utc(row.created_at),
        "started_at": utc(row.started_at),
        "finished_at": utc(row.finished_at),
    }


def to_summary(row: JobRow, settings: Settings) -> JobSummary:
    """The API view of a stored job, paths shown relative to data_root."""
    return JobSummary.model_validate(_view(row, settings))


def to_job(row: JobRow, settings: Settings) -> Job:
    """The full API view of a stored job: its options and quarantine list too."""
    return Job.model_validate(
        {**_view(row, settings), "options": row.spec.get("options", {}), "quarantined": row.quarantined or []}
    )
