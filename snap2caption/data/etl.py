"""The offline ETL: any source format -> one normalised, deduplicated, split dataset.

Pipeline (each step idempotent)::

    read (formats.READERS) -> locate + hash every file (sha256 of the raw bytes)
      -> collapse duplicate images (same sha256: one image, captions merged)
      -> split (the source's when it has one, else a stable hash of id + seed)
      -> validate + resize (decode_file; corrupt / unsupported / missing files quarantined)
      -> normalise captions, orient + clip boxes
      -> out/images/{split}/{id}.jpg   resized store, max side ``max_side``, EXIF applied, RGB
         out/labels/{split}/{id}.txt   YOLO ``cls cx cy w h`` (only when the source has categories)
         out/dataset.yaml              Ultralytics data file
         out/manifests/{split}.parquet one row per image (MANIFEST_SCHEMA)
         out/report.json               counts, quarantine and duplicate lists; no timings
         out/manifests/reference_stats.json  drift reference: histograms of image statistics over
                                       the train split (snap2caption.monitoring), shipped with models
         out/.etl_cache.json           what was hashed, decoded and written, so re-runs skip it

Hashing comes before decoding so that duplicates are known before any image is decoded: each
unique image is decoded exactly once, by the worker that also resizes and writes it. A re-run with
unchanged inputs decodes nothing and rewrites no file (every write compares bytes first).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import multiprocessing
import os
import re
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from tqdm import tqdm

from snap2caption.data.captions import CaptionPolicy, normalise_caption
from snap2caption.data.formats import READERS
from snap2caption.data.records import SPLITS, SourceBox, SourceDataset, SourceRecord, Split
from snap2caption.errors import BadRequest, ImageError
from snap2caption.imaging.decode import DEFAULT_LIMITS, DecodeLimits, decode_image, probe_image
from snap2caption.monitoring.drift import REFERENCE_FILE, build_reference
from snap2caption.monitoring.stats import decoded_stats

log = logging.getLogger(__name__)

CACHE_NAME = ".etl_cache.json"
_CACHE_VERSION = 1
_HASH_BLOCK = 1 << 20
_MIN_BOX_SIDE = 1.0  # px; thinner boxes (after clipping) carry no trainable signal
_MIN_POOL_TASKS = 16  # below this a process pool costs more to start than it saves
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


# ------------------------------------------------------------------------------------------------
# Small pure helpers (public where tests and other steps use them)


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


def write_if_changed(path: Path, data: bytes) -> bool:
    """Atomically write ``data`` unless the file already holds exactly it (its mtime then stays).

    Returns:
        Whether the file was written.
    """
    try:
        if path.stat().st_size == len(data) and path.read_bytes() == data:
            return False
    except FileNotFoundError:
        pass
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return True


def orient_box(
    bbox: tuple[float, float, float, float], orientation: int, raw_width: int, raw_height: int
) -> tuple[float, float, float, float]:
    """Map an ``(x, y, w, h)`` box on the stored pixels to the image after its EXIF orientation.

    Args:
        bbox: Box on the image as stored (before EXIF orientation).
        orientation: EXIF orientation tag, 1-8.
        raw_width: Stored width, before orientation.
        raw_height: Stored height, before orientation.
    """
    x, y, w, h = bbox
    W, H = raw_width, raw_height  # image sizes read best as capitals
    if orientation == 2:  # mirrored left-right
        return (W - x - w, y, w, h)
    if orientation == 3:  # rotated 180
        return (W - x - w, H - y - h, w, h)
    if orientation == 4:  # mirrored top-bottom
        return (x, H - y - h, w, h)
    if orientation == 5:  # transposed
        return (y, x, h, w)
    if orientation == 6:  # needs 90 degrees clockwise
        return (H - y - h, x, h, w)
    if orientation == 7:  # transversed
        return (H - y - h, W - x - w, h, w)
    if orientation == 8:  # needs 90 degrees counter-clockwise
        return (y, W - x - w, h, w)
    return bbox


def clip_box(
    bbox: tuple[float, float, float, float], width: int, height: int
) -> tuple[float, float, float, float] | None:
    """Clip an ``(x, y, w, h)`` box to the image; ``None`` when less than a pixel wide or high remains."""
    if not all(math.isfinite(v) for v in bbox):
        return None
    x, y, w, h = bbox
    x0, y0 = max(0.0, x), max(0.0, y)
    x1, y1 = min(float(width), x + w), min(float(height), y + h)
    if x1 - x0 < _MIN_BOX_SIDE or y1 - y0 < _MIN_BOX_SIDE:
        return None
    return (x0, y0, x1 - x0, y1 - y0)


def yolo_line(class_id: int, bbox: tuple[float, float, float, float], width: int, height: int) -> str:
    """One YOLO label line ``cls cx cy w h``, all normalised to [0, 1] by the image size."""
    x, y, w, h = bbox
    return f"{class_id} {(x + w / 2) / width:.6f} {(y + h / 2) / height:.6f} {w / width:.6f} {h / height:.6f}"


# ------------------------------------------------------------------------------------------------
# Work done in the process pool: top-level functions of plain, picklable arguments.


def _hash_file(path: str) -> tuple[str | None, str | None]:
    """``(sha256 hex, None)`` or ``(None, reason)`` when the file cannot be read."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            while block := fh.read(_HASH_BLOCK):
                digest.update(block)
    except OSError as exc:
        return None, f"cannot read: {exc.strerror or exc}"
    return digest.hexdigest(), None


