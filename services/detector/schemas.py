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
    """One image's objects, best first."""

    index: int = Field(description="Position of the image in the request (0-based).")
    filename: str | None = Field(default=None, description="The upload's file name, for multipart requests.")
    image: ImageSize
    objects: list[DetectedObject]


class DetectSettings(BaseModel):
    """The detection options the request ran with (defaults filled in)."""

    conf: float
    iou: float
    max_det: int


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
