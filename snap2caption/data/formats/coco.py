"""COCO 2014/2017 ``captions_*.json`` and ``instances_*.json``.

Both files share the COCO layout ``{"images": [...], "annotations": [...], "categories": [...]}``;
a caption annotation has ``caption``, an instance annotation has ``bbox`` and ``category_id``.
Files are told apart by what their annotations hold, not by their names, and merged by image id, so
``captions_val2014.json`` + ``instances_val2014.json`` (+ the train files) give one dataset.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from snap2caption.data.records import SourceBox, SourceDataset, SourceRecord
from snap2caption.errors import BadRequest

log = logging.getLogger(__name__)

# COCO's image folders: train2014, val2014, test2015, train2017, unlabeled2017, ...
_SPLIT_DIR = re.compile(r"^(train|val|test|unlabeled)\d{4}$")
# "COCO_val2014_000000391895.jpg" names its folder; 2017 names ("000000391895.jpg") do not.
_DIR_IN_NAME = re.compile(r"^COCO_((?:train|val|test)\d{4})_")
_DIR_IN_ANNOTATION_NAME = re.compile(r"((?:train|val|test|unlabeled)\d{4})")


def load_json(path: Path, what: str) -> Any:
    """Parse an annotation file, turning every way it can be unusable into ``BadRequest``.

    Args:
        path: The annotation file.
        what: The format expected, for the error message ("COCO", "Karpathy").

    Raises:
        BadRequest: The file is missing, unreadable, or not JSON.
    """
    try:
        with path.open("rb") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise BadRequest(f"{what} annotation file not found: {path}") from None
    except IsADirectoryError:
        raise BadRequest(f"{what} annotation path is a directory, not a file: {path}") from None
    except OSError as exc:
        raise BadRequest(f"cannot read {what} annotation file {path}: {exc.strerror or exc}") from None
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
