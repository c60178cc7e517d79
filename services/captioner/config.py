"""Captioner service settings, from ``SNAP2CAPTION_CAPTIONER_*`` environment variables."""

from __future__ import annotations

from typing import Literal

from pydantic import AliasChoices, Field
from pydantic_settings import SettingsConfigDict

from snap2caption.serving.settings import ModelServiceSettings


class Settings(ModelServiceSettings):
    """Everything the captioner reads from its environment; defaults give the embedded setup.

    Registry, threads, batching and input caps: see :class:`ModelServiceSettings`.
    """

    model_config = SettingsConfigDict(
        env_prefix="SNAP2CAPTION_CAPTIONER_", extra="ignore", protected_namespaces=(), populate_by_name=True
    )

    port: int = Field(default=8001, ge=1, le=65535)

    # ---- which model
    model_name: str = Field(default="captioner", description="Registered model name.")
    model_alias: str = Field(default="production", description="Alias (or version number) to serve.")
    runtime: Literal["auto", "torch", "onnx", "onnx-int8"] = Field(
        default="auto",
        # _BACKEND: the name this setting had before "backend" was kept for the gateway's remote services.
        validation_alias=AliasChoices("SNAP2CAPTION_CAPTIONER_RUNTIME", "SNAP2CAPTION_CAPTIONER_BACKEND"),
        description=(
            "Inference runtime: PyTorch, or the artifact's ONNX export on ONNX Runtime without torch in the "
            "process (`onnx-int8`: the dynamically quantized decoder); `auto`: onnx when the artifact has "
            "the export, else torch."
        ),
    )

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

    # ---- the torch runtime on a GPU (unmeasured in this project's CI: no GPU there)
    device: str = Field(default="cpu", description="Torch device of the torch runtime (`cuda`, `cuda:1`).")
    static_decoder: bool = Field(
        default=False,
        description=(
            "Torch runtime: decode on a preallocated static KV cache (snap2caption.models.caption.static), "
            "with one CUDA graph per padded batch size on CUDA."
        ),
    )
    static_dtype: Literal["bfloat16", "float32"] = Field(
        default="bfloat16",
        description="Static decoder weights and cache dtype (bf16 autocast encoder on CUDA).",
    )
    cuda_graphs: bool = Field(default=True, description="Capture the static decoder's step in CUDA graphs.")
