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
    in_domain: bool | None = Field(
        default=None,
        description="Whether the image is inside the captioner's training domain (the domain model its "
        "artifact carries, calibrated to a stated false-rejection rate); a caption of an image outside it "
        "is not to be trusted. None only when the artifact has no domain model (older artifacts).",
    )
    domain_score: float | None = Field(
        default=None,
        gt=0.0,
        le=1.0,
        description="The domain model's conformal p-value in (0, 1]: low means unlike the training images; "
        "the image is in domain when it is above the false-rejection rate (see /readyz). None only "
        "without a domain model.",
    )


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
