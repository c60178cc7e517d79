"""The in-memory form every source format is read into before the ETL normalises it.

Readers (``snap2caption.data.formats``) turn COCO, Karpathy and Flickr30K files into a
``SourceDataset``; the ETL (``snap2caption.data.etl``) never looks at a source format again. The
writers beside the readers do the reverse, for test fixtures and the synthetic benchmark.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Literal

Split = Literal["train", "val", "test"]
SPLITS: tuple[Split, ...] = ("train", "val", "test")


def default_split(image_id: str) -> Split:
    """A deterministic ~80/10/10 train/val/test split from the image id alone.

    Hashing the id (rather than shuffling the list) keeps an image in the same split when images are
    added or removed, so evaluation sets stay comparable across dataset versions.

    Args:
        image_id: The record's id.

    Returns:
        ``"train"`` for 8 buckets out of 10, ``"val"`` and ``"test"`` for one each.
    """
    bucket = int.from_bytes(hashlib.sha256(image_id.encode()).digest()[:8], "big") % 10
    if bucket == 8:
        return "val"
    if bucket == 9:
        return "test"
    return "train"


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
