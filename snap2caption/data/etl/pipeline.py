"""The run: :func:`run_etl` and its steps (hash and group, decode, write the outputs)."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from snap2caption.data.captions import CaptionPolicy, normalise_caption
from snap2caption.data.etl.boxes import clip_box, orient_box, yolo_line
from snap2caption.data.etl.cache import CACHE_NAME, EtlCache
from snap2caption.data.etl.config import EtlConfig, EtlReport
from snap2caption.data.etl.runner import DecodeTask, Runner, decode_and_store, hash_file
from snap2caption.data.files import write_if_changed
from snap2caption.data.formats import READERS
from snap2caption.data.records import SPLITS, SourceBox, SourceDataset, SourceRecord, Split
from snap2caption.errors import BadRequest
from snap2caption.hashing import sha256_file
from snap2caption.monitoring.reference import REFERENCE_FILE, build_reference

log = logging.getLogger(__name__)

_UNSAFE_ID_CHARS = re.compile(r"[^A-Za-z0-9_-]")

BOX_TYPE = pa.struct(
    [
        ("category", pa.string()),
        ("class_id", pa.int32()),
        ("bbox", pa.list_(pa.float32())),  # (x, y, w, h) in pixels of the EXIF-applied original
    ]
)
MANIFEST_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("path", pa.string()),  # resized image, relative to the output folder
        ("width", pa.int32()),  # original size, after EXIF orientation
        ("height", pa.int32()),
        ("captions", pa.list_(pa.string())),
        ("boxes", pa.list_(BOX_TYPE)),
        ("split", pa.string()),
        ("sha256", pa.string()),  # of the source file's bytes
        ("source_file", pa.string()),  # relative to the images folder
    ]
)


def hash_split(image_id: str, seed: int, val_fraction: float, test_fraction: float) -> Split:
    """A split from a hash of ``seed:image_id``: stable when other images come or go.

    Args:
        image_id: The image's id.
        seed: Salt; another seed reshuffles.
        val_fraction: Expected share of ``val``.
        test_fraction: Expected share of ``test``.
    """
    digest = hashlib.sha256(f"{seed}:{image_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64  # uniform in [0, 1)
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def safe_image_id(image_id: str) -> str:
    """A file-name-safe form of an id: ``[A-Za-z0-9_-]``, with a hash suffix when anything changed.

    The suffix keeps two ids that sanitise alike (``a/b``, ``a_b``) apart.
    """
    safe = _UNSAFE_ID_CHARS.sub("_", image_id)[:96]
    if safe != image_id or not safe:
        safe = f"{safe}-{hashlib.sha1(image_id.encode()).hexdigest()[:10]}"
    return safe


@dataclass
class _Group:
    """Records whose files have the same bytes: one image, the first record's id, every caption."""

    sha256: str
    records: list[SourceRecord]
    split: Split
    src: str  # absolute path of the kept record's file: the key of its cache entry
    dst: str  # resized image, relative to out
    verdict: dict[str, Any] | None = None  # {"image": ...} or {"error": [code, reason]}

    @property
    def kept(self) -> SourceRecord:
        return self.records[0]


def _source_path(images_dir: Path, file_name: str) -> Path | None:
    """The file under ``images_dir``, or ``None`` when the name would leave it (absolute, ``..``)."""
    rel = PurePosixPath(file_name.replace("\\", "/"))
    if not file_name or rel.is_absolute() or ".." in rel.parts:
        return None
    return images_dir / rel


def _check_unique_ids(dataset: SourceDataset) -> None:
    seen: set[str] = set()
    for record in dataset.records:
        if record.image_id in seen:
            raise BadRequest(f"{dataset.source}: image id {record.image_id!r} appears twice")
        seen.add(record.image_id)


def _boxes_for(
    group: _Group, image: dict[str, Any], class_ids: dict[str, int], report: EtlReport
) -> list[tuple[str, int, tuple[float, float, float, float]]]:
    """The group's boxes, in the frame of the EXIF-applied image, clipped; degenerate ones dropped."""
    source_boxes: list[SourceBox] = next((r.boxes for r in group.records if r.boxes), [])
    width, height, orientation = image["width"], image["height"], image["orientation"]
    raw_w, raw_h = (height, width) if orientation in (5, 6, 7, 8) else (width, height)
    declared = (group.kept.width, group.kept.height)
    # COCO annotators saw the stored pixels (browsers ignored EXIF then), so boxes are on the raw
    # frame unless the declared size says the annotation was made on the rotated image.
    on_raw_frame = declared != (width, height) or (raw_w, raw_h) == (width, height)
    boxes = []
    for box in source_boxes:
        bbox = orient_box(box.bbox, orientation, raw_w, raw_h) if on_raw_frame else box.bbox
        clipped = clip_box(bbox, width, height)
        if clipped is None or box.category not in class_ids:
            report.boxes_dropped += 1
            continue
        boxes.append((box.category, class_ids[box.category], clipped))
    report.boxes_kept += len(boxes)
    return boxes


