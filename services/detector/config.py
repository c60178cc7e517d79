"""Detector service settings, from ``SNAP2CAPTION_DETECTOR_*`` environment variables."""

from __future__ import annotations

from pydantic import AliasChoices, Field, model_validator
from pydantic_settings import SettingsConfigDict

from snap2caption.models.runtime import RuntimeChoice
from snap2caption.serving.settings import ModelServiceSettings


def _env(name: str) -> AliasChoices:
    """The environment names of a runtime setting: ``..._RUNTIME``, and ``..._BACKEND``, the name it had
    before "backend" was kept for the gateway's remote services."""
    prefix = f"SNAP2CAPTION_DETECTOR_{name.upper()}"
    return AliasChoices(f"{prefix}_RUNTIME", f"{prefix}_BACKEND")


class Settings(ModelServiceSettings):
    """Everything the detector service reads from its environment; defaults give the embedded setup.

    Registry, threads, batching and input caps: see :class:`ModelServiceSettings`; each of the two
    models (the object detector and the image tagger) has its own model store and its own batcher.
    """

    model_config = SettingsConfigDict(
        env_prefix="SNAP2CAPTION_DETECTOR_", extra="ignore", protected_namespaces=(), populate_by_name=True
    )

    port: int = Field(default=8002, ge=1, le=65535)

    # ---- which models
    detector_model: str = Field(default="detector", description="Registered name of the object detector.")
    detector_alias: str = Field(default="production", description="Alias (or version number) to serve.")
    detector_runtime: RuntimeChoice = Field(
        default="auto",
        validation_alias=_env("detector"),
        description="Runtime; auto: ONNX Runtime when the artifact has model.onnx, else torch.",
    )
    detector_int8: bool = Field(default=False, description="Run the artifact's model.int8.onnx (ONNX only).")
    tagger_model: str = Field(default="tagger", description="Registered name of the image tagger.")
    tagger_alias: str = Field(default="production", description="Alias (or version number) to serve.")
    tagger_runtime: RuntimeChoice = Field(
        default="auto",
        validation_alias=_env("tagger"),
        description="Runtime; auto: ONNX Runtime when the artifact has model.onnx, else torch.",
    )
    tagger_int8: bool = Field(default=False, description="Run the artifact's model.int8.onnx (ONNX only).")

    # ---- request options: defaults and the largest values a request may ask for
    conf: float = Field(default=0.25, ge=0, le=1, description="Default minimum object score.")
    iou: float = Field(default=0.45, ge=0, le=1, description="Default NMS IoU threshold.")
    max_det: int = Field(default=100, ge=1, description="Default most objects per image.")
    max_det_limit: int = Field(default=300, ge=1, le=10_000, description="Largest max_det a request may ask.")
    top_k: int = Field(default=5, ge=1, description="Default most tags per image.")
    top_k_limit: int = Field(default=50, ge=1, le=1000, description="Largest top_k a request may ask.")
    min_score: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description=(
            "Default minimum tag probability; unset: the tagger artifact's calibrated min_score (0 for an "
            "artifact without one)."
        ),
    )

    @model_validator(mode="after")
    def _defaults_within_limits(self) -> Settings:
        if self.max_det > self.max_det_limit:
            raise ValueError("max_det must be <= max_det_limit")
        if self.top_k > self.top_k_limit:
            raise ValueError("top_k must be <= top_k_limit")
        return self
