"""Wire schemas of the detector service."""

from __future__ import annotations

from pydantic import BaseModel, Field

from snap2caption.serving.schemas import ModelRef, Timings


class ImageSize(BaseModel):
    """The analysed image's size: the original's, after EXIF orientation (the frame boxes are in)."""

    width: int = Field(ge=1)
    height: int = Field(ge=1)


class Box(BaseModel):
    """A box in pixels of the original image after EXIF orientation: (x1, y1) top left, (x2, y2) bottom
    right."""

    x1: float
    y1: float
    x2: float
    y2: float


class DetectedObject(BaseModel):
    """One located object."""

    label: str = Field(description="Class name.")
    class_id: int = Field(ge=0, description="Index of the class in the detector's class list.")
    score: float = Field(ge=0.0, le=1.0, description="Class confidence.")
    box: Box


class ImageObjects(BaseModel):
    """One image's objects, best first, and whether the image is inside what the detector learned.

    The detector knows its training domain (a description of its training images in its own features,
    shipped in the artifact). For an image outside it, its detections are not returned as such: ``objects``
    is empty and ``withheld`` counts them, unless the request sets ``include_out_of_domain=true`` (then they
    come back, flagged by ``in_domain: false``).
    """

    index: int = Field(description="Position of the image in the request (0-based).")
    filename: str | None = Field(default=None, description="The upload's file name, for multipart requests.")
    image: ImageSize
    objects: list[DetectedObject] = Field(
        description="Objects found, best first; empty when the image is outside the detector's training "
        "domain (see `withheld`), unless the request set `include_out_of_domain=true`."
    )
    in_domain: bool | None = Field(
        default=None,
        description="Whether the image is inside the detector's training domain (a detector trained on "
        "synthetic shapes calls real photos out of domain). Null only when the detector artifact has no "
        "domain model (older artifacts): nothing is withheld then.",
    )
    domain_score: float | None = Field(
        default=None,
        gt=0.0,
        le=1.0,
        description="Conformal p-value of the image among held-out in-domain images: low means unlike the "
        "training images; in domain when above the artifact's false-rejection rate (default 0.02). Null "
        "when the detector has no domain model.",
    )
    withheld: int = Field(
        default=0,
        ge=0,
        description="Objects found but not returned because the image is outside the detector's domain; "
        "0 when in domain, without a domain model, or with `include_out_of_domain=true`.",
    )


class DetectSettings(BaseModel):
    """The detection options the request ran with (defaults filled in)."""

    conf: float
    iou: float
    max_det: int
    include_out_of_domain: bool = Field(
        default=False, description="Whether objects of out-of-domain images were returned (flagged)."
    )


class DetectResponse(BaseModel):
    """``POST /v1/detect``: objects per image, in request order."""

    model: ModelRef
    results: list[ImageObjects]
    options: DetectSettings
    batch_size: int = Field(description="Images in the model call this request ran in (others' included).")
    timings: Timings


class ImageTag(BaseModel):
    """One tag: an ImageNet class, its readable name and hashtag."""

    name: str = Field(description="The plain word a post would use, e.g. `cat`.")
    label: str = Field(description="The class label, e.g. `tabby, tabby cat`.")
    score: float = Field(ge=0.0, le=1.0, description="Probability of that class.")
    hashtag: str = Field(description="e.g. `#cat`.")
    class_index: int = Field(ge=0, description="Index of the class in the classifier's output.")


class ImageTags(BaseModel):
    """One image's tags, best first, distinct names."""

    index: int = Field(description="Position of the image in the request (0-based).")
    filename: str | None = Field(default=None, description="The upload's file name, for multipart requests.")
    image: ImageSize
    tags: list[ImageTag]


class TagSettings(BaseModel):
    """The tagging options the request ran with (defaults filled in)."""

    top_k: int
    min_score: float


class TagsResponse(BaseModel):
    """``POST /v1/tags``: tags per image, in request order."""

    model: ModelRef
    results: list[ImageTags]
    options: TagSettings
    batch_size: int = Field(description="Images in the model call this request ran in (others' included).")
    timings: Timings


class AnalyzeResponse(BaseModel):
    """``POST /v1/analyze``: what ``/v1/tags`` and ``/v1/detect`` answer, from one call and one decode per
    image; a key is present only when ``features`` asks for it."""

    tags: TagsResponse | None = Field(default=None, description="Exactly the answer of `POST /v1/tags`.")
    objects: DetectResponse | None = Field(
        default=None, description="Exactly the answer of `POST /v1/detect`."
    )
