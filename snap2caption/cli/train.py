"""``snap2caption train ...``: Train models: the caption model, the detector.

Both trainers take the same run options (``--config``, ``--data``, ``--out``, ``--name``, ``--experiment``,
``--register/--no-register``, ``--tracking-uri``): each sets the ``run`` key of its name over the preset's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

if TYPE_CHECKING:
    from snap2caption.config import Override

F = TypeVar("F", bound=Callable[..., Any])
C = TypeVar("C")


def run_options(name: str, out: str) -> Callable[[F], F]:
    """The options every trainer takes; each sets a key of the config's ``run`` section when given.

    Args:
        name: The trainer's registered model name, for the help text.
        out: Where its run writes by default, for the help text.
    """
    options = [
        click.option(
            "--config", "config_name", default="starter", show_default=True, help="Preset or YAML path."
        ),
        click.option(
            "--data", type=click.Path(file_okay=False), default=None, help="ETL output [data/processed]."
        ),
        click.option("--out", type=click.Path(file_okay=False), default=None, help=f"Output folder [{out}]."),
        click.option("--name", default=None, help=f"Registered model name [{name}]."),
        click.option("--experiment", default=None, help="MLflow experiment [the model name]."),
        click.option("--register/--no-register", default=None, help="Register as --name [yes]."),
        click.option(
            "--tracking-uri", default=None, help="MLflow URI [$MLFLOW_TRACKING_URI, else embedded SQLite]."
        ),
    ]

    def decorate(command: F) -> F:
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


def run_overrides(**options: Any) -> list[Override]:
    """``("run.<option>", value)`` for every run option given on the command line."""
    return [(f"run.{key}", value) for key, value in options.items() if value is not None]


def load_or_usage_error(
    load: Callable[[str, Sequence[Override]], C], config: str, overrides: Sequence[Override]
) -> C:
    """``load(config, overrides)``; a config problem is a usage error (exit 2), listing every problem."""
    from snap2caption.config import ConfigError

    try:
        return load(config, overrides)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc


@click.group("train")
def train_group() -> None:
    """Train models: the caption model, the detector."""


@train_group.command("detector")
@click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")
@run_options("detector", "$SNAP2CAPTION_HOME/models/detector/run-<UTC time>")
@click.option(
    "--promote", is_flag=True, default=None, help="Then promote to production if it passes the gate."
)
def train_detector_command(overrides: tuple[str, ...], config_name: str, **options: Any) -> None:
    """Train a YOLO detector (Ultralytics, offline, CPU) on the ETL output and register it as `detector`.

    Presets under training/configs/detector/ (tiny, starter). Overrides are config keys, with or without
    their section, e.g. `model=yolo11n.yaml imgsz=128 epochs=5 data=data/processed`.
    Exit code 3: trained and registered, but --promote was refused by the gate.
    """
    from training.detector.config import DetectorRunConfig

    config = load_or_usage_error(DetectorRunConfig.load, config_name, [*overrides, *run_overrides(**options)])
    from training.detector.train import train_detector  # after the config: a typo fails before torch loads

    result = train_detector(config)
    ev = result.evaluation
    click.echo(
        f"detector: {result.epochs}/{result.planned_epochs} epochs, training {result.train_seconds:.0f} s, "
        f"job {result.total_seconds:.0f} s; {ev.split} mAP50-95 {ev.map50_95:.4f} mAP50 {ev.map50:.4f} "
        f"({ev.images} images, pycocotools on ONNX predictions)"
    )
    if result.domain is not None:
        photos = result.domain.real_photo_detection_rate
        click.echo(
            f"domain: rejects {result.domain.test_rejection_rate:.3f} of {result.domain.test_images} "
            "held-out test images (in domain), "
            + ("not measured on real photos" if photos is None else f"{photos:.3f} of real photos")
        )
    else:
        click.echo("domain: none written (see the warning above)")
    click.echo(f"artifact: {result.artifact_dir}  (MLflow run {result.run_id})")
    if result.version is not None:
        click.echo(f"registered {config.run.name} v{result.version} as candidate")
    if result.promotion is not None:
        click.echo(result.promotion.message)
        if not result.promotion.promoted and result.promotion.status != "unchanged":
            raise SystemExit(3)


# ------------------------------------------------------------------------------------------- caption


@train_group.command("caption")
@click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")
@run_options("captioner", "runs/caption")
@click.option(
    "--features", default=None, type=click.Path(file_okay=False), help="Feature cache [<out>/features]"
)
@click.option(
    "--checkpoints",
    default=None,
    type=click.Path(file_okay=False),
    help="[<out>/checkpoints] (a new run empties it)",
)
@click.option("--resume", default=None, help="A checkpoint folder, or 'latest' (under --checkpoints).")
@click.option(
    "--mlflow/--no-mlflow", default=None, help="Log the run to MLflow [yes]; --no-mlflow registers nothing."
)
@click.option("--progress/--no-progress", default=None, help="Progress bar [on a terminal].")
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    help="Train on N Ray Train workers (DDP; each takes batch_size x grad_accum per step) [one process].",
)
@click.option(
    "--gpus-per-worker", type=click.FloatRange(min=0), default=0.0, show_default=True, help="With --workers."
)
@click.option("--address", default=None, help="With --workers: a Ray cluster to join [start a local Ray].")
@click.option(
    "--ray-dashboard", is_flag=True, help="With --workers: start Ray's dashboard with the local Ray."
)
def caption(
    overrides: tuple[str, ...],
    config_name: str,
    mlflow: bool | None,
    progress: bool | None,
    workers: int | None,
    gpus_per_worker: float,
    address: str | None,
    ray_dashboard: bool,
    **options: Any,
) -> None:
    """Train the caption model, evaluate it on the test split, save and register it.

    KEY=VALUE overrides take dotted keys (train.lr=3e-4, model.decoder.n_layer=2; a bare key is looked up in
    every section); unknown keys are refused with the nearest one suggested.

    With --workers N the same trainer runs as N DDP ranks under Ray Train (gloo on CPU, nccl on GPU), on a
    local Ray or the cluster at --address; rank 0 validates, logs, checkpoints and registers.
    """
    import time

    started = time.monotonic()
    from training.caption.config import CaptionRunConfig

    # --no-mlflow registers nothing either: the registry stores the files in the MLflow run.
    tracking = {"mlflow": mlflow} | ({"register": False} if mlflow is False else {})
    run = run_overrides(**(options | tracking))
    config = load_or_usage_error(CaptionRunConfig.load, config_name, [*overrides, *run])
    if workers is not None:
        from training.distributed.caption import Scaling, train_caption_distributed

        scaling = Scaling(workers, gpus_per_worker, address=address, dashboard=ray_dashboard)
        distributed = train_caption_distributed(config, scaling)
        click.echo(f"caption: {workers} workers, {distributed.wall_s:.0f} s with Ray's start")
        for rank, node in enumerate(distributed.nodes):
            click.echo(f"  rank {rank}: Ray node {node}")
        echo_caption_summary(distributed.summary)
        return
    from training.caption.run import train_caption  # after the config: a typo fails before torch loads

    result = train_caption(config, progress=progress, started=started)
    echo_caption_summary(result.summary)


def echo_caption_summary(s: dict[str, Any]) -> None:
    """The lines `train caption` prints from a run's ``metrics.json`` summary."""
    click.echo(f"caption: {s['steps']} steps ({s['epochs']} epochs), stopped: {s['stop_reason']}")
    if s["val"]["cider_d_best"] is not None:
        click.echo(f"  val CIDEr-D {s['val']['cider_d_best']:.4f} (step {s['best_step']})")
    if s["test"] is not None:
        test, m = s["test"], s["test"]["metrics"]
        scores = " ".join(f"{k}={m[k]:.4f}" for k in ("cider_d", "bleu_4", "meteor", "rouge_l") if k in m)
        pairs = f"pair_precision={m['pair_precision']:.3f} pair_recall={m['pair_recall']:.3f}"
        click.echo(f"  test ({test['n_images']} images, {test['scorer']}): {scores} {pairs}")
    click.echo("  timings: " + " ".join(f"{k}={v:.1f}" for k, v in s["timings_s"].items()))
    click.echo(f"  artifact: {s['model']}")
    if s["registered"] is not None:
        click.echo(f"  registered {s['registered']['name']} v{s['registered']['version']} (alias candidate)")


