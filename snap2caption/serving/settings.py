"""Settings every model service shares: the registry, the runtime's threads, batching and input caps.

A service subclasses :class:`ModelServiceSettings` with its own env prefix, port and model fields
(``services/captioner/config.py``, ``services/detector/config.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from snap2caption.http import ServiceSettings
from snap2caption.models.providers import OrtProviders, parse_request


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

    # ---- ONNX Runtime execution providers (snap2caption.models.providers); unset: SNAP2CAPTION_ORT_*
    providers: str | None = Field(
        default=None,
        description=(
            "ONNX Runtime execution providers: `auto` (TensorRT, then CUDA, then CPU among those installed), "
            "`cpu`, `cuda`, `tensorrt`, or an ordered list (`tensorrt,cuda,cpu`); one asked for by name "
            "that cannot run fails the load. Unset: SNAP2CAPTION_ORT_PROVIDERS, else auto."
        ),
    )
    ort_device_id: int | None = Field(
        default=None,
        ge=0,
        description="GPU of the CUDA / TensorRT providers; unset: SNAP2CAPTION_ORT_DEVICE_ID, else 0.",
    )
    trt_cache_dir: Path | None = Field(
        default=None,
        description="TensorRT engine cache folder; unset: SNAP2CAPTION_ORT_TRT_CACHE_DIR, else "
        "$SNAP2CAPTION_HOME/trt-cache.",
    )
    trt_fp16: bool | None = Field(
        default=None,
        description="Let TensorRT build fp16 engines; unset: SNAP2CAPTION_ORT_TRT_FP16, else false.",
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

    @field_validator("providers")
    @classmethod
    def _known_providers(cls, value: str | None) -> str | None:
        if value is not None:
            parse_request(value)
        return value

    def ort_providers(self) -> OrtProviders:
        """The execution-provider settings of this service's sessions: its own, else the process-wide ones."""
        base = OrtProviders.from_env()
        return OrtProviders(
            request=base.request if self.providers is None else self.providers,
            device_id=base.device_id if self.ort_device_id is None else self.ort_device_id,
            trt_cache_dir=base.trt_cache_dir if self.trt_cache_dir is None else self.trt_cache_dir,
            trt_fp16=base.trt_fp16 if self.trt_fp16 is None else self.trt_fp16,
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