def _captions_for(group: _Group, policy: CaptionPolicy, report: EtlReport) -> list[str]:
    captions: list[str] = []
    for record in group.records:
        for raw in record.captions:
            text = normalise_caption(raw, policy)
            if text is None:
                report.captions_dropped += 1
            elif text in captions:
                report.captions_repeated += 1
            else:
                captions.append(text)
    report.captions_kept += len(captions)
    return captions


def _write_manifest(path: Path, rows: list[dict[str, Any]]) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), sink)
    write_if_changed(path, sink.getvalue().to_pybytes())


def _remove_stale(out: Path, expected: set[str]) -> int:
    """Delete files under ``out/{images,labels}/{split}/`` that this run did not produce."""
    removed = 0
    for kind in ("images", "labels"):
        for split in SPLITS:
            folder = out / kind / split
            if not folder.is_dir():
                continue
            for entry in folder.iterdir():
                if entry.is_file() and f"{kind}/{split}/{entry.name}" not in expected:
                    entry.unlink()
                    removed += 1
    return removed


def run_etl(
    cfg: EtlConfig, progress: bool = True, on_progress: Callable[[str, int, int], None] | None = None
) -> EtlReport:
    """Build (or bring up to date) the normalised dataset in ``cfg.out``.

    Args:
        cfg: What to read and where to write.
        progress: Show a tqdm bar for each long step.
        on_progress: Called as ``(stage, done, total)`` with stage ``"hash"``, ``"decode"`` or
            ``"write"``, for the ETL service to report progress.

    Returns:
        The report; ``report.json`` in ``cfg.out`` holds its deterministic part.

    Raises:
        BadRequest: Bad configuration or unusable annotation files. Bad images never raise: they
            are quarantined and reported.
    """
    started = time.perf_counter()
    cfg.validate()
    dataset = READERS[cfg.source](cfg.images, cfg.annotations)
    _check_unique_ids(dataset)
    out = cfg.out
    out.mkdir(parents=True, exist_ok=True)
    report = EtlReport(
        source=cfg.source, out=out, records=len(dataset.records), categories=list(dataset.categories)
    )
    cache = EtlCache(out / CACHE_NAME, cfg.limits)
    runner = Runner(cfg.workers, progress, on_progress)
    try:
        groups, sources = _hash_and_group(cfg, dataset, cache, runner, report)
        _decode(cfg, groups, cache, runner, report)
        _write_outputs(cfg, dataset, groups, cache, runner, report)
        cache.save(sources, {g.dst for g in groups if g.verdict and "image" in g.verdict})
    finally:
        runner.close()
    report.seconds = time.perf_counter() - started
    log.info(
        "etl done: source=%s records=%d images_ok=%d quarantined=%d duplicates=%d splits=%s "
        "captions_kept=%d captions_dropped=%d boxes_kept=%d decoded=%d cached=%d seconds=%.2f out=%s",
        cfg.source,
        report.records,
        report.images_ok,
        len(report.quarantined),
        report.duplicates_collapsed,
        report.splits,
        report.captions_kept,
        report.captions_dropped,
        report.boxes_kept,
        report.images_decoded,
        report.images_cached,
        report.seconds,
        out,
    )
    return report


