"""Writers for the real caption and detection formats, from ``SourceRecord`` lists.

The readers in ``snap2caption.data.formats`` turn these files into ``SourceRecord``s; the writers here do
the reverse, byte for byte in the layout the public datasets ship, so that a test fixture in any format
and the synthetic benchmark come from the same scenes:

- COCO 2014/2017 ``captions_*.json`` and ``instances_*.json`` (:func:`write_coco`),
- Karpathy's split files ``dataset_coco.json`` / ``dataset_flickr30k.json`` (:func:`write_karpathy`),
- the Kaggle Flickr30K ``results.csv`` (:func:`write_flickr30k_csv`).

Every writer is deterministic (no timestamps, lists ordered as the records are) and atomic (a temporary
file renamed into place), so re-running a pipeline step gives identical bytes or leaves the old file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import string
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from snap2caption.data.records import SourceRecord, Split

KarpathyFlavour = Literal["coco", "flickr30k"]

# Fixed, so the files never change between runs; callers may pass their own.
DEFAULT_INFO: dict[str, Any] = {
    "description": "Snap2Caption export",
    "url": "",
    "version": "1.0",
    "year": 2024,
    "contributor": "Snap2Caption",
    "date_created": "2024/01/01",
}
DEFAULT_LICENSE: dict[str, Any] = {"url": "", "id": 1, "name": "unspecified"}
# COCO images carry a capture date; a constant keeps the JSON stable.
_DATE_CAPTURED = "2024-01-01 00:00:00"

_PUNCTUATION_TABLE = str.maketrans("", "", string.punctuation)


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


def karpathy_tokens(caption: str) -> list[str]:
    """Tokenise a caption the way Karpathy's split files do: lowercase, punctuation dropped, split on spaces.

    Args:
        caption: The raw caption.

    Returns:
        The word tokens, e.g. ``"A man's bike."`` -> ``["a", "mans", "bike"]``.
    """
    return caption.lower().translate(_PUNCTUATION_TABLE).split()


def flickr30k_comment(caption: str) -> str:
    """Format a caption as the Kaggle ``results.csv`` stores it: punctuation spaced off, ending in `` .``.

    The real file is tokenised text (``"Two men , one in a gray shirt , ..."``) with a space before the
    final period; we reproduce that rather than a cleaned form so readers are tested on the real thing.

    Args:
        caption: Any caption (whitespace is collapsed).

    Returns:
        The comment field, e.g. ``"a red circle , a blue square ."``.

    Raises:
        ValueError: If the caption contains ``|``, which the format cannot represent.
    """
    if "|" in caption:
        raise ValueError(f"caption contains '|', which results.csv cannot hold: {caption!r}")
    text = " ".join(caption.split())
    text = re.sub(r"\s*([,;:])\s*", r" \1 ", text)
    text = " ".join(text.split())
    ending = "."
    if text and text[-1] in ".!?":
        ending = text[-1]
        text = text[:-1].rstrip()
    return f"{text} {ending}" if text else ending


def write_coco(
    records: Sequence[SourceRecord],
    categories: Sequence[str],
    captions_path: str | os.PathLike[str] | None,
    instances_path: str | os.PathLike[str] | None = None,
    *,
    segmentations: Mapping[str, Sequence[Sequence[float] | None]] | None = None,
    info: Mapping[str, Any] | None = None,
    license: Mapping[str, Any] | None = None,
) -> None:
    """Write COCO 2014/2017 ``captions`` and/or ``instances`` JSON for the records.

    Image ids are the records' ids when they are all decimal (COCO's are), else 1..N in record order.
    ``file_name`` is the record's, relative to the images folder as in COCO. Category ids are 1-based in
    the order of ``categories``, with ``supercategory`` ``"shape"``.

    Args:
        records: Images in the order to write them; each needs ``width`` and ``height``.
        categories: Detection class names; every box's category must be one of them.
        captions_path: Where to write the captions file, or None to skip it.
        instances_path: Where to write the instances file, or None to skip it.
        segmentations: Optional polygons per image id, one flat ``[x1, y1, x2, y2, ...]`` list (or None)
            per box in box order. Without one a box gets ``"segmentation": []`` and ``area = w * h``.
        info: The ``info`` block; a fixed default otherwise.
        license: The one ``licenses`` entry (id 1) every image refers to.

    Raises:
        ValueError: On missing sizes, duplicate ids, unknown categories or mismatched segmentations.
    """
    if captions_path is None and instances_path is None:
        raise ValueError("write_coco needs captions_path or instances_path")
    ids = _integer_ids(records)
    info_block = dict(info or DEFAULT_INFO)
    license_block = dict(license or DEFAULT_LICENSE)
    images = [
        _coco_image(record, image_id, license_block["id"])
        for record, image_id in zip(records, ids, strict=True)
    ]

    if captions_path is not None:
        caption_anns: list[dict[str, Any]] = []
        for record, image_id in zip(records, ids, strict=True):
            for caption in record.captions:
                caption_anns.append({"image_id": image_id, "id": len(caption_anns) + 1, "caption": caption})
        _write_json(
            captions_path,
            {"info": info_block, "licenses": [license_block], "images": images, "annotations": caption_anns},
            compact=True,
        )

    if instances_path is not None:
        category_ids = {name: i + 1 for i, name in enumerate(categories)}
        box_anns: list[dict[str, Any]] = []
        for record, image_id in zip(records, ids, strict=True):
            polygons = _polygons_for(record, segmentations)
            for box, polygon in zip(record.boxes, polygons, strict=True):
                if box.category not in category_ids:
                    raise ValueError(f"image {record.image_id}: unknown category {box.category!r}")
                x, y, w, h = box.bbox
                area = _polygon_area(polygon) if polygon else w * h
                box_anns.append(
                    {
                        "segmentation": [list(polygon)] if polygon else [],
                        "area": round(float(area), 2),
                        "iscrowd": 0,
                        "image_id": image_id,
                        "bbox": [float(x), float(y), float(w), float(h)],
                        "category_id": category_ids[box.category],
                        "id": len(box_anns) + 1,
                    }
                )
        coco_categories = [
            {"supercategory": "shape", "id": i, "name": name} for name, i in category_ids.items()
        ]
        _write_json(
            instances_path,
            {
                "info": info_block,
                "licenses": [license_block],
                "images": images,
                "annotations": box_anns,
                "categories": coco_categories,
            },
            compact=True,
        )


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
    ids = _integer_ids(records) if dataset == "coco" else list(range(len(records)))
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
    _write_json(path, {"images": images, "dataset": dataset}, compact=False)


def write_flickr30k_csv(records: Iterable[SourceRecord], path: str | os.PathLike[str]) -> None:
    """Write the Kaggle Flickr30K ``results.csv``: ``image_name| comment_number| comment`` rows.

    Separators are a pipe and a space, comments are numbered from 0 per image, and each comment is
    formatted by :func:`flickr30k_comment` (space before the final period), as in the real file.

    Args:
        records: Images in order; ``image_name`` is the base name of each ``file_name``.
        path: Output file.
    """
    lines = ["image_name| comment_number| comment"]
    for record in records:
        name = record.file_name.rpartition("/")[2]
        for number, caption in enumerate(record.captions):
            lines.append(f"{name}| {number}| {flickr30k_comment(caption)}")
    _write_text(path, "\n".join(lines) + "\n")


def _integer_ids(records: Sequence[SourceRecord]) -> list[int]:
    """COCO wants integer image ids: keep decimal ids, else number the records 1..N."""
    ids = [record.image_id for record in records]
    if len(set(ids)) != len(ids):
        raise ValueError("duplicate image ids")
    if all(image_id.isdecimal() for image_id in ids):
        return [int(image_id) for image_id in ids]
    return list(range(1, len(records) + 1))


def _coco_image(record: SourceRecord, image_id: int, license_id: int) -> dict[str, Any]:
    if record.width is None or record.height is None:
        raise ValueError(f"image {record.image_id}: COCO needs width and height")
    # Key order as in the COCO 2017 files.
    return {
        "license": license_id,
        "file_name": record.file_name,
        "coco_url": "",
        "height": record.height,
        "width": record.width,
        "date_captured": _DATE_CAPTURED,
        "flickr_url": "",
        "id": image_id,
    }


def _polygons_for(
    record: SourceRecord, segmentations: Mapping[str, Sequence[Sequence[float] | None]] | None
) -> list[Sequence[float] | None]:
    if segmentations is None or record.image_id not in segmentations:
        return [None] * len(record.boxes)
    polygons = list(segmentations[record.image_id])
    if len(polygons) != len(record.boxes):
        raise ValueError(f"image {record.image_id}: {len(polygons)} polygons for {len(record.boxes)} boxes")
    return polygons


def _polygon_area(flat: Sequence[float]) -> float:
    """Shoelace area of a flat ``[x1, y1, x2, y2, ...]`` polygon (what COCO's ``area`` measures)."""
    xs, ys = flat[0::2], flat[1::2]
    n = len(xs)
    twice = sum(xs[i] * ys[(i + 1) % n] - xs[(i + 1) % n] * ys[i] for i in range(n))
    return abs(twice) / 2.0


def _write_json(path: str | os.PathLike[str], payload: Any, *, compact: bool) -> None:
    # COCO ships compact JSON; Karpathy's files use json.dump's default separators.
    separators = (",", ":") if compact else (", ", ": ")
    _write_text(path, json.dumps(payload, separators=separators, ensure_ascii=False))


def _write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write atomically: a reader never sees a half-written annotation file."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as handle:
            handle.write(text)
        # mkstemp creates 0600; annotation files are shared data, readable like any other file.
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
