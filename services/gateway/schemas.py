"""Wire schemas of the public gateway API: ``POST /v1/analyze`` and ``POST /v1/analyze/batch``.

The request bodies are declared here. The response schemas are the shared contract in
``snap2caption.api``: the gateway declares them as ``response_model``, the client parses answers with them.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from snap2caption.api import Feature


class AnalyzeOptions(BaseModel):
    """Options shared by the JSON bodies (the query string carries them for uploads)."""

    model_config = ConfigDict(extra="forbid")

    features: list[Feature] | str | None = Field(
        default=None,
        description="Features to compute, a list or comma-separated; default all.",
        examples=[["caption", "alt_text", "tags", "objects"], "caption,tags"],
    )
    max_tags: int | None = Field(default=None, ge=1, le=50, description="Most tags per image.")
    min_confidence: float | None = Field(
        default=None, ge=0, le=1, allow_inf_nan=False, description="Minimum score of tags and objects."
    )
    gender_neutral: bool | None = Field(
        default=None, description="man/woman -> person, boy/girl -> child, ... in caption and alt text."
    )


class AnalyzeUrlRequest(AnalyzeOptions):
    """``POST /v1/analyze`` with ``application/json``: analyse the image a URL points to."""

    url: str = Field(
        min_length=1,
        max_length=4096,
        description="http(s) URL of the image.",
        examples=["https://example.com/cat.jpg"],
    )


class AnalyzeBatchUrlRequest(AnalyzeOptions):
    """``POST /v1/analyze/batch`` with ``application/json``: analyse the images several URLs point to."""

    urls: list[str] = Field(min_length=1, max_length=64, description="http(s) URLs of the images.")
