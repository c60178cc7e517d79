"""Captioner service settings, from ``SNAP2CAPTION_CAPTIONER_*`` environment variables."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from snap2caption.serving.settings import ModelServiceSettings


class Settings(ModelServiceSettings):
    """Everything the captioner reads from its environment; defaults give the embedded setup.

    Registry, threads, batching and input caps: see :class:`ModelServiceSettings`.
    """

    model_config = SettingsConfigDict(
        env_prefix="SNAP2CAPTION_CAPTIONER_", extra="ignore", protected_namespaces=()
    )

    port: int = Field(default=8001, ge=1, le=65535)

    # ---- which model
    model_name: str = Field(default="captioner", description="Registered model name.")
    model_alias: str = Field(default="production", description="Alias (or version number) to serve.")
    backend: Literal["torch", "onnx"] = Field(default="torch", description="Inference runtime.")

    # ---- inputs and decoding
    image_max_side: int | None = Field(
        default=None,
        ge=16,
        description=(
            "Longest side images are shrunk to before the model's preprocessing; unset: the artifact's "
            "extra.image_max_side, else 512 (the ETL's resized store that training reads)."
        ),
    )
    max_new_tokens: int = Field(
        default=32, ge=1, le=256, description="Largest max_new_tokens a request may ask."
    )
    max_beams: int = Field(default=4, ge=1, le=16, description="Largest num_beams a request may ask.")
