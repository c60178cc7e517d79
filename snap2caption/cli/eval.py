"""``snap2caption eval ...``: Evaluate models on a dataset split."""

from __future__ import annotations

from pathlib import Path

import click


@click.group("eval")
def eval_group() -> None:
    """Evaluate models on a dataset split."""


@eval_group.command("caption")
@click.option(
    "--model", "model_uri", required=True, help="models:/NAME@ALIAS, models:/NAME/VERSION, a folder."
)
@click.option("--data", default="data/processed", show_default=True, type=click.Path(file_okay=False))
@click.option("--split", default="test", show_default=True, type=click.Choice(["train", "val", "test"]))
@click.option("--out", default=None, type=click.Path(file_okay=False), help="[runs/caption/eval-<split>]")
@click.option("--max-images", default=0, show_default=True, type=click.IntRange(min=0), help="0 = all.")
@click.option(
    "--scorer",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "pycocoevalcap", "python"]),
    help="Metric scorers: pycocoevalcap (Java, METEOR), pure Python (no METEOR), or auto.",
)
@click.option(
    "--num-beams", default=0, show_default=True, type=click.IntRange(min=0), help="0 = the model's."
)
@click.option(
    "--runtime",
    default="torch",
    show_default=True,
    type=click.Choice(["torch", "onnx", "onnx-int8"]),
    help="Network runtime, as the captioner service's (onnx-int8: the int8 decoder).",
)
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--workers", default=0, show_default=True, type=click.IntRange(min=0), help="Decoders.")
@click.option("--samples", default=20, show_default=True, type=click.IntRange(min=0), help="Triples to keep.")
@click.option(
    "--tracking-uri", default=None, help="MLflow URI [$MLFLOW_TRACKING_URI, else the embedded one]."
)
@click.option("--progress/--no-progress", default=None, help="Progress bar [on a terminal].")
def caption(
    model_uri: str,
    data: str,
    split: str,
    out: str | None,
    max_images: int,
    scorer: str,
    num_beams: int,
    runtime: str,
    batch_size: int,
    workers: int,
    samples: int,
    tracking_uri: str | None,
    progress: bool | None,
) -> None:
    """Caption a split with a registered or local model: BLEU-1..4, METEOR, ROUGE-L, CIDEr-D, pair accuracy.

    Writes metrics.json and samples.json (image / references / prediction) into --out.
    """
    from typing import Literal, cast

    from snap2caption.errors import Snap2CaptionError
    from training.caption.evaluate import evaluate_model

    out_dir = out or f"runs/caption/eval-{split}"
    try:
        result, report = evaluate_model(
            model_uri,
            data,
            split,
            out_dir,
            max_images=max_images,
            scorer=cast(Literal["auto", "pycocoevalcap", "python"], scorer),
            num_beams=num_beams,
            batch_size=batch_size,
            num_workers=workers,
            num_samples=samples,
            tracking_uri=tracking_uri,
            progress=progress,
            runtime=cast(Literal["torch", "onnx", "onnx-int8"], runtime),
        )
    except (
        Snap2CaptionError,
        FileNotFoundError,
        ValueError,
    ) as exc:  # no such model, version, folder or manifest
        raise click.ClickException(str(exc)) from exc
    model = report["model"]
    which = f"{model['name']} v{model['version']}" if "version" in model else model["uri"]
    click.echo(f"{which} on {split} ({len(result.predictions)} images, {result.scorer} scorers):")
    for key, value in result.metrics.items():
        click.echo(f"  {key:16s} {value:.4f}")
    click.echo(f"  -> {out_dir}/metrics.json, {out_dir}/samples.json")


@eval_group.command("detector")
@click.option(
    "--model", "model_uri", required=True, help="models:/detector@ALIAS, models:/detector/N or a folder."
)
@click.option(
    "--data",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("data/processed"),
    show_default=True,
    help="ETL output folder (manifests with boxes, images).",
)
@click.option("--split", type=click.Choice(["train", "val", "test"]), default="test", show_default=True)
@click.option("--runtime", type=click.Choice(["onnx", "torch"]), default="onnx", show_default=True)
@click.option("--int8", is_flag=True, help="Evaluate model.int8.onnx (ONNX runtime).")
@click.option("--limit", type=click.IntRange(min=0), default=0, help="First N images only (0 = all).")
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Intra-op threads (torch with 2 threads crawls when another process shares the cores).",
)
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--tracking-uri", default=None, help="MLflow tracking URI for models:/ references.")
def eval_detector_command(
    model_uri: str,
    data: Path,
    split: str,
    runtime: str,
    int8: bool,
    limit: int,
    threads: int,
    json_path: Path | None,
    tracking_uri: str | None,
) -> None:
    """COCO mAP50-95, mAP50 and per-class AP of a detector on a split (pycocotools, not Ultralytics).

    The detector predicts through snap2caption.models.detector (the serving code) and pycocotools scores
    its boxes against the manifest's ground truth in original pixels.
    """
    import json

    import torch

    from snap2caption.models import detector as detector_model
    from training.detector.evaluate import evaluate_detector

    torch.set_num_threads(threads)
    detector = detector_model.load(
        model_uri,
        runtime,  # type: ignore[arg-type]  # click checked it: onnx or torch
        int8=int8,
        threads=threads,
        tracking_uri=tracking_uri,
    )
    label = f"{runtime}{'-int8' if int8 else ''}"
    result = evaluate_detector(detector, data, split, limit=limit, runtime=label)
    click.echo(f"{model_uri} on {data} [{split}], {result.images} images, {result.instances} boxes, {label}")
    click.echo(f"mAP50-95 {result.map50_95:.4f}  mAP50 {result.map50:.4f}  ({result.computed_by})")
    for name, values in result.per_class.items():
        click.echo(
            f"  {name:<12} n={values['instances']:<5} "
            f"AP50-95 {values['ap50_95']:.4f}  AP50 {values['ap50']:.4f}"
        )
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps({"model": model_uri, **result.to_dict()}, indent=2) + "\n")