@dataclass(frozen=True)
class _DecodeTask:
    src: str
    dst: str
    max_side: int
    jpeg_quality: int
    limits: DecodeLimits


def _decode_and_store(task: _DecodeTask) -> dict[str, Any]:
    """Validate one image with the serving decoder, resize it and write it (only if its bytes changed).

    This is ``decode_file`` split in two: the same capped read, then ``probe_image`` for the stored
    size (the manifest keeps the original size, after EXIF) and ``decode_image`` with ``max_side``,
    which lets large JPEGs decode at a reduced DCT scale instead of at full size.

    Returns:
        ``{"image": {width, height, orientation, format, stats}, "out": {size, mtime_ns}}`` or
        ``{"error": [code, reason]}``; ``stats`` are the drift statistics (``ImageStats.to_dict()``) the
        services compute online with the same function.
    """
    try:
        with open(task.src, "rb") as fh:  # at most one byte past the cap, as decode_file reads
            data = fh.read(task.limits.max_bytes + 1)
        info = probe_image(data, task.limits)
        decoded = decode_image(data, task.limits, max_side=task.max_side)
    except ImageError as exc:
        return {"error": [exc.code, exc.message]}
    except FileNotFoundError:
        return {"error": ["missing_file", "file disappeared during the run"]}
    except OSError as exc:
        return {"error": ["unreadable_file", f"cannot read: {exc.strerror or exc}"]}
    except Exception as exc:  # one odd file must not end a run over 100k images
        return {"error": ["corrupt_image", f"decoder failed: {exc!r}"]}
    buffer = io.BytesIO()
    decoded.image.save(buffer, format="JPEG", quality=task.jpeg_quality)
    dst = Path(task.dst)
    write_if_changed(dst, buffer.getvalue())
    stat = dst.stat()
    swapped = decoded.orientation in (5, 6, 7, 8)  # EXIF rotations by 90 degrees swap the sides
    return {
        "image": {
            "width": info.height if swapped else info.width,
            "height": info.width if swapped else info.height,
            "orientation": decoded.orientation,
            "format": decoded.format,
            "stats": decoded_stats(decoded, info).to_dict(),
        },
        "out": {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns},
    }


# ------------------------------------------------------------------------------------------------
# The run


def _pool_context() -> multiprocessing.context.BaseContext:
    # forkserver, not fork: the ETL service calls run_etl from a threaded server, and forking a
    # process with threads can deadlock. Preloading this module makes each worker start in ms.
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload([__name__])
        return ctx
    return multiprocessing.get_context("spawn")


