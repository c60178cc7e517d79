"""``snap2caption train ...``: Train models: the caption model, the detector."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from training.caption.config import CaptionRunConfig


@click.group("train")
def train_group() -> None:
    """Train models: the caption model, the detector."""


@train_group.command("detector")
@click.option(
    "--config",
    "config_name",
    default="starter",
    show_default=True,
    help="Config name under training/configs/detector/ (tiny, starter) or a YAML path.",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Artifact folder [default: $SNAP2CAPTION_HOME/models/detector/run-<UTC time>].",
)
@click.option("--register/--no-register", default=True, show_default=True, help="Register as `detector`.")
@click.option("--promote", is_flag=True, help="Then promote to production if it passes the mAP50-95 gate.")
@click.option("--tracking-uri", default=None, help="MLflow tracking URI [default: the project's].")
@click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")
def train_detector_command(
    config_name: str,
    out: Path | None,
    register: bool,
    promote: bool,
    tracking_uri: str | None,
    overrides: tuple[str, ...],
) -> None:
    """Train a YOLO detector (Ultralytics, offline, CPU) on the ETL output and register it as `detector`.

    Overrides are config keys, e.g. `model=yolo11n.yaml imgsz=128 epochs=5 data=data/processed`.
    Exit code 3: trained and registered, but --promote was refused by the gate.
    """
    import datetime as dt

    from snap2caption.config import ConfigError
    from snap2caption.registry import snap2caption_home
    from training.detection.config import load_config
    from training.detection.train import train_detector

    try:
        config = load_config(config_name, overrides)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc
    if out is None:
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
        out = snap2caption_home() / "models" / "detector" / f"run-{stamp}"
    result = train_detector(config, out, register=register, promote=promote, tracking_uri=tracking_uri)
    ev = result.evaluation
    click.echo(
        f"detector: {result.epochs}/{result.planned_epochs} epochs, training {result.train_seconds:.0f} s, "
        f"job {result.total_seconds:.0f} s; {ev.split} mAP50-95 {ev.map50_95:.4f} mAP50 {ev.map50:.4f} "
        f"({ev.images} images, pycocotools on ONNX predictions)"
    )
    click.echo(f"artifact: {result.artifact_dir}  (MLflow run {result.run_id})")
    if result.version is not None:
        click.echo(f"registered detector v{result.version} as candidate")
    if result.promotion is not None:
        click.echo(result.promotion.message)
        if not result.promotion.promoted and result.promotion.status != "unchanged":
            raise SystemExit(3)


# ------------------------------------------------------------------------------------------- caption


def _caption_config(config: str, overrides: tuple[str, ...]) -> CaptionRunConfig:
    from snap2caption.config import ConfigError
    from training.caption.config import CaptionRunConfig

    try:
        return CaptionRunConfig.load(config, overrides)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc


@train_group.command("caption")
@click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")
@click.option("--config", "config_name", default="starter", show_default=True, help="Preset or YAML path.")
@click.option("--data", default="data/processed", show_default=True, type=click.Path(file_okay=False))
@click.option("--out", default="runs/caption", show_default=True, type=click.Path(file_okay=False))
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
@click.option("--register/--no-register", default=True, show_default=True, help="Register as --name.")
@click.option("--mlflow/--no-mlflow", default=True, show_default=True, help="Log the run to MLflow.")
@click.option("--name", default="captioner", show_default=True, help="Registered model name.")
@click.option("--experiment", default="captioner", show_default=True, help="MLflow experiment.")
@click.option("--tracking-uri", default=None, help="MLflow URI [$MLFLOW_TRACKING_URI, else embedded SQLite].")
@click.option("--progress/--no-progress", default=None, help="Progress bar [on a terminal].")
def caption(
    overrides: tuple[str, ...],
    config_name: str,
    data: str,
    out: str,
    features: str | None,
    checkpoints: str | None,
    resume: str | None,
    register: bool,
    mlflow: bool,
    name: str,
    experiment: str,
    tracking_uri: str | None,
    progress: bool | None,
) -> None:
    """Train the caption model, evaluate it on the test split, save and register it.

    KEY=VALUE overrides take dotted keys (train.lr=3e-4, model.decoder.n_layer=2; a bare key is looked up in
    train, then model); unknown keys are refused with the nearest one suggested.
    """
    import time

    started = time.monotonic()
    from training.caption.run import train_caption

    config = _caption_config(config_name, overrides)
    registry = None
    if mlflow:
        from snap2caption.registry import Registry

        registry = Registry(tracking_uri)
    result = train_caption(
        config,
        data,
        out,
        features_dir=features,
        checkpoints_dir=checkpoints,
        resume=resume,
        registry=registry,
        register=register and mlflow,
        mlflow=mlflow,
        model_name=name,
        experiment=experiment,
        preset=Path(config_name).stem,
        progress=progress,
        started=started,
    )
    s = result.summary
    click.echo(f"caption: {s['steps']} steps ({s['epochs']} epochs), stopped: {s['stop_reason']}")
    if s["val"]["cider_d_best"] is not None:
        click.echo(f"  val CIDEr-D {s['val']['cider_d_best']:.4f} (step {s['best_step']})")
    if result.test is not None:
        m = result.test.metrics
        scores = " ".join(f"{k}={m[k]:.4f}" for k in ("cider_d", "bleu_4", "meteor", "rouge_l") if k in m)
        pairs = f"pair_precision={m['pair_precision']:.3f} pair_recall={m['pair_recall']:.3f}"
        click.echo(f"  test ({len(result.test.predictions)} images, {result.test.backend}): {scores} {pairs}")
    click.echo("  timings: " + " ".join(f"{k}={v:.1f}" for k, v in result.timings.items()))
    click.echo(f"  artifact: {result.artifact_dir}")
    if result.registered is not None:
        click.echo(f"  registered {result.registered.name} v{result.registered.version} (alias candidate)")


@train_group.command("caption-features")
@click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")
@click.option("--config", "config_name", default="starter", show_default=True, help="Preset or YAML path.")
@click.option("--data", default="data/processed", show_default=True, type=click.Path(file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Feature cache folder.")
@click.option("--splits", default="train,val", show_default=True, help="Comma-separated splits.")
@click.option("--progress/--no-progress", default=None, help="Progress bar [on a terminal].")
def caption_features(
    overrides: tuple[str, ...], config_name: str, data: str, out: str, splits: str, progress: bool | None
) -> None:
    """Cache the frozen encoder's features of each split (what `train caption --features` reads).

    With a learning encoder (model.encoder.trainable other than none) there is nothing to cache: the folder
    is created empty, so a pipeline stage still succeeds.
    """
    import torch

    from snap2caption.models.backbones import build_encoder
    from training.caption.data import SplitData
    from training.caption.features import cached_features
    from training.caption.train import auto_threads, resolve_device

    config = _caption_config(config_name, overrides)
    enc, cfg = config.model.encoder, config.train
    if enc.trainable != "none":
        Path(out).mkdir(parents=True, exist_ok=True)
        click.echo(f"model.encoder.trainable={enc.trainable}: a learning encoder has no features to cache")
        return
    torch.set_num_threads(cfg.threads or auto_threads())
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)  # as in training, where the encoder is the first module built
    encoder = build_encoder(enc.name, pretrained=enc.pretrained, trainable="none").to(device)
    for split in (s.strip() for s in splits.split(",") if s.strip()):
        features = cached_features(
            encoder,
            SplitData.load(data, split),
            out,
            dtype=cfg.feature_dtype,
            batch_size=cfg.feature_batch_size,
            num_workers=cfg.num_workers,
            device=device,
            runtime=cfg.feature_runtime,
            progress=progress is not False,
        )
        click.echo(f"{split}: features {tuple(features.shape)} {features.dtype} in {out}")
