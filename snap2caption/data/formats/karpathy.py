"""Karpathy split files: ``dataset_coco.json``, ``dataset_flickr30k.json``, ``dataset_flickr8k.json``.

Layout: ``{"images": [{"filepath"?, "filename", "cocoid"?, "imgid", "split", "sentences": [{"raw",
"tokens", ...}], ...}], "dataset": "coco"}``. The splits are the point of these files (they are what
captioning papers report on), so they are kept; ``restval`` (the COCO val images Karpathy moved to
training) becomes ``train``. :func:`write_karpathy` writes either flavour back.
"""

from __future__ import annotations

import logging
import os
import string
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from snap2caption.data.formats.coco import integer_ids, load_json, write_json
from snap2caption.data.records import SourceDataset, SourceRecord, Split, default_split
from snap2caption.errors import BadRequest

log = logging.getLogger(__name__)

KarpathyFlavour = Literal["coco", "flickr30k"]

_SPLIT_MAP: dict[str, Split] = {"train": "train", "restval": "train", "val": "val", "test": "test"}
_PUNCTUATION_TABLE = str.maketrans("", "", string.punctuation)


def _file_name(images_dir: Path, image: dict[str, Any]) -> str:
    """``filepath/filename`` as the file says, or ``filename`` when the user pointed at that folder."""
    filename = str(image["filename"])
    filepath = image.get("filepath")
    if not filepath:
        return filename
    nested = f"{filepath}/{filename}"
    if not (images_dir / nested).is_file() and (images_dir / filename).is_file():
        return filename
    return nested


def _image_id(image: dict[str, Any]) -> str:
    # COCO's own id keeps records joinable with COCO files; Flickr's id is the file stem.
    if image.get("cocoid") is not None:
        return str(image["cocoid"])
    return PurePosixPath(str(image["filename"])).stem


def read(images_dir: Path, annotation_paths: Sequence[Path]) -> SourceDataset:
    """Read one or more Karpathy split files.

    Args:
        images_dir: For COCO, the folder holding ``train2014/`` and ``val2014/`` (or a single one of
            them); for Flickr30K, the folder holding the images.
        annotation_paths: ``dataset_*.json`` files; records of the same image id are merged.

    Returns:
        Records in file order with ``sentences[].raw`` as captions and the split set.

    Raises:
        BadRequest: No file given, or a file is missing, not JSON, or not Karpathy-shaped.
    """
    if not annotation_paths:
        raise BadRequest("Karpathy needs at least one dataset_*.json file")
    by_id: dict[str, SourceRecord] = {}
    unknown_splits: dict[str, int] = {}
    for path in annotation_paths:
        doc = load_json(path, "Karpathy")
        images = doc.get("images") if isinstance(doc, dict) else None
        if not isinstance(images, list):
            raise BadRequest(f"{path} is not a Karpathy split file: expected an object with an 'images' list")
        try:
            for image in images:
                image_id = _image_id(image)
                raw_split = str(image.get("split", ""))
                split = _SPLIT_MAP.get(raw_split)
                if split is None:
                    unknown_splits[raw_split] = unknown_splits.get(raw_split, 0) + 1
                captions = [str(s["raw"]) for s in image.get("sentences", [])]
                record = by_id.get(image_id)
                if record is None:
                    by_id[image_id] = SourceRecord(
                        image_id=image_id,
                        file_name=_file_name(images_dir, image),
                        captions=captions,
                        split=split,
                    )
                else:
                    record.captions.extend(captions)
        except (KeyError, TypeError, AttributeError) as exc:
            raise BadRequest(f"Karpathy split file {path} has a malformed image entry: {exc!r}") from None
    if unknown_splits:
        # Such records get a hash split from the ETL, like sources that have none.
        log.warning("karpathy: unknown split values %s; those images get a computed split", unknown_splits)
    records = list(by_id.values())
    log.info(
        "karpathy: %d images, %d captions from %d files",
        len(records),
        sum(len(r.captions) for r in records),
        len(annotation_paths),
    )
    return SourceDataset(source="karpathy", records=records)


# ------------------------------------------------------------------------------------------ writing


def karpathy_tokens(caption: str) -> list[str]:
    """Tokenise a caption the way Karpathy's split files do: lowercase, punctuation dropped, split on spaces.

    Args:
        caption: The raw caption.

    Returns:
        The word tokens, e.g. ``"A man's bike."`` -> ``["a", "mans", "bike"]``.
    """
    return caption.lower().translate(_PUNCTUATION_TABLE).split()


def write_karpathy(
    records: Sequence[SourceRecord],
    path: str | os.PathLike[str],
    dataset: KarpathyFlavour = "coco",
    *,
    filepath: str = "images",
) -> None:
    """Write Karpathy's split JSON (``dataset_coco.json`` or ``dataset_flickr30k.json``) for the records.

    The COCO flavour gives each image ``filepath``, ``sentids``, ``filename``, ``imgid``, ``split``,
    ``sentences`` and ``cocoid``; the Flickr30K flavour has no ``filepath``/``cocoid``. ``imgid`` counts
    images from 0 and ``sentid`` counts sentences from 0 over the whole file, as in the Flickr30K file.

    Args:
        records: Images in order. A record without a split gets :func:`default_split` of its id.
        path: Output file.
        dataset: The flavour, also written as the top-level ``"dataset"`` value.
        filepath: COCO flavour only: the folder written as ``filepath`` when a record's ``file_name`` has
            no folder of its own (``"val2014/x.jpg"`` gives ``filepath`` ``"val2014"`` and ``filename``
            ``"x.jpg"``).

    Raises:
        ValueError: On an unknown flavour.
    """
    if dataset not in ("coco", "flickr30k"):
        raise ValueError(f"unknown Karpathy flavour {dataset!r}; expected 'coco' or 'flickr30k'")
    ids = integer_ids(records) if dataset == "coco" else list(range(len(records)))
    images: list[dict[str, Any]] = []
    next_sentid = 0
    for imgid, (record, cocoid) in enumerate(zip(records, ids, strict=True)):
        sentids = list(range(next_sentid, next_sentid + len(record.captions)))
        next_sentid += len(record.captions)
        sentences = [
            {"tokens": karpathy_tokens(raw), "raw": raw, "imgid": imgid, "sentid": sentid}
            for raw, sentid in zip(record.captions, sentids, strict=True)
        ]
        split = record.split or default_split(record.image_id)
        folder, _, filename = record.file_name.rpartition("/")
        if dataset == "coco":
            images.append(
                {
                    "filepath": folder or filepath,
                    "sentids": sentids,
                    "filename": filename,
                    "imgid": imgid,
                    "split": split,
                    "sentences": sentences,
                    "cocoid": cocoid,
                }
            )
        else:
            images.append(
                {
                    "sentids": sentids,
                    "imgid": imgid,
                    "sentences": sentences,
                    "split": split,
                    "filename": filename,
                }
            )
    write_json(path, {"images": images, "dataset": dataset}, compact=False)
