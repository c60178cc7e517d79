"""What one ETL run is asked to do (:class:`EtlConfig`) and what it did (:class:`EtlReport`)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from snap2caption.data.captions import CaptionPolicy
from snap2caption.data.formats import READERS
from snap2caption.data.records import SPLITS
from snap2caption.errors import BadRequest
from snap2caption.imaging.decode import DEFAULT_LIMITS, DecodeLimits


def _default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclass
class EtlConfig:
    """One ETL run.

    Attributes:
        source: Reader name: ``"coco"``, ``"karpathy"`` or ``"flickr30k"``.
        images: Folder the annotation file names are relative to.
        annotations: Annotation files (COCO: captions and/or instances; Karpathy: dataset_*.json;
            Flickr30K: results.csv).
        out: Output folder; re-running into it is incremental.
        captions: Caption normalisation policy.
        max_side: Longest side of the resized image store (never upscaled).
        val_fraction: Share of images put in ``val`` when the source has no splits.
        test_fraction: Share of images put in ``test`` when the source has no splits.
        seed: Salt of the split hash; another seed gives another, equally stable, split.
        workers: Processes that hash, decode and resize.
        jpeg_quality: Quality of the resized JPEGs.
        limits: Byte and pixel caps applied when decoding, as in serving.
    """

    source: str
    images: Path
    annotations: list[Path]
    out: Path
    captions: CaptionPolicy = field(default_factory=CaptionPolicy)
    max_side: int = 512
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int = 0
    workers: int = field(default_factory=_default_workers)
    jpeg_quality: int = 90
    limits: DecodeLimits = field(default_factory=lambda: DEFAULT_LIMITS)

    def __post_init__(self) -> None:
        # Callers (the ETL service, tests) may hand over strings.
        self.images = Path(self.images)
        self.out = Path(self.out)
        self.annotations = [Path(p) for p in self.annotations]

    def validate(self) -> None:
        """Refuse settings that cannot give a sound dataset.

        Raises:
            BadRequest: Unknown source, missing images folder, output overlapping the input, or a
                value out of range.
        """
        if self.source not in READERS:
            raise BadRequest(f"unknown source {self.source!r}; expected one of {sorted(READERS)}")
        if not self.images.is_dir():
            raise BadRequest(f"images folder not found: {self.images}")
        if not self.annotations:
            raise BadRequest("at least one annotation file is needed")
        if not 0.0 <= self.val_fraction < 1.0 or not 0.0 <= self.test_fraction < 1.0:
            raise BadRequest("val_fraction and test_fraction must be in [0, 1)")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise BadRequest("val_fraction + test_fraction must leave some images for training")
        if self.max_side < 1:
            raise BadRequest(f"max_side must be >= 1, got {self.max_side}")
        if not 1 <= self.jpeg_quality <= 100:
            raise BadRequest(f"jpeg_quality must be in [1, 100], got {self.jpeg_quality}")
        if self.workers < 1:
            raise BadRequest(f"workers must be >= 1, got {self.workers}")
        # The ETL deletes stale files in the folders it owns: they must never hold source images.
        images = self.images.resolve()
        if any(images.is_relative_to(d) for d in self.owned_dirs()):
            raise BadRequest(f"output folder {self.out} overlaps the images folder {self.images}")

    def owned_dirs(self) -> list[Path]:
        """The output folders whose every file the ETL may replace or delete."""
        out = self.out.resolve()
        return [out / "images", out / "labels", out / "manifests"]


@dataclass
class EtlReport:
    """What a run did. ``to_dict(deterministic=True)`` is what ``report.json`` holds."""

    source: str
    out: Path
    records: int = 0  # records the reader returned
    images_ok: int = 0  # unique images in the manifests
    captions_kept: int = 0
    captions_dropped: int = 0  # empty or outside the word bounds of the policy
    captions_repeated: int = 0  # same text as another caption of the image, after normalisation
    boxes_kept: int = 0
    boxes_dropped: int = 0  # degenerate once clipped to the image
    splits: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    categories: list[str] = field(default_factory=list)
    quarantined: list[dict[str, str]] = field(default_factory=list)  # {file, code, reason}
    duplicates: list[dict[str, str]] = field(default_factory=list)  # {kept, dropped, kept_id, dropped_id}
    images_decoded: int = 0  # decoded in this run
    images_cached: int = 0  # unique images not decoded because nothing about them changed
    seconds: float = 0.0

    @property
    def duplicates_collapsed(self) -> int:
        return len(self.duplicates)

    def to_dict(self, deterministic: bool = False) -> dict[str, Any]:
        """The report as plain JSON types.

        Args:
            deterministic: Leave out what changes from run to run on the same inputs (timings,
                cache hits, the output path), as ``report.json`` must.
        """
        counts = {
            "records": self.records,
            "images_ok": self.images_ok,
            "quarantined": len(self.quarantined),
            "duplicates_collapsed": self.duplicates_collapsed,
            "captions_kept": self.captions_kept,
            "captions_dropped": self.captions_dropped,
            "captions_repeated": self.captions_repeated,
            "boxes_kept": self.boxes_kept,
            "boxes_dropped": self.boxes_dropped,
        }
        doc: dict[str, Any] = {
            "source": self.source,
            "counts": counts,
            "splits": dict(self.splits),
            "categories": list(self.categories),
            "quarantined": list(self.quarantined),
            "duplicates": list(self.duplicates),
        }
        if not deterministic:
            doc.update(
                out=str(self.out),
                images_decoded=self.images_decoded,
                images_cached=self.images_cached,
                seconds=round(self.seconds, 3),
            )
        return doc