def _hash_and_group(
    cfg: EtlConfig, dataset: SourceDataset, cache: EtlCache, runner: Runner, report: EtlReport
) -> tuple[list[_Group], set[str]]:
    """Locate and hash every file (cached by size + mtime), then group records by content.

    Returns:
        The groups in source order, and the cache keys of every source file found.
    """
    paths: dict[str, str] = {}  # file_name -> absolute path, for files that exist
    to_hash: list[str] = []
    images_dir = cfg.images.resolve()
    owned = cfg.owned_dirs()
    for record in dataset.records:
        if record.file_name in paths:
            continue
        path = _source_path(images_dir, record.file_name)
        if path is None:
            report.quarantined.append(
                {"file": record.file_name, "code": "bad_path", "reason": "path leaves the images folder"}
            )
            continue
        try:
            stat = path.stat()
        except OSError:
            stat = None
        if stat is None or not path.is_file():
            report.quarantined.append(
                {"file": record.file_name, "code": "missing_file", "reason": "no such file"}
            )
            continue
        if any(path.is_relative_to(d) for d in owned):
            raise BadRequest(f"source image {record.file_name} lies in the output folder {cfg.out}")
        key = str(path)
        paths[record.file_name] = key
        entry = cache.sources.get(key)
        if entry is None or (entry.get("size"), entry.get("mtime_ns")) != (stat.st_size, stat.st_mtime_ns):
            # Keep the old entry to compare hashes: a touched but unchanged file keeps its verdict.
            cache.sources[key] = {
                "size": stat.st_size,
                "mtime_ns": stat.st_mtime_ns,
                "sha256": None,
                "previous": entry,
            }
            to_hash.append(key)
    for key, (sha, error) in zip(to_hash, runner.map("hash", hash_file, to_hash), strict=True):
        entry = cache.sources[key]
        previous = entry.pop("previous")
        entry["sha256"] = sha
        if error is not None:
            entry["error"] = ["unreadable_file", error]
        elif previous is not None and previous.get("sha256") == sha:
            for verdict in ("image", "error"):
                if verdict in previous:
                    entry[verdict] = previous[verdict]

    groups: dict[str, _Group] = {}
    for record in dataset.records:
        found = paths.get(record.file_name)
        if found is None:
            continue
        entry = cache.sources[found]
        if entry["sha256"] is None:
            report.quarantined.append(
                {"file": record.file_name, "code": entry["error"][0], "reason": entry["error"][1]}
            )
            continue
        group = groups.get(entry["sha256"])
        if group is None:
            split = record.split or hash_split(record.image_id, cfg.seed, cfg.val_fraction, cfg.test_fraction)
            dst = f"images/{split}/{safe_image_id(record.image_id)}.jpg"
            groups[entry["sha256"]] = _Group(entry["sha256"], [record], split, found, dst)
        else:
            group.records.append(record)
    return list(groups.values()), set(paths.values())


def _decode(cfg: EtlConfig, groups: list[_Group], cache: EtlCache, runner: Runner, report: EtlReport) -> None:
    """Validate and resize each unique image, unless the cache shows nothing changed."""
    out = cfg.out
    params = {"max_side": cfg.max_side, "jpeg_quality": cfg.jpeg_quality}
    todo: list[_Group] = []
    for split in SPLITS:
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
    for group in groups:
        src = cache.sources[group.src]
        if "error" in src:
            group.verdict = {"error": src["error"]}
            report.images_cached += 1
            continue
        stored = cache.outputs.get(group.dst)
        # A verdict cached before drift statistics existed has no "stats": decode it once more.
        cached = "image" in src and "stats" in src["image"]
        if cached and stored is not None and stored["sha256"] == group.sha256:
            try:
                stat = (out / group.dst).stat()
                fresh = stored["params"] == params and (stored["size"], stored["mtime_ns"]) == (
                    stat.st_size,
                    stat.st_mtime_ns,
                )
            except FileNotFoundError:
                fresh = False
            if fresh:
                group.verdict = {"image": src["image"]}
                report.images_cached += 1
                continue
        todo.append(group)

    tasks = [
        DecodeTask(
            src=g.src,
            dst=str(out / g.dst),
            max_side=cfg.max_side,
            jpeg_quality=cfg.jpeg_quality,
            limits=cfg.limits,
        )
        for g in todo
    ]
    for group, result in zip(todo, runner.map("decode", decode_and_store, tasks), strict=True):
        report.images_decoded += 1
        src = cache.sources[group.src]
        if "error" in result:
            src["error"] = result["error"]
            src.pop("image", None)
            group.verdict = {"error": result["error"]}
        else:
            src["image"] = result["image"]
            src.pop("error", None)
            cache.outputs[group.dst] = {"sha256": group.sha256, "params": params, **result["out"]}
            group.verdict = {"image": result["image"]}


