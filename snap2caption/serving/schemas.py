"""Wire schemas the model services share: which model answered, and where the time went."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import Query
from pydantic import BaseModel, Field

from snap2caption.serving.inputs import to_ms

# The `timeout_ms` query parameter every model route takes.
TimeoutMs = Annotated[
    int | None,
    Query(ge=1, le=600_000, description="Deadline (504 after it); capped at the service's maximum."),
]


class ModelRef(BaseModel):
    """The model version that answered."""

    name: str = Field(description="Registered model name.")
    version: int = Field(description="Registry version.")
    alias: str = Field(description="The alias the service follows (e.g. `production`).")
    # The runtime, under the wire name clients (the gateway, its answers' ``models``) have always read.
    backend: str = Field(description="Inference runtime (`torch`, `onnx`).")


class Timings(BaseModel):
    """Where the request's time went, in milliseconds."""

    decode_ms: float = Field(description="Reading, decoding and preprocessing the images.")
    queue_ms: float = Field(description="Waiting for a batch.")
    inference_ms: float = Field(description="The model call of the batch the images ran in.")
    total_ms: float = Field(description="From the start of the route to the response.")

    @classmethod
    def measure(cls, started: float, prepared: float, queue_s: float, inference_s: float) -> Timings:
        """Timings of a route that started at ``started`` and had its inputs ready at ``prepared``
        (``time.monotonic()`` values), from the batcher's queue and inference seconds; total is until now."""
        return cls(
            decode_ms=to_ms(prepared - started),
            queue_ms=to_ms(queue_s),
            inference_ms=to_ms(inference_s),
            total_ms=to_ms(time.monotonic() - started),
        )
