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

Modules: ``config`` (what a run is asked to do, and its report), ``boxes`` (box geometry and YOLO
labels), ``runner`` (the process pool and the per-image work done in it), ``cache``
(``.etl_cache.json``) and ``pipeline`` (:func:`run_etl` and its steps).
"""

from __future__ import annotations

from snap2caption.data.etl.boxes import clip_box, orient_box, yolo_line
from snap2caption.data.etl.cache import CACHE_NAME
from snap2caption.data.etl.config import EtlConfig, EtlReport
from snap2caption.data.etl.pipeline import (
    BOX_TYPE,
    MANIFEST_SCHEMA,
    hash_split,
    manifests_version,
    run_etl,
    safe_image_id,
)

__all__ = [
    "BOX_TYPE",
    "CACHE_NAME",
    "MANIFEST_SCHEMA",
    "EtlConfig",
    "EtlReport",
    "clip_box",
    "hash_split",
    "manifests_version",
    "orient_box",
    "run_etl",
    "safe_image_id",
    "yolo_line",
]
