"""Response schemas of the public gateway API (``/v1/analyze``, ``/v1/analyze/batch``, ``/v1/feedback``).

One contract, two readers: the gateway declares them as ``response_model`` (``services/gateway/``) and
``snap2caption.client`` parses answers with them. This module depends on pydantic alone, so the client
needs neither FastAPI nor the services. Request models stay server-side in ``services/gateway/schemas.py``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

Feature = Literal["caption", "alt_text", "tags", "objects"]
FEATURES: tuple[Feature, ...] = ("caption", "alt_text", "tags", "objects")


class WireModel(BaseModel):
    """Base of the response schemas: unknown fields are ignored, and ``raw`` keeps the JSON as received."""

    # Tolerant on purpose: a newer gateway may add fields; an older client must keep working.
    model_config = ConfigDict(extra="ignore")

    _raw: dict[str, Any] | None = PrivateAttr(default=None)

    @property
    def raw(self) -> dict[str, Any]:
        """The JSON object as the gateway sent it (fields this side does not know included).

        Set by the client on the top-level answer it parsed; otherwise the model dumped as JSON.
        """
        return self._raw if self._raw is not None else self.model_dump(mode="json")


class ImageInfo(WireModel):
    """The analysed image, after EXIF orientation (the frame boxes are in)."""

    width: int = Field(ge=1)
    height: int = Field(ge=1)
    format: str = Field(description="Format judged from the bytes: jpeg, png, webp, gif, bmp, tiff.")


class CaptionResult(WireModel):
    """The caption, how sure the model is, and whether the image is inside what the model learned."""

    text: str
    confidence: float = Field(
        ge=0,
        le=1,
        description=(
            "Calibrated probability that the caption is right (the captioner's confidence); the raw "
            "geometric-mean token probability for a model without a calibration."
        ),
    )
    in_domain: bool | None = Field(
        default=None,
        description="Whether the image is inside the captioner's training domain; outside it the caption "
        "is very likely wrong and is never used for alt text. `null` when the captioner's model has no "
        "domain description (older artifacts; treated as inside, and listed by the gateway's `/readyz`).",
    )
    domain_score: float | None = Field(
        default=None,
        description="The captioner's domain score, a p-value in (0, 1]: low means unlike its training "
        "images (`null` without a domain description).",
    )
    used_for_alt_text: bool | None = Field(
        default=None,
        description="Whether this caption became the alt text (`null` when alt text was not asked for).",
    )
    note: str | None = Field(
        default=None,
        description="Why the caption is not (or would not be) the alt text: outside the captioner's "
        "training domain, or a confidence under the alt-text threshold; `null` when it is trusted.",
    )


class AltTextResult(WireModel):
    """Alt text for screen readers."""

    text: str = Field(description="Sentence case, full stop, at most ~125 characters.")
    source: Literal["caption", "fallback"] = Field(
        description="`caption`: the cleaned caption; `fallback`: built from tags and objects."
    )


class TagResult(WireModel):
    """One tag."""

    name: str
    score: float = Field(ge=0, le=1)
    hashtag: str


class Box(WireModel):
    """Pixels of the original image after EXIF orientation: (x1, y1) top left, (x2, y2) bottom right."""

    x1: float
    y1: float
    x2: float
    y2: float


class ObjectResult(WireModel):
    """One located object."""

    label: str
    score: float = Field(ge=0, le=1)
    box: Box


class ObjectsDomain(WireModel):
    """The detector's domain answer for the image, beside the objects."""

    in_domain: bool | None = Field(
        default=None,
        description="Whether the image is inside the detector's training domain; outside it the detector "
        "returns no objects (they are counted in `withheld`) and its classes are not used for alt text. "
        "`null` when the detector's model has no domain description (treated as inside).",
    )
    domain_score: float | None = Field(
        default=None, description="The detector's domain score, a p-value in (0, 1] (`null` without one)."
    )
    withheld: int = Field(
        default=0, ge=0, description="Detections withheld because the image is outside the detector's domain."
    )


class ModelInfo(WireModel):
    """A model version that answered."""

    name: str
    version: int
    alias: str
    backend: str = Field(
        description="The runtime that ran the model (`onnx`, `torch`); the field keeps its first name for "
        "clients that read it."
    )


class FeatureError(WireModel):
    """A feature left out of a partial result, and why."""

    feature: Feature
    code: str = Field(description="e.g. `backend_unavailable`, `timeout`, `circuit_open`, `overloaded`.")
    message: str


