"""``snap2caption data ...``: build and transform datasets."""

from __future__ import annotations

import click


@click.group()
def data() -> None:
    """Build datasets: synthetic scenes, ETL of COCO / Karpathy / Flickr30K."""


@data.command("synth")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--images", default=6000, show_default=True, type=click.IntRange(min=1))
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0))
@click.option("--image-size", default=256, show_default=True, type=click.IntRange(min=64))
@click.option(
    "--formats",
    default="coco",
    show_default=True,
    help="Comma-separated: coco, karpathy, flickr30k.",
)
@click.option("--workers", default=None, type=click.IntRange(min=1), help="Processes [default: all cores].")
def synth(out: str, images: int, seed: int, image_size: int, formats: str, workers: int | None) -> None:
    """Generate the synthetic shapes benchmark (images, COCO captions + instances) from a seed."""
    import time

    from snap2caption.data.synth import SynthConfig, write_synth

    chosen = tuple(f.strip() for f in formats.split(",") if f.strip())
    started = time.perf_counter()
    try:
        cfg = SynthConfig(images=images, seed=seed, image_size=image_size, workers=workers)
        dataset = write_synth(out, cfg, formats=chosen, progress=True)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc
    captions = sum(len(r.captions) for r in dataset.records)
    boxes = sum(len(r.boxes) for r in dataset.records)
    seconds = time.perf_counter() - started
    click.echo(f"synth: {len(dataset.records)} images, {captions} captions, {boxes} boxes in {seconds:.1f} s")


_FRACTION = click.FloatRange(0.0, 1.0, max_open=True)


@data.command("etl")
@click.option(
    "--source", required=True, type=click.Choice(["coco", "karpathy", "flickr30k"]), help="Annotation format."
)
@click.option(
    "--images", required=True, type=click.Path(file_okay=False), help="Folder the image file names are in."
)
@click.option(
    "--annotations",
    required=True,
    multiple=True,
    type=click.Path(dir_okay=False),
    help="Annotation file; repeat for several (COCO captions + instances).",
)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder (incremental).")
@click.option("--max-side", default=512, show_default=True, type=click.IntRange(min=1))
@click.option("--no-lowercase", is_flag=True, help="Keep the captions' case.")
@click.option("--min-words", default=1, show_default=True, type=click.IntRange(min=1))
@click.option("--max-words", default=60, show_default=True, type=click.IntRange(min=1))
@click.option("--val-fraction", default=0.1, show_default=True, type=_FRACTION)
@click.option("--test-fraction", default=0.1, show_default=True, type=_FRACTION)
@click.option("--seed", default=0, show_default=True, type=int, help="Salt of the split hash.")
@click.option("--workers", default=None, type=click.IntRange(min=1), help="Processes [default: all cores].")
@click.option("--no-progress", is_flag=True, help="No progress bars (for logs and DVC).")
def etl(
    source: str,
    images: str,
    annotations: tuple[str, ...],
    out: str,
    max_side: int,
    no_lowercase: bool,
    min_words: int,
    max_words: int,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    workers: int | None,
    no_progress: bool,
) -> None:
    """Turn COCO / Karpathy / Flickr30K files into resized images, YOLO labels and Parquet manifests."""
    from pathlib import Path

    from snap2caption.data.captions import CaptionPolicy
    from snap2caption.data.etl import EtlConfig, run_etl
    from snap2caption.errors import BadRequest

    try:
        policy = CaptionPolicy(lowercase=not no_lowercase, min_words=min_words, max_words=max_words)
        cfg = EtlConfig(
            source=source,
            images=Path(images),
            annotations=[Path(p) for p in annotations],
            out=Path(out),
            captions=policy,
            max_side=max_side,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            seed=seed,
        )
        if workers is not None:
            cfg.workers = workers
        report = run_etl(cfg, progress=not no_progress)
    except (BadRequest, ValueError) as exc:
        raise click.UsageError(str(exc)) from exc
    splits = ", ".join(f"{k} {v}" for k, v in report.splits.items())
    click.echo(
        f"etl: {report.images_ok} images ({splits}), {len(report.quarantined)} quarantined, "
        f"{report.duplicates_collapsed} duplicates collapsed, {report.captions_kept} captions kept, "
        f"{report.captions_dropped} dropped; decoded {report.images_decoded}, cached {report.images_cached} "
        f"in {report.seconds:.1f} s -> {out}"
    )


@data.command("feedback-export")
@click.option(
    "--database",
    default=None,
    envvar="SNAP2CAPTION_GATEWAY_DATABASE_URL",
    help="Gateway database URL [default: $SNAP2CAPTION_GATEWAY_DATABASE_URL, else $SNAP2CAPTION_HOME].",
)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder (COCO layout).")
@click.option(
    "--min-rating",
    default=4,
    show_default=True,
    type=click.IntRange(1, 5),
    help="A rating at least this high keeps the logged caption.",
)
def feedback_export(database: str | None, out: str, min_rating: int) -> None:
    """Turn accepted gateway feedback into images + COCO captions for `data etl --source coco`."""
    from pathlib import Path

    from services.gateway.db import default_database_url, make_engine
    from snap2caption.data.feedback_export import export_feedback

    engine = make_engine(database or default_database_url())
    try:
        report = export_feedback(engine, Path(out), min_rating=min_rating)
    finally:
        engine.dispose()
    skipped = ", ".join(f"{k} {v}" for k, v in sorted(report.skipped.items())) or "none"
    click.echo(
        f"feedback-export: {report.images} images, {report.captions} captions "
        f"({report.corrected} corrected, {report.confirmed} confirmed by rating); skipped: {skipped} -> {out}"
    )