class _Runner:
    """Runs one stage's tasks, in a lazily started process pool when there are enough of them."""

    def __init__(
        self, workers: int, progress: bool, on_progress: Callable[[str, int, int], None] | None
    ) -> None:
        self.workers = workers
        self.progress = progress
        self.on_progress = on_progress
        self._pool: Executor | None = None

    def map(self, stage: str, fn: Callable[[Any], Any], tasks: Sequence[Any]) -> list[Any]:
        total = len(tasks)
        self.report(stage, 0, total)
        if not total:
            return []
        if self.workers > 1 and total >= _MIN_POOL_TASKS:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(self.workers, mp_context=_pool_context())
            # Chunks amortise the pickling round trips; several per worker keep the load balanced.
            chunksize = max(1, min(64, total // (self.workers * 8)))
            results_iter = self._pool.map(fn, tasks, chunksize=chunksize)
        else:
            results_iter = map(fn, tasks)
        results = []
        with tqdm(total=total, desc=stage, unit="img", disable=not self.progress, leave=False) as bar:
            for result in results_iter:
                results.append(result)
                bar.update(1)
                self.report(stage, len(results), total)
        return results

    def report(self, stage: str, done: int, total: int) -> None:
        if self.on_progress is not None:
            self.on_progress(stage, done, total)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


class _Cache:
    """``out/.etl_cache.json``: per source file (by absolute path) its stat, sha256 and decode result;
    per resized output (by path under ``out``) the source sha256, the resize parameters and its stat.
    """

    def __init__(self, path: Path, limits: DecodeLimits) -> None:
        self.path = path
        self.limits = [int(limits.max_bytes), int(limits.max_pixels)]
        self.sources: dict[str, dict[str, Any]] = {}
        self.outputs: dict[str, dict[str, Any]] = {}
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError):
            log.warning("etl: cache %s unreadable; starting afresh", path)
            return
        if not isinstance(doc, dict) or doc.get("version") != _CACHE_VERSION:
            return
        self.sources = doc.get("sources", {})
        self.outputs = doc.get("outputs", {})
        if doc.get("limits") != self.limits:
            # Decode results depend on the caps: keep the hashes, forget the verdicts.
            for entry in self.sources.values():
                entry.pop("image", None)
                entry.pop("error", None)

    def save(self, sources: set[str], outputs: set[str]) -> None:
        """Write the entries still in use (sorted, so unchanged content keeps the file untouched)."""
        doc = {
            "version": _CACHE_VERSION,
            "limits": self.limits,
            # Unreadable files (no sha256) are left out, so the next run tries them again.
            "sources": {k: self.sources[k] for k in sorted(sources) if self.sources.get(k, {}).get("sha256")},
            "outputs": {k: self.outputs[k] for k in sorted(outputs) if k in self.outputs},
        }
        write_if_changed(self.path, json.dumps(doc, sort_keys=True, separators=(",", ":")).encode())


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
    cache = _Cache(out / CACHE_NAME, cfg.limits)
    runner = _Runner(cfg.workers, progress, on_progress)
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
    cfg: EtlConfig, dataset: SourceDataset, cache: _Cache, runner: _Runner, report: EtlReport
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
    for key, (sha, error) in zip(to_hash, runner.map("hash", _hash_file, to_hash), strict=True):
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


def _decode(cfg: EtlConfig, groups: list[_Group], cache: _Cache, runner: _Runner, report: EtlReport) -> None:
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
        _DecodeTask(
            src=g.src,
            dst=str(out / g.dst),
            max_side=cfg.max_side,
            jpeg_quality=cfg.jpeg_quality,
            limits=cfg.limits,
        )
        for g in todo
    ]
    for group, result in zip(todo, runner.map("decode", _decode_and_store, tasks), strict=True):
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
    cache: _Cache,
    runner: _Runner,
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
    """``manifests:<sha256[:16]>`` over the names and bytes of ``manifests/*.parquet`` (the formula of
    ``training.provenance.dataset_version`` when DVC does not track the folder)."""
    digest = hashlib.sha256()
    for path in sorted(manifests.glob("*.parquet")):
        digest.update(path.name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
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