class AnalyzeTimings(WireModel):
    """Where the time went, in milliseconds; a backend's entry is absent when it was not called."""

    # Entries a newer gateway adds are kept, in ``model_extra``, rather than dropped.
    model_config = ConfigDict(extra="allow")

    decode_ms: float = Field(description="Reading, checking, decoding and normalising the image.")
    fetch_ms: float | None = Field(default=None, description="Fetching the URL, for URL requests.")
    captioner_ms: float | None = None
    detector_tags_ms: float | None = Field(
        default=None,
        description="The detector call that computed the tags. One call computes tags and objects, so this "
        "and `detector_objects_ms` are the same call's time when both were computed.",
    )
    detector_objects_ms: float | None = Field(
        default=None, description="The detector call that located objects."
    )
    total_ms: float


_EXAMPLE: dict[str, Any] = {
    "request_id": "6f1c2d0e9b5a4c7e8d3f2a1b0c9d8e7f",
    "inference_id": "019a6a4e-3c1d-7b2e-9f40-5d8c2b7a1e63",
    "image": {"width": 640, "height": 480, "format": "jpeg"},
    "caption": {
        "text": "a dog catching a frisbee in a park",
        "confidence": 0.62,
        "in_domain": True,
        "domain_score": 0.41,
        "used_for_alt_text": True,
        "note": None,
    },
    "alt_text": {"text": "A dog catching a frisbee in a park.", "source": "caption"},
    "tags": [{"name": "dog", "score": 0.91, "hashtag": "#dog"}],
    "objects": [{"label": "dog", "score": 0.88, "box": {"x1": 102.5, "y1": 80.0, "x2": 388.1, "y2": 410.7}}],
    "objects_domain": {"in_domain": True, "domain_score": 0.37, "withheld": 0},
    "models": {
        "caption": {"name": "captioner", "version": 3, "alias": "production", "backend": "onnx"},
        "tags": {"name": "tagger", "version": 1, "alias": "production", "backend": "onnx"},
        "objects": {"name": "detector", "version": 2, "alias": "production", "backend": "onnx"},
    },
    "timings": {
        "decode_ms": 4.1,
        "captioner_ms": 38.0,
        "detector_tags_ms": 30.2,
        "detector_objects_ms": 30.2,
        "total_ms": 45.3,
    },
    "errors": [],
}


class AnalyzeResult(WireModel):
    """Everything known about one image; features that failed are ``null`` and listed in ``errors``."""

    model_config = ConfigDict(json_schema_extra={"examples": [_EXAMPLE]})

    request_id: str
    inference_id: str | None = Field(
        default=None,
        description="This analysis' key in the inference log, made by the gateway (unlike `request_id`, "
        "which a client may choose and reuse); send it with feedback.",
    )
    image: ImageInfo
    caption: CaptionResult | None = None
    alt_text: AltTextResult | None = None
    tags: list[TagResult] | None = None
    objects: list[ObjectResult] | None = None
    objects_domain: ObjectsDomain | None = Field(
        default=None,
        description="With `objects`: the detector's domain answer for this image and how many detections "
        "it withheld because of it.",
    )
    models: dict[str, ModelInfo] = Field(
        default_factory=dict, description="Model that computed each feature (`caption`, `tags`, `objects`)."
    )
    timings: AnalyzeTimings
    errors: list[FeatureError] = Field(
        default_factory=list, description="Features that failed (partial result)."
    )


class ItemError(WireModel):
    """Why one batch item has no result (the envelope's fields, without the request id)."""

    code: str
    message: str
    status: int = Field(description="The status this item alone would have got.")


class BatchItem(WireModel):
    """One batch item: a result or an error."""

    index: int = Field(description="Position in the request (0-based).")
    filename: str | None = None
    url: str | None = None
    result: AnalyzeResult | None = None
    error: ItemError | None = None

    @property
    def ok(self) -> bool:
        """Whether the item was analysed."""
        return self.result is not None


class AnalyzeBatchResponse(WireModel):
    """``POST /v1/analyze/batch``: one entry per image, in request order."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "request_id": "0a1b2c3d4e5f60718293a4b5c6d7e8f9",
                    "items": [
                        {"index": 0, "filename": "cat.jpg", "result": _EXAMPLE, "error": None},
                        {
                            "index": 1,
                            "filename": "notes.txt",
                            "result": None,
                            "error": {
                                "code": "unsupported_format",
                                "message": "unsupported format: the bytes look like plain text; ...",
                                "status": 415,
                            },
                        },
                    ],
                    "succeeded": 1,
                    "failed": 1,
                    "total_ms": 61.0,
                }
            ]
        }
    )

    request_id: str
    items: list[BatchItem]
    succeeded: int
    failed: int
    total_ms: float


class FeedbackResponse(WireModel):
    """The stored feedback's id, and the analysis it is about."""

    id: int
    inference_id: str | None = Field(default=None, description="The analysis' `inference_id`.")
    request_id: str = Field(description="The analysis' request id (its correlation id).")
    image_stored: bool = Field(
        default=False, description="Whether the image sent with the feedback was kept for training data."
    )
