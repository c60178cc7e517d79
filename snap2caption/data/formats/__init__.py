"""Readers for the real caption/detection formats, each turning files into a ``SourceDataset``.

Every reader has the signature ``read(images_dir, annotation_paths) -> SourceDataset`` and raises
``BadRequest`` for annotation files it cannot use. ``READERS`` maps the ``--source`` names to them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from snap2caption.data.formats import coco, flickr30k, karpathy
from snap2caption.data.records import SourceDataset

Reader = Callable[[Path, Sequence[Path]], SourceDataset]

READERS: dict[str, Reader] = {
    "coco": coco.read,
    "karpathy": karpathy.read,
    "flickr30k": flickr30k.read,
}

__all__ = ["READERS", "Reader"]
