"""Wire schemas of the captioner service."""

from __future__ import annotations

from pydantic import BaseModel, Field

from snap2caption.serving.schemas import ModelRef, Timings


class ImageCaptionResult(BaseModel):
    """One image's caption."""

    index: int = Field(description="Position of the image in the request (0-based).")
    filename: str | None = Field(default=None, description="The upload's file name, for multipart requests.")
    caption: str
    confidence: float = Field(
        ge=0.0,
        le=1.0,
        description=(
            "Calibrated probability that the caption is right (its (colour, shape) pairs all correct, on the "
            "data the model was calibrated on); equal to raw_confidence for a model without a calibration "
            "(/readyz: calibrated false)."
        ),
    )
    raw_confidence: float = Field(
        ge=0.0, le=1.0, description="Geometric-mean probability of the generated tokens; higher is surer."
    )
    tokens: int = Field(ge=0, description="Number of caption tokens generated (EOS not counted).")


class DecodeSettings(BaseModel):
    """The decoding options the request ran with (defaults filled in)."""

    max_new_tokens: int
    num_beams: int


class CaptionResponse(BaseModel):
    """``POST /v1/caption``: one caption per image, in request order."""

    model: ModelRef
    results: list[ImageCaptionResult]
    options: DecodeSettings
    batch_size: int = Field(description="Images in the model call this request ran in (others' included).")
    timings: Timings
