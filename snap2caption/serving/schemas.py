"""Wire schemas the model services share: which model answered, and where the time went."""

from __future__ import annotations

from pydantic import BaseModel, Field


class ModelRef(BaseModel):
    """The model version that answered."""

    name: str = Field(description="Registered model name.")
    version: int = Field(description="Registry version.")
    alias: str = Field(description="The alias the service follows (e.g. `production`).")
    backend: str = Field(description="Inference runtime (`torch`, `onnx`).")


class Timings(BaseModel):
    """Where the request's time went, in milliseconds."""

    decode_ms: float = Field(description="Reading, decoding and preprocessing the images.")
    queue_ms: float = Field(description="Waiting for a batch.")
    inference_ms: float = Field(description="The model call of the batch the images ran in.")
    total_ms: float = Field(description="From the start of the route to the response.")
