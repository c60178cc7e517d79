"""Settings every model service shares: the registry, the runtime's threads, batching and input caps.

A service subclasses :class:`ModelServiceSettings` with its own env prefix, port and model fields
(``services/captioner/config.py``, ``services/detector/config.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from snap2caption.http import ServiceSettings


class ModelServiceSettings(ServiceSettings):
    """Fields of a service that serves registry models through micro-batchers; defaults: embedded setup."""

    model_config = SettingsConfigDict(extra="ignore", protected_namespaces=())

    # ---- where models come from
    tracking_uri: str | None = Field(
        default=None,
        description="MLflow tracking URI; unset: MLFLOW_TRACKING_URI, else the embedded SQLite registry.",
    )
    model_cache_dir: Path = Field(
        default=Path("./var/models"), description="Where model versions are downloaded."
    )
    poll_interval_s: float = Field(
        default=30.0, ge=0, description="Seconds between checks of the alias; 0 never swaps."
    )
    threads: int = Field(
        default=1,
        ge=1,
        le=256,
        description="Intra-op threads of the runtime. 1 on shared cores: see snap2caption.serving.threads.",
    )

    # ---- batching (each model has its own batcher with these settings)
    max_batch_size: int = Field(default=16, ge=1, le=512, description="Most images per model call.")
    max_wait_ms: float = Field(default=5.0, ge=0, le=1000, description="Longest wait for a batch to fill.")
    max_queue: int = Field(default=128, ge=1, description="Images waiting beyond this get 503 overloaded.")
    batch_concurrency: int = Field(default=1, ge=1, le=64, description="Model calls running at once.")
    retry_after_s: float = Field(default=1.0, gt=0, description="Retry-After sent with 503 overloaded.")
    request_timeout_s: float = Field(
        default=10.0, gt=0, description="Deadline of a request that sets no timeout_ms (504 after it)."
    )
    max_timeout_s: float = Field(default=60.0, gt=0, description="Largest timeout_ms a request may ask for.")

    # ---- inputs
    max_images_per_request: int = Field(default=16, ge=1, le=512)
    max_image_bytes: int = Field(default=20 * 1024 * 1024, ge=1, description="Per image.")
    max_image_pixels: int = Field(default=50_000_000, ge=1, description="Width x height, per image.")
    max_body_bytes: int = Field(default=64 * 1024 * 1024, ge=1, description="Whole request body.")
    decode_threads: int = Field(default=2, ge=1, le=64, description="Images decoded at once.")

    # ---- data drift (snap2caption.monitoring): PSI of recent inputs against the artifact's reference
    drift_enabled: bool = Field(
        default=True,
        description="Monitor input drift when the serving artifact carries its reference statistics.",
    )
    drift_window: int = Field(default=1000, ge=10, description="Most recent images per feature compared.")
    drift_min_samples: int = Field(
        default=200, ge=1, description="Images a window needs before its PSI is reported."
    )
    drift_every: int = Field(default=20, ge=1, description="Recompute the PSI after this many observations.")

    # ---- faults injected FOR TESTS ONLY (a broken canary in tests/integration/test_canary_release.py)
    test_fault_errors: bool = Field(
        default=False,
        description="TEST ONLY: answer every model request (POST /v1/...) with 500 `injected_fault`.",
    )
    test_fault_slowdown: float = Field(
        default=1.0,
        ge=1.0,
        le=100.0,
        description="TEST ONLY: make every model request this many times slower (it sleeps (x - 1) times "
        "its own time before answering).",
    )

    @model_validator(mode="after")
    def _consistent(self) -> Any:
        if self.max_images_per_request > self.max_batch_size:
            # A request's images then always run in one batch, so they all see one model version.
            raise ValueError("max_images_per_request must be <= max_batch_size")
        if self.max_images_per_request > self.max_queue:
            raise ValueError("max_images_per_request must be <= max_queue")
        if self.request_timeout_s > self.max_timeout_s:
            raise ValueError("request_timeout_s must be <= max_timeout_s")
        if self.drift_min_samples > self.drift_window:
            raise ValueError("drift_min_samples must be <= drift_window")
        return self
