"""The in-memory form every source format is read into before the ETL normalises it.

Readers (``snap2caption.data.formats``) turn COCO, Karpathy and Flickr30K files into a
``SourceDataset``; the ETL (``snap2caption.data.etl``) never looks at a source format again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Split = Literal["train", "val", "test"]
SPLITS: tuple[Split, ...] = ("train", "val", "test")


@dataclass(frozen=True)
class SourceBox:
    """One labelled box, in pixel coordinates of the source image as annotated.

    ``bbox`` is COCO's ``(x, y, w, h)``: top-left corner, width and height.
    """

    category: str
    bbox: tuple[float, float, float, float]


@dataclass
class SourceRecord:
    """One image as a source format describes it."""

    image_id: str
    file_name: str  # relative to the images directory given to the ETL
    captions: list[str] = field(default_factory=list)
    boxes: list[SourceBox] = field(default_factory=list)
    split: Split | None = None  # set when the source defines splits (Karpathy)
    width: int | None = None  # as declared by the annotations, if they declare it
    height: int | None = None


@dataclass
class SourceDataset:
    """Everything a reader found: records in a stable order and the category names."""

    source: str  # "coco", "karpathy" or "flickr30k"
    records: list[SourceRecord]
    categories: list[str] = field(default_factory=list)  # detection classes, in source order
