"""``snap2caption export ...``: Export models for serving (ONNX; TensorRT where installed)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click


@click.group("export")
def export_group() -> None:
    """Export models for serving (ONNX; TensorRT where installed)."""


def _export_errors() -> Any:
    """Turn export and registry errors into one ``Error: ...`` line."""
    import contextlib

    from snap2caption.errors import Snap2CaptionError

    @contextlib.contextmanager
    def guard() -> Iterator[None]:
        try:
            yield
        except Snap2CaptionError as exc:
            raise click.ClickException(exc.message) from exc

    return guard()


@export_group.command("detector")
@click.option("--format", "fmt", type=click.Choice(["onnx", "tensorrt"]), default="onnx", show_default=True)
@click.option(
    "--int8", is_flag=True, help="Also write model.int8.onnx (static int8, calibrated on train images)."
)
@click.option(
    "--model", "model_uri", default="models:/detector@production", show_default=True, help="URI or folder."
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Output folder (replaced) [default: $SNAP2CAPTION_HOME/exports/detector].",
)
@click.option(
    "--calib-data",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="ETL output for int8 calibration [default: the training data recorded in the artifact].",
)
@click.option("--tracking-uri", default=None, help="MLflow tracking URI for models:/ references.")
def export_detector_command(
    fmt: str, int8: bool, model_uri: str, out: Path | None, calib_data: Path | None, tracking_uri: str | None
) -> None:
    """Export a detector: ONNX with dynamic batch and metadata (+ int8, + TensorRT engine where installed)."""
    from snap2caption.models.uri import resolve_model_dir
    from snap2caption.registry import snap2caption_home
    from training.detector.export import export_detector

    with _export_errors():
        folder = resolve_model_dir(model_uri, tracking_uri=tracking_uri)
        target = out or snap2caption_home() / "exports" / "detector"
        result = export_detector(folder, target, fmt=fmt, int8=int8, calibration_data=calib_data)  # type: ignore[arg-type]
    click.echo(f"exported {model_uri} -> {result}: {', '.join(sorted(p.name for p in result.iterdir()))}")


@export_group.command("tagger")
@click.option("--format", "fmt", type=click.Choice(["onnx", "tensorrt"]), default="onnx", show_default=True)
@click.option("--int8", is_flag=True, help="Also write model.int8.onnx and measure its top-5 agreement.")
@click.option(
    "--model",
    "model_uri",
    default=None,
    help="Tagger URI or folder [default: the pretrained EfficientNet-Lite0 ImageNet tagger].",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Output folder (replaced) [default: $SNAP2CAPTION_HOME/exports/tagger].",
)
@click.option(
    "--register", is_flag=True, help="Register the folder as `tagger` (alias candidate), gate test_top1."
)
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True, help="Intra-op threads.")
@click.option("--tracking-uri", default=None, help="MLflow tracking URI.")
def export_tagger_command(
    fmt: str,
    int8: bool,
    model_uri: str | None,
    out: Path | None,
    register: bool,
    threads: int,
    tracking_uri: str | None,
) -> None:
    """Package the ImageNet tagger: safetensors + ONNX (+ int8, + TensorRT), model card, test_top1."""
    import torch

    from snap2caption.models.tagger.artifact import load_net
    from snap2caption.models.tagger.net import TaggerNet
    from snap2caption.models.uri import resolve_model_dir
    from snap2caption.registry import snap2caption_home
    from training.tagger.package import package_tagger, register_tagger

    torch.set_num_threads(threads)
    with _export_errors():
        if model_uri is None:
            net = TaggerNet.pretrained()
        else:
            net = load_net(resolve_model_dir(model_uri, tracking_uri=tracking_uri))
        target = out or snap2caption_home() / "exports" / "tagger"
        folder, metrics = package_tagger(target, net, int8=int8, fmt=fmt, threads=threads)  # type: ignore[arg-type]
        click.echo(f"tagger -> {folder}")
        click.echo("  " + "  ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        if register:
            version = register_tagger(folder, metrics, tracking_uri=tracking_uri)
            click.echo(
                f"registered tagger v{version} as candidate (gate test_top1={metrics['test_top1']:.3f})"
            )


@export_group.command("caption")
@click.option("--int8/--no-int8", default=True, show_default=True, help="Also write the int8 decoder.")
@click.option(
    "--model", "model_uri", default="models:/captioner@production", show_default=True, help="URI or folder."
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Output folder (replaced) [default: $SNAP2CAPTION_HOME/exports/captioner].",
)
@click.option("--tracking-uri", default=None, help="MLflow tracking URI for models:/ references.")
def export_caption_command(int8: bool, model_uri: str, out: Path | None, tracking_uri: str | None) -> None:
    """Export a caption model for the `onnx` serving backends: encoder + KV-cached decoder (+ int8 decoder).

    Artifacts trained by this version already carry the export; this is for older ones. Register the
    output folder to serve it.
    """
    import shutil

    from snap2caption.models.caption.export import export_for_serving
    from snap2caption.models.uri import resolve_model_dir
    from snap2caption.registry import snap2caption_home

    with _export_errors():
        folder = resolve_model_dir(model_uri, tracking_uri=tracking_uri)
        target = out or snap2caption_home() / "exports" / "captioner"
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(folder, target)
        written = export_for_serving(target, int8=int8)
    click.echo(f"exported {model_uri} -> {target}: {', '.join(p.name for p in written)}")
