"""ETL service settings, from ``SNAP2CAPTION_ETL_*`` environment variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict
from sqlalchemy.engine import make_url

from snap2caption.http import ServiceSettings


class Settings(ServiceSettings):
    """Everything the ETL service reads from its environment; defaults give the embedded setup."""

    model_config = SettingsConfigDict(env_prefix="SNAP2CAPTION_ETL_", extra="ignore")

    port: int = Field(default=8003, ge=1, le=65535)
    data_root: Path = Field(default=Path("./data"), description="Job paths must resolve inside it.")
    db_url: str = Field(
        default="sqlite:///./var/etl/jobs.sqlite",
        description="SQLAlchemy URL of the job store.",
    )
    max_concurrent_jobs: int = Field(
        default=1, ge=1, le=16, description="Jobs running at once, each in its own process."
    )
    max_queued_jobs: int = Field(default=16, ge=1, description="Waiting jobs beyond this get 503 overloaded.")
    retry_after_s: int = Field(default=30, ge=1, description="Retry-After sent with 503 overloaded.")
    max_attempts: int = Field(
        default=3, ge=1, description="Starts a job gets; one found running after a crash past this fails."
    )
    shutdown_grace_s: float = Field(
        default=5.0,
        ge=0,
        description="On SIGTERM, time a running job gets to finish before it is re-queued.",
    )
    job_workers: int | None = Field(
        default=None, ge=1, le=64, description="Processes inside one ETL job; unset: one per core."
    )
    progress_interval_s: float = Field(default=0.5, gt=0, description="Least time between progress writes.")

    @field_validator("workers")
    @classmethod
    def _one_process(cls, value: int) -> int:
        if value != 1:
            raise ValueError("the ETL service runs one process: its job runner owns the job store")
        return value

    def sqlite_path(self) -> Path | None:
        """The database file when ``db_url`` is a file-backed SQLite URL, else ``None``."""
        url = make_url(self.db_url)
        if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
            return None
        return Path(url.database)
