"""Wire schemas of the ETL service: job requests and job status."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Source = Literal["coco", "karpathy", "flickr30k"]
JobStatus = Literal["queued", "running", "succeeded", "failed"]


class JobOptions(BaseModel):
    """ETL knobs; anything left out takes the ETL's own default."""

    model_config = ConfigDict(extra="forbid")

    max_side: int | None = Field(
        default=None, ge=16, le=8192, description="Longest side of the resized images, px."
    )
    lowercase: bool | None = Field(default=None, description="Lowercase captions.")
    min_words: int | None = Field(default=None, ge=1, le=1000, description="Drop captions with fewer words.")
    max_words: int | None = Field(default=None, ge=1, le=1000, description="Drop captions with more words.")
    val_fraction: float | None = Field(
        default=None, ge=0, lt=1, description="Share of images in the val split."
    )
    test_fraction: float | None = Field(
        default=None, ge=0, lt=1, description="Share of images in the test split."
    )
    seed: int | None = Field(default=None, ge=0, description="Seed of the deterministic split.")

    @model_validator(mode="after")
    def _consistent(self) -> JobOptions:
        if self.min_words is not None and self.max_words is not None and self.max_words < self.min_words:
            raise ValueError("max_words must be >= min_words")
        if (self.val_fraction or 0) + (self.test_fraction or 0) >= 1:
            raise ValueError("val_fraction + test_fraction must be < 1")
        return self


class JobRequest(BaseModel):
    """``POST /v1/jobs``: turn one source dataset into training data. Relative paths are under data_root."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "source": "coco",
                    "images": "raw/synth/images",
                    "annotations": ["raw/synth/annotations/captions.json"],
                    "out": "processed/synth",
                    "options": {"max_side": 256, "val_fraction": 0.1, "test_fraction": 0.1, "seed": 0},
                }
            ]
        },
    )

    source: Source = Field(description="Annotation format of the source.")
    images: str = Field(min_length=1, description="Folder of the source images.")
    annotations: list[str] = Field(min_length=1, max_length=64, description="Annotation files.")
    out: str = Field(min_length=1, description="Output folder of the processed dataset.")
    options: JobOptions = Field(default_factory=lambda: JobOptions())


class Progress(BaseModel):
    """Where a job is: the ETL stage and how far through it."""

    stage: str | None = None
    done: int = 0
    total: int | None = None


class QuarantinedFile(BaseModel):
    """A source file the ETL refused, and why."""

    file: str
    code: str
    reason: str


class JobSummary(BaseModel):
    """A job as ``GET /v1/jobs`` lists it."""

    id: str
    status: JobStatus
    source: Source
    images: str = Field(description="Relative to data_root.")
    annotations: list[str] = Field(description="Relative to data_root.")
    out: str = Field(description="Relative to data_root.")
    progress: Progress
    counts: dict[str, int] = Field(default_factory=dict, description="What the ETL counted, when done.")
    error: str | None = None
    attempts: int = Field(description="How many times the job has been started.")
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None


class Job(JobSummary):
    """A job in full, as ``GET /v1/jobs/{id}`` and ``POST /v1/jobs`` return it."""

    options: JobOptions
    quarantined: list[QuarantinedFile] = Field(default_factory=list)


class JobList(BaseModel):
    """Jobs, newest first."""

    jobs: list[JobSummary]
