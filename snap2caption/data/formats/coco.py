"""COCO 2014/2017 ``captions_*.json`` and ``instances_*.json``.

Both files share the COCO layout ``{"images": [...], "annotations": [...], "categories": [...]}``;
a caption annotation has ``caption``, an instance annotation has ``bbox`` and ``category_id``.
Files are told apart by what their annotations hold, not by their names, and merged by image id, so
``captions_val2014.json`` + ``instances_val2014.json`` (+ the train files) give one dataset.
:func:`write_coco` writes both files back, in the layout the public dataset ships.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from snap2caption.data.files import read_annotation_file, write_if_changed
from snap2caption.data.records import SourceBox, SourceDataset, SourceRecord
from snap2caption.errors import BadRequest

log = logging.getLogger(__name__)

# COCO's image folders: train2014, val2014, test2015, train2017, unlabeled2017, ...
_SPLIT_DIR = re.compile(r"^(train|val|test|unlabeled)\d{4}$")
# "COCO_val2014_000000391895.jpg" names its folder; 2017 names ("000000391895.jpg") do not.
_DIR_IN_NAME = re.compile(r"^COCO_((?:train|val|test)\d{4})_")
_DIR_IN_ANNOTATION_NAME = re.compile(r"((?:train|val|test|unlabeled)\d{4})")

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


def load_json(path: Path, what: str) -> Any:
    """Parse an annotation file, turning every way it can be unusable into ``BadRequest``.

    Args:
        path: The annotation file.
        what: The format expected, for the error message ("COCO", "Karpathy").

    Raises:
        BadRequest: The file is missing, unreadable, or not JSON.
    """
    data = read_annotation_file(path, what)
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"{what} annotation file {path} is not valid JSON: {exc}") from None


def _require_list(doc: dict[str, Any], key: str, path: Path) -> list[Any]:
    value = doc.get(key, [])
    if not isinstance(value, list):
        raise BadRequest(f"COCO annotation file {path}: '{key}' must be a list")
    return value


def _candidate_dirs(images_dir: Path, annotation_paths: Sequence[Path]) -> list[str]:
    """Subfolders to try when a file is not directly under ``images_dir`` (the user gave the parent)."""
    dirs: list[str] = []
    for path in annotation_paths:
        match = _DIR_IN_ANNOTATION_NAME.search(path.name)
        if match and match.group(1) not in dirs:
            dirs.append(match.group(1))
    if images_dir.is_dir():
        for child in sorted(images_dir.iterdir()):
            if child.is_dir() and _SPLIT_DIR.match(child.name) and child.name not in dirs:
                dirs.append(child.name)
    return dirs


def _resolve_file(images_dir: Path, image: dict[str, Any], candidates: list[str]) -> str:
    """The image's path relative to ``images_dir``; the annotated name when it is nowhere to be found."""
    file_name = str(image["file_name"])
    if (images_dir / file_name).is_file():
        return file_name
    hinted: list[str] = []
    name_match = _DIR_IN_NAME.match(file_name)
    if name_match:
        hinted.append(name_match.group(1))
    url = image.get("coco_url")
    if isinstance(url, str) and "/" in url:
        # http://images.cocodataset.org/val2017/000000397133.jpg -> "val2017"
        hinted.append(url.rstrip("/").rsplit("/", 2)[-2])
    for sub in [*hinted, *candidates]:
        if _SPLIT_DIR.match(sub) and (images_dir / sub / file_name).is_file():
            return f"{sub}/{file_name}"
    # Missing files stay in the dataset: the ETL quarantines them with a "missing_file" report entry.
    return file_name


def _id_key(image_id: Any) -> tuple[int, int | str]:
    # COCO ids are ints; sort ints numerically and anything else after them, as strings.
    return (0, image_id) if isinstance(image_id, int) else (1, str(image_id))


