"""Gateway settings, from ``SNAP2CAPTION_GATEWAY_*`` environment variables."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from services.gateway.db import default_database_url
from services.gateway.images import PNG_MAX_PIXELS
from snap2caption.alt_text import DEFAULT_MIN_CONFIDENCE
from snap2caption.http import ServiceSettings

Profile = Literal["local", "production"]


class Settings(ServiceSettings):
    """Everything the gateway reads from its environment; defaults give the embedded single-machine setup.

    ``profile=production`` turns API keys on whatever ``auth_enabled`` says; ``local`` leaves the
    choice to ``auth_enabled`` (off by default, so ``snap2caption up`` works with zero setup).
    """

    model_config = SettingsConfigDict(env_prefix="SNAP2CAPTION_GATEWAY_", extra="ignore")

    port: int = Field(default=8000, ge=1, le=65535)
    profile: Profile = Field(default="local", description="`production` forces API keys on.")

    # ---- backends
    captioner_url: str = Field(default="http://127.0.0.1:8001", description="Captioner base URL.")
    detector_url: str = Field(default="http://127.0.0.1:8002", description="Detector base URL.")
    canary_captioner_url: str | None = Field(
        default=None,
        description="Base URL of the captioner serving the `canary` alias (`MODEL_ALIAS=canary`); unset: "
        "no captioner canary. It gets a running release's share of the traffic (`snap2caption release`).",
    )
    canary_detector_url: str | None = Field(
        default=None, description="Base URL of the detector serving the `canary` alias; unset: none."
    )
    connect_timeout_s: float = Field(default=1.0, gt=0, description="TCP connect timeout per backend call.")
    backend_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="Longest one backend call may take, retries included; shortened to what is left of the "
        "request's budget, and sent as the call's `timeout_ms`.",
    )
    request_timeout_s: float = Field(
        default=15.0,
        gt=0,
        description="Budget of an /v1/analyze request once its body is in (URL fetch, decode, backend "
        "calls): 504 `timeout` when spent with nothing computed. `?timeout_ms=` asks for another.",
    )
    max_timeout_s: float = Field(
        default=60.0, gt=0, description="Largest budget `?timeout_ms=` may ask for (larger ones are capped)."
    )
    retries: int = Field(default=1, ge=0, le=3, description="Retries of a call, on connection errors only.")
    retry_jitter_s: float = Field(default=0.05, ge=0, description="A retry waits a random 0..this first.")
    max_connections: int = Field(default=100, ge=1, description="Pooled connections per backend.")
    breaker_failure_threshold: int = Field(
        default=5, ge=1, description="Consecutive failed calls that open a backend's circuit."
    )
    breaker_cooldown_s: float = Field(
        default=10.0, gt=0, description="Time an open circuit waits before letting one trial call through."
    )
    retry_after_s: float = Field(default=2.0, gt=0, description="Retry-After of 503 `overloaded`.")
    ready_poll_interval_s: float = Field(
        default=2.0, gt=0, description="Seconds between backend /readyz polls."
    )
    track_header_enabled: bool = Field(
        default=True,
        description="Honour the X-Snap2Caption-Track header (`production`/`canary`), which picks a "
        "request's track while a canary runs, for testing a canary by hand.",
    )
    ready_max_age_s: float = Field(
        default=10.0, gt=0, description="A backend is ready while its last good /readyz is this recent."
    )

    # ---- inputs
    max_body_bytes: int = Field(
        default=64 * 1024 * 1024, ge=1, description="Whole request body; reading stops at the cap (413)."
    )
    # A body may take body_grace_s plus 1 s per body_min_bytes_per_s bytes received, at most body_max_time_s
    # (408 `request_timeout` beyond): 1,000 bytes/s is 8 kbit/s, slower than any real network.
    body_min_bytes_per_s: float = Field(
        default=1000.0, gt=0, description="Slowest average upload rate accepted after the grace period."
    )
    body_grace_s: float = Field(default=10.0, ge=0, description="Time a body gets before its rate counts.")
    body_max_time_s: float = Field(
        default=300.0, gt=0, description="Longest a whole request body may take to arrive."
    )
    max_image_bytes: int = Field(default=20 * 1024 * 1024, ge=1, description="Per image.")
    max_image_pixels: int = Field(default=50_000_000, ge=1, description="Width x height per image.")
    max_batch_images: int = Field(default=16, ge=1, le=64, description="Images per /v1/analyze/batch call.")
    backend_max_side: int = Field(
        default=1024, ge=32, description="Longest side of the normalised image the backends get."
    )
    backend_image_format: Literal["auto", "jpeg", "png"] = Field(
        default="auto",
        description="Encoding of the normalised image: JPEG q95 4:4:4, lossless PNG, or auto (PNG up to "
        "backend_png_max_pixels, JPEG above).",
    )
    backend_png_max_pixels: int = Field(
        default=PNG_MAX_PIXELS, ge=1, description="The largest normalised image `auto` sends as PNG."
    )
    decode_threads: int = Field(default=2, ge=1, le=64, description="Images decoded at once.")
    allow_private_urls: bool = Field(
        default=False,
        description="Let URL fetches reach loopback/private hosts (tests and closed networks only).",
    )
    url_connect_timeout_s: float = Field(default=3.0, gt=0)
    url_read_timeout_s: float = Field(default=10.0, gt=0)
    url_max_redirects: int = Field(default=3, ge=0, le=10)

    # ---- outputs
    default_max_tags: int = Field(default=5, ge=1, le=50, description="Tags per image unless asked.")
    alt_text_min_confidence: float = Field(
        default=DEFAULT_MIN_CONFIDENCE,
        ge=0,
        le=1,
        description=(
            "Below this caption confidence alt text falls back to labels. The captioner's confidence is a "
            "calibrated probability that the caption is right, so 0.5 = use the caption only when it is "
            "more likely right than wrong (on the data the model was calibrated on)."
        ),
    )
    alt_text_max_chars: int = Field(default=125, ge=20, le=1000, description="Longest alt text.")

    # ---- keys, limits, storage
    auth_enabled: bool = Field(default=False, description="Require API keys (always on in production).")
    rate_limit_per_s: float = Field(default=10.0, gt=0, description="Sustained requests per second per key.")
    rate_limit_burst: int = Field(default=20, ge=1, description="Requests a key may send at once.")
    cors_allow_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Origins allowed by CORS (comma-separated); empty: CORS off."
    )
    database_url: str = Field(
        default_factory=default_database_url,
        description="SQLAlchemy URL of API keys, inference log and feedback; default SQLite at "
        "$SNAP2CAPTION_HOME/gateway.db (the `snap2caption keys` CLI opens the same file).",
    )
    retain_images: bool = Field(default=False, description="Keep image bytes in the inference log.")
    inference_log_queue: int = Field(default=1000, ge=1, description="Records waiting to be written.")

    @field_validator("cors_allow_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                import json

                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _production_needs_auth(self) -> Settings:
        if self.profile == "production":
            self.auth_enabled = True
        if "*" in self.cors_allow_origins:
            raise ValueError("cors_allow_origins must list origins, not '*'")
        return self

    @model_validator(mode="after")
    def _budget_within_max(self) -> Settings:
        if self.request_timeout_s > self.max_timeout_s:
            raise ValueError(
                f"request_timeout_s ({self.request_timeout_s}) exceeds max_timeout_s ({self.max_timeout_s})"
            )
        return self