def _write_outputs(
    cfg: EtlConfig,
    dataset: SourceDataset,
    groups: list[_Group],
    cache: EtlCache,
    runner: Runner,
    report: EtlReport,
) -> None:
    """Labels, manifests, dataset.yaml and report.json; files of vanished images removed."""
    out = cfg.out
    class_ids = {name: i for i, name in enumerate(dataset.categories)}
    with_labels = bool(dataset.categories)
    if with_labels:
        for split in SPLITS:
            (out / "labels" / split).mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[dict[str, Any]]] = {split: [] for split in SPLITS}
    train_stats: list[dict[str, Any]] = []
    expected: set[str] = set()

    for done, group in enumerate(groups):
        runner.report("write", done, len(groups))
        assert group.verdict is not None  # _decode gives every group one
        if "error" in group.verdict:
            code, reason = group.verdict["error"]
            report.quarantined.extend(
                {"file": r.file_name, "code": code, "reason": reason} for r in group.records
            )
            continue
        image = group.verdict["image"]
        kept = group.kept
        for dropped in group.records[1:]:
            report.duplicates.append(
                {
                    "kept": kept.file_name,
                    "dropped": dropped.file_name,
                    "kept_id": kept.image_id,
                    "dropped_id": dropped.image_id,
                }
            )
        boxes = _boxes_for(group, image, class_ids, report)
        expected.add(group.dst)
        if with_labels:
            label = f"labels/{group.split}/{PurePosixPath(group.dst).stem}.txt"
            lines = [yolo_line(cid, bbox, image["width"], image["height"]) for _, cid, bbox in boxes]
            write_if_changed(out / label, "".join(f"{line}\n" for line in lines).encode())
            expected.add(label)
        rows[group.split].append(
            {
                "image_id": kept.image_id,
                "path": group.dst,
                "width": image["width"],
                "height": image["height"],
                "captions": _captions_for(group, cfg.captions, report),
                "boxes": [{"category": c, "class_id": cid, "bbox": list(b)} for c, cid, b in boxes],
                "split": group.split,
                "sha256": group.sha256,
                "source_file": kept.file_name,
            }
        )
        report.images_ok += 1
        report.splits[group.split] += 1
        if group.split == "train":
            train_stats.append(image["stats"])

    manifests = out / "manifests"
    manifests.mkdir(exist_ok=True)
    for split in SPLITS:
        _write_manifest(manifests / f"{split}.parquet", rows[split])
    _write_reference(manifests, train_stats)
    data_yaml = out / "dataset.yaml"
    if with_labels:
        # No `path`: Ultralytics then takes the folder of this file as the root, and the file stays the
        # same wherever the dataset is built or moved (DVC hashes it; an absolute path differed per clone).
        doc: dict[str, Any] = {
            **{split: f"images/{split}" for split in SPLITS},
            "names": dict(enumerate(dataset.categories)),
        }
        write_if_changed(data_yaml, yaml.safe_dump(doc, sort_keys=False).encode())
    else:
        data_yaml.unlink(missing_ok=True)

    report.quarantined.sort(key=lambda q: q["file"])
    removed = _remove_stale(out, expected)
    if removed:
        log.info("etl: removed %d outputs of images no longer in the source", removed)
    report_doc = {"config": _config_echo(cfg), **report.to_dict(deterministic=True)}
    write_if_changed(out / "report.json", (json.dumps(report_doc, indent=2) + "\n").encode())
    runner.report("write", len(groups), len(groups))


def manifests_version(manifests: Path) -> str:
    """``manifests:<sha256[:16]>`` over the names and bytes of ``manifests/*.parquet``: the version of an
    ETL output that DVC does not track (``training.provenance.dataset_version`` falls back on it)."""
    digest = hashlib.sha256()
    for path in sorted(manifests.glob("*.parquet")):
        digest.update(path.name.encode() + b"\0" + bytes.fromhex(sha256_file(path)))
    return "manifests:" + digest.hexdigest()[:16]


def _write_reference(manifests: Path, train_stats: list[dict[str, Any]]) -> None:
    """``reference_stats.json``: the drift reference of the train split (removed when it is empty)."""
    path = manifests / REFERENCE_FILE
    if not train_stats:
        path.unlink(missing_ok=True)
        return
    reference = build_reference(train_stats, dataset_version=manifests_version(manifests), split="train")
    write_if_changed(path, reference.to_json().encode())


def _config_echo(cfg: EtlConfig) -> dict[str, Any]:
    """The settings that shape the output (not ``workers`` or ``out``: they do not change it)."""
    return {
        "source": cfg.source,
        "images": str(cfg.images),
        "annotations": [str(p) for p in cfg.annotations],
        "captions": asdict(cfg.captions),
        "max_side": cfg.max_side,
        "val_fraction": cfg.val_fraction,
        "test_fraction": cfg.test_fraction,
        "seed": cfg.seed,
        "jpeg_quality": cfg.jpeg_quality,
        "limits": {"max_bytes": int(cfg.limits.max_bytes), "max_pixels": int(cfg.limits.max_pixels)},
    }