def read(images_dir: Path, annotation_paths: Sequence[Path]) -> SourceDataset:
    """Read COCO captions and/or instances files into one dataset.

    Args:
        images_dir: The folder holding the images (``val2014/``), or its parent (``coco/`` holding
            ``train2014/`` and ``val2014/``).
        annotation_paths: Any mix of COCO captions and instances files.

    Returns:
        One record per image id, sorted by id, with captions, non-crowd boxes and the declared size;
        categories are the instances' category names in category-id order.

    Raises:
        BadRequest: No file given, or a file is missing, not JSON, or not COCO-shaped.
    """
    if not annotation_paths:
        raise BadRequest("COCO needs at least one annotation file (captions_*.json and/or instances_*.json)")
    images: dict[Any, dict[str, Any]] = {}
    captions: dict[Any, list[str]] = {}
    boxes: dict[Any, list[tuple[int, tuple[float, float, float, float]]]] = {}
    category_names: dict[int, str] = {}
    n_crowd = 0

    for path in annotation_paths:
        doc = load_json(path, "COCO")
        if not isinstance(doc, dict) or "images" not in doc or "annotations" not in doc:
            raise BadRequest(
                f"{path} is not a COCO annotation file: expected an object with 'images' and 'annotations'"
            )
        try:
            for cat in _require_list(doc, "categories", path):
                category_names[int(cat["id"])] = str(cat["name"])
            for image in _require_list(doc, "images", path):
                images.setdefault(image["id"], image)
            for ann in _require_list(doc, "annotations", path):
                image_id = ann["image_id"]
                if "caption" in ann:
                    captions.setdefault(image_id, []).append(str(ann["caption"]))
                if "bbox" in ann:
                    if ann.get("iscrowd", 0):
                        # Crowd regions mark "many objects here", not one object: no YOLO box.
                        n_crowd += 1
                        continue
                    x, y, w, h = (float(v) for v in ann["bbox"])
                    boxes.setdefault(image_id, []).append((int(ann["category_id"]), (x, y, w, h)))
        except (KeyError, TypeError, ValueError) as exc:
            raise BadRequest(f"COCO annotation file {path} has a malformed entry: {exc!r}") from None

    unknown = {cat for anns in boxes.values() for cat, _ in anns} - category_names.keys()
    if unknown:
        raise BadRequest(f"COCO instances refer to category ids not in 'categories': {sorted(unknown)}")
    orphans = (captions.keys() | boxes.keys()) - images.keys()
    if orphans:
        log.warning("coco: %d annotated image ids have no 'images' entry; ignored", len(orphans))

    candidates = _candidate_dirs(images_dir, annotation_paths)
    records = []
    for image_id in sorted(images, key=_id_key):
        image = images[image_id]
        try:
            file_name = _resolve_file(images_dir, image, candidates)
            width = int(image["width"]) if "width" in image else None
            height = int(image["height"]) if "height" in image else None
        except (KeyError, TypeError, ValueError) as exc:
            raise BadRequest(f"COCO image entry {image_id!r} is malformed: {exc!r}") from None
        records.append(
            SourceRecord(
                image_id=str(image_id),
                file_name=file_name,
                captions=captions.get(image_id, []),
                boxes=[SourceBox(category_names[c], bbox) for c, bbox in boxes.get(image_id, [])],
                width=width,
                height=height,
            )
        )
    log.info(
        "coco: %d images, %d captions, %d boxes (%d crowd skipped), %d categories from %d files",
        len(records),
        sum(len(r.captions) for r in records),
        sum(len(r.boxes) for r in records),
        n_crowd,
        len(category_names),
        len(annotation_paths),
    )
    return SourceDataset(
        source="coco",
        records=records,
        categories=[category_names[k] for k in sorted(category_names)],
    )


# ------------------------------------------------------------------------------------------ writing


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
    ids = integer_ids(records)
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
        write_json(
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
        write_json(
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


def integer_ids(records: Sequence[SourceRecord]) -> list[int]:
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


def write_json(path: str | os.PathLike[str], payload: Any, *, compact: bool) -> None:
    """Write an annotation file as its dataset ships it, atomically and only when it changes."""
    # COCO ships compact JSON; Karpathy's files use json.dump's default separators.
    separators = (",", ":") if compact else (", ", ": ")
    write_if_changed(path, json.dumps(payload, separators=separators, ensure_ascii=False).encode())
