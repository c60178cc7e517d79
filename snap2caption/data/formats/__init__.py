"""The real caption/detection formats: a reader and a writer for each, in one module per format.

Every reader has the signature ``read(images_dir, annotation_paths) -> SourceDataset`` and raises
``BadRequest`` for annotation files it cannot use. ``READERS`` maps the ``--source`` names to them.

The writers do the reverse, from ``SourceRecord`` lists, byte for byte in the layout the public datasets
ship, so that a test fixture in any format and the synthetic benchmark come from the same scenes:

- COCO 2014/2017 ``captions_*.json`` and ``instances_*.json`` (:func:`write_coco`),
- Karpathy's split files ``dataset_coco.json`` / ``dataset_flickr30k.json`` (:func:`write_karpathy`),
- the Kaggle Flickr30K ``results.csv`` (:func:`write_flickr30k_csv`).

Every writer is deterministic (no timestamps, lists ordered as the records are) and atomic
(``snap2caption.data.files.write_if_changed``), so re-running a pipeline step gives identical bytes or
leaves the old file.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from snap2caption.data.formats import coco, flickr30k, karpathy
from snap2caption.data.formats.coco import write_coco
from snap2caption.data.formats.flickr30k import flickr30k_comment, write_flickr30k_csv
from snap2caption.data.formats.karpathy import karpathy_tokens, write_karpathy
from snap2caption.data.records import SourceDataset

Reader = Callable[[Path, Sequence[Path]], SourceDataset]

READERS: dict[str, Reader] = {
    "coco": coco.read,
    "karpathy": karpathy.read,
    "flickr30k": flickr30k.read,
}

__all__ = [
    "READERS",
    "Reader",
    "flickr30k_comment",
    "karpathy_tokens",
    "write_coco",
    "write_flickr30k_csv",
    "write_karpathy",
]