@train_group.command("caption-features")
@click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")
@click.option("--config", "config_name", default="starter", show_default=True, help="Preset or YAML path.")
@click.option("--data", type=click.Path(file_okay=False), default=None, help="ETL output [data/processed].")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Feature cache folder.")
@click.option("--splits", default="train,val", show_default=True, help="Comma-separated splits.")
@click.option("--progress/--no-progress", default=None, help="Progress bar [on a terminal].")
def caption_features(
    overrides: tuple[str, ...],
    config_name: str,
    data: str | None,
    out: str,
    splits: str,
    progress: bool | None,
) -> None:
    """Cache the frozen encoder's features of each split (what `train caption --features` reads).

    With a learning encoder (model.encoder.trainable other than none) there is nothing to cache: the folder
    is created empty, so a pipeline stage still succeeds.
    """
    import torch

    from snap2caption.models.backbones import build_encoder
    from training.caption.config import CaptionRunConfig
    from training.caption.data import SplitData
    from training.caption.features import cached_features
    from training.caption.train import auto_threads, resolve_device

    config = load_or_usage_error(CaptionRunConfig.load, config_name, [*overrides, *run_overrides(data=data)])
    enc, cfg = config.model.encoder, config.train
    if enc.trainable != "none":
        Path(out).mkdir(parents=True, exist_ok=True)
        click.echo(f"model.encoder.trainable={enc.trainable}: a learning encoder has no features to cache")
        return
    torch.set_num_threads(cfg.threads or auto_threads())
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)  # as in training, where the encoder is the first module built
    encoder = build_encoder(
        enc.name,
        pretrained=enc.pretrained,
        trainable="none",
        colour_cells=enc.colour_cells,
        detail_stride=enc.detail_stride,
    ).to(device)
    for split in (s.strip() for s in splits.split(",") if s.strip()):
        features = cached_features(
            encoder,
            SplitData.load(config.run.data, split),
            out,
            dtype=cfg.feature_dtype,
            batch_size=cfg.feature_batch_size,
            num_workers=cfg.num_workers,
            device=device,
            runtime=cfg.feature_runtime,
            progress=progress is not False,
        )
        click.echo(f"{split}: features {tuple(features.shape)} {features.dtype} in {out}")
