"""The synthetic dataset on disk: images rendered in parallel, annotations in the real formats."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
from tqdm import tqdm

from snap2caption.data.formats import write_coco, write_flickr30k_csv, write_karpathy
from snap2caption.data.records import SourceBox, SourceDataset, SourceRecord, default_split
from snap2caption.data.synth.grammar import describe_scene
from snap2caption.data.synth.render import render_scene
from snap2caption.data.synth.scene import SHAPES, SynthConfig, generate_scene

logger = logging.getLogger(__name__)

FORMATS: tuple[str, ...] = ("coco", "karpathy", "flickr30k")


@dataclass(frozen=True)
class _Built:
    record: SourceRecord
    polygons: list[list[float]]


def _build_image(index: int, cfg: SynthConfig, images_dir: str) -> _Built:
    """Generate, render, describe and save image ``index``; runs in a worker process."""
    # Seeding from the pair (not seed + index) keeps streams of nearby seeds independent.
    rng = np.random.default_rng([cfg.seed, index])
    scene = generate_scene(rng, cfg)
    image = render_scene(scene, rng)
    captions = describe_scene(scene, rng, cfg.captions_per_image)
    image_id = str(index + 1)  # COCO ids are positive
    file_name = f"{index + 1:012d}.jpg"
    image.save(os.path.join(images_dir, file_name), "JPEG", quality=cfg.jpeg_quality)
    record = SourceRecord(
        image_id=image_id,
        file_name=file_name,
        captions=captions,
        boxes=[SourceBox(category=o.shape, bbox=o.bbox) for o in scene.objects],
        split=default_split(image_id),
        width=scene.width,
        height=scene.height,
    )
    polygons = [[coordinate for point in o.polygon for coordinate in point] for o in scene.objects]
    return _Built(record=record, polygons=polygons)


def write_synth(
    out_dir: str | os.PathLike[str],
    cfg: SynthConfig,
    formats: Sequence[str] = ("coco",),
    progress: bool = True,
) -> SourceDataset:
    """Generate the dataset and write it in the real formats.

    Layout: ``images/<12-digit id>.jpg``; ``annotations/captions.json`` and ``annotations/instances.json``
    (COCO, polygons included) for ``"coco"``; ``annotations/dataset_synth.json`` (Karpathy, COCO flavour,
    ~80/10/10 splits by :func:`~snap2caption.data.records.default_split`) for ``"karpathy"``;
    ``annotations/results.csv`` for ``"flickr30k"``; and ``synth_config.json`` with the config.

    Args:
        out_dir: Output folder (created).
        cfg: What to generate.
        formats: Any of ``"coco"``, ``"karpathy"``, ``"flickr30k"``.
        progress: Show a tqdm bar on stderr.

    Returns:
        The records as a reader of these files would produce them (plus their splits), categories in
        ``SHAPES`` order.

    Raises:
        ValueError: On an unknown format.
    """
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise ValueError(f"unknown formats {unknown}; choose from {list(FORMATS)}")
    started = time.perf_counter()
    out = Path(out_dir)
    images_dir, annotations_dir = out / "images", out / "annotations"
    images_dir.mkdir(parents=True, exist_ok=True)
    annotations_dir.mkdir(parents=True, exist_ok=True)

    if cfg.workers is None:
        # A pool costs more than it saves on a handful of images (tests, fixtures).
        workers = (os.cpu_count() or 1) if cfg.images >= 64 else 1
    else:
        workers = max(1, min(cfg.workers, cfg.images))
    chunksize = max(1, min(16, cfg.images // (4 * workers)))
    build = partial(_build_image, cfg=cfg, images_dir=str(images_dir))
    built: list[_Built] = []
    with tqdm(total=cfg.images, disable=not progress, unit="img", desc="synth") as bar:
        if workers == 1:
            for index in range(cfg.images):
                built.append(build(index))
                bar.update()
        else:
            with multiprocessing.get_context().Pool(workers) as pool:
                for item in pool.imap(build, range(cfg.images), chunksize=chunksize):
                    built.append(item)
                    bar.update()

    records = [b.record for b in built]
    stale = {p.name for p in images_dir.glob("*.jpg")} - {r.file_name for r in records}
    if stale:
        logger.warning(
            "%d images in %s are not part of this dataset (left from an earlier run)", len(stale), images_dir
        )

    info = {
        "description": (
            f"Snap2Caption synthetic shapes benchmark (seed={cfg.seed}, images={cfg.images}, "
            f"image_size={cfg.image_size}); not a natural-image dataset"
        ),
        "url": "",
        "version": "1.0",
        "year": 2024,
        "contributor": "Snap2Caption",
        "date_created": "2024/01/01",
    }
    licence = {"url": "https://creativecommons.org/publicdomain/zero/1.0/", "id": 1, "name": "CC0 1.0"}
    if "coco" in formats:
        write_coco(
            records,
            SHAPES,
            annotations_dir / "captions.json",
            annotations_dir / "instances.json",
            segmentations={b.record.image_id: b.polygons for b in built},
            info=info,
            license=licence,
        )
    if "karpathy" in formats:
        write_karpathy(records, annotations_dir / "dataset_synth.json", "coco", filepath="images")
    if "flickr30k" in formats:
        write_flickr30k_csv(records, annotations_dir / "results.csv")
    # workers is left out: it changes how fast, never what, so the file stays identical across machines.
    saved = {**asdict(cfg), "workers": None, "formats": sorted(formats)}
    (out / "synth_config.json").write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")

    logger.debug(
        "synth: %d images, %d captions, %d boxes in %.1f s -> %s",
        len(records),
        sum(len(r.captions) for r in records),
        sum(len(r.boxes) for r in records),
        time.perf_counter() - started,
        out,
    )
    return SourceDataset(source="synth", records=records, categories=list(SHAPES))
