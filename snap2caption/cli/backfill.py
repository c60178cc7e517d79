"""``snap2caption backfill``: caption a whole image library on Ray Data, into Parquet.

Runs :func:`snap2caption.backfill.run_backfill` on a local Ray (started for the run, dashboard off unless
``--dashboard``) or on a cluster (``--address``). A second run into the same ``--out`` skips what is done.
Prints one JSON summary line at the end (counts, images/s, model versions, the nodes each stage ran on).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import click

from snap2caption.cli.analyze import _check_features

if TYPE_CHECKING:
    from snap2caption.models.runtime import RuntimeChoice


@click.command("backfill")
@click.option(
    "--input",
    "source",
    required=True,
    type=click.Path(exists=True, path_type=Path),
    help="A folder of images, or a Parquet manifest with a `path` column.",
)
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Output folder.")
@click.option(
    "--root",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Where a manifest's relative paths start [default: the manifest's folder].",
)
@click.option(
    "--features",
    callback=_check_features,
    default="caption,alt_text,tags,objects",
    show_default=True,
    help="Comma-separated subset of caption,alt_text,tags,objects.",
)
@click.option(
    "--address", default=None, help="Ray cluster address (host:port, ray://..., auto) [default: local]."
)
@click.option(
    "--dashboard/--no-dashboard", default=False, show_default=True, help="Ray dashboard (local Ray)."
)
@click.option("--captioner", default="production", show_default=True, help="Alias, models:/ URI or folder.")
@click.option("--tagger", default="production", show_default=True, help="Alias, models:/ URI or folder.")
@click.option("--detector", default="production", show_default=True, help="Alias, models:/ URI or folder.")
@click.option(
    "--runtime",
    type=click.Choice(["auto", "torch", "onnx"]),
    default="auto",
    show_default=True,
    help="Model runtime (auto: ONNX where the artifact has it, as the services).",
)
@click.option("--tracking-uri", default=None, help="MLflow URI [$MLFLOW_TRACKING_URI, else embedded SQLite].")
@click.option("--actors", type=click.IntRange(1), default=1, show_default=True, help="Actors per model.")
@click.option(
    "--actor-cpus", type=click.FloatRange(0.01), default=0.5, show_default=True, help="Ray CPUs per actor."
)
@click.option("--threads", type=click.IntRange(1), default=1, show_default=True, help="Threads per actor.")
@click.option("--batch-size", type=click.IntRange(1), default=16, show_default=True)
@click.option("--limit", type=click.IntRange(1), default=None, help="Do at most this many new images.")
@click.option("--gender-neutral", is_flag=True, help="Gender-neutral wording in captions and alt text.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Ray Data's progress bars.")
def backfill(
    source: Path,
    out: Path,
    root: Path | None,
    features: str,
    address: str | None,
    dashboard: bool,
    captioner: str,
    tagger: str,
    detector: str,
    runtime: RuntimeChoice,
    tracking_uri: str | None,
    actors: int,
    actor_cpus: float,
    threads: int,
    batch_size: int,
    limit: int | None,
    gender_neutral: bool,
    progress: bool,
) -> None:
    """Caption, alt-text, tag and detect every image of a folder or manifest into Parquet (Ray Data)."""
    from snap2caption.backfill import BackfillConfig, run_backfill
    from snap2caption.backfill.stages import ModelOptions

    config = BackfillConfig(
        input=source,
        out=out,
        features=tuple(features.split(",")),  # type: ignore[arg-type]  # checked by _check_features
        root=root,
        address=address,
        dashboard=dashboard,
        models={"caption": captioner, "tags": tagger, "objects": detector},
        runtime=runtime,
        options=ModelOptions(tracking_uri=tracking_uri, threads=threads),
        actors=actors,
        actor_cpus=actor_cpus,
        batch_size=batch_size,
        limit=limit,
        gender_neutral=gender_neutral,
        progress=progress,
    )

    def show(finished: int, total: int, seconds: float) -> None:
        click.echo(f"{finished}/{total} images, {finished / max(seconds, 1e-9):.2f} images/s", err=True)

    summary = run_backfill(config, on_progress=show)
    click.echo(
        f"backfill: {summary.done} done, {summary.quarantined} quarantined, {summary.skipped} skipped "
        f"(already in {out}); {summary.images_per_s:.2f} images/s over {summary.seconds:.1f} s "
        f"({summary.steady_images_per_s:.2f} images/s once the models were loaded)",
        err=True,
    )
    click.echo(json.dumps(summary.to_dict()))
