"""Train a YOLO detector on the ETL output, offline, tracked in MLflow, registered as ``detector``.

``train_detector(config)`` (a :class:`~training.detector.config.DetectorRunConfig`: ``run`` and ``train``):

1. stages the ETL output into a run folder Ultralytics may write in (image links + label copies; its label
   caches never land in the DVC-tracked data), capped by ``max_*_images``;
2. trains with the Ultralytics ``DetectionTrainer`` on CPU (``amp=False``), the network built from the model
   YAML (optionally filled from COCO weights) — every Ultralytics download switched off
   (``snap2caption.models.detector.yolo``) — with the MLflow and time-budget callbacks; the best-fitness EMA
   weights are kept in memory (no pickled checkpoint is written);
3. writes the artifact (safetensors, model YAML, ``config.json``, ONNX with metadata and the features
   output), evaluates the ONNX model on the test split with pycocotools, fits the detector's training
   domain on its own features (``domain.json`` + ``domain.npz``, :mod:`training.detector.domain`: fitted on
   the train split, calibrated on the validation split, measured on the test split and real photos), adds
   the model card and manifest;
4. registers it as ``run.name`` (alias ``candidate``; gate metric ``test_map50_95``) and, with
   ``run.promote``, promotes it through the gate.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import platform
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from snap2caption.manifest import write_manifest
from snap2caption.models import detector as detector_model
from snap2caption.models.detector import yolo
from snap2caption.models.detector.artifact import write_artifact
from snap2caption.models.detector.config import CONFIG_FILE, DetectorConfig
from snap2caption.monitoring.reference import read_reference, write_reference
from snap2caption.registry import PromotionResult, Registry, snap2caption_home
from training.detector.callbacks import MlflowLogger, TimeBudget, metric_key
from training.detector.config import DetectorRunConfig, DetectorTrainConfig
from training.detector.domain import DomainReport, fit_detector_domain
from training.detector.evaluate import DetectionEval, evaluate_detector, load_split
from training.detector.export import CARD_FILE

logger = logging.getLogger(__name__)

EVAL_FILE = "eval.json"
SPLITS = ("train", "val", "test")


@dataclass
class TrainResult:
    """What a training job produced.

    Attributes:
        artifact_dir: The model folder.
        evaluation: Test-split evaluation of the ONNX model.
        run_id: MLflow run.
        version: Registered version (None when not registered).
        promotion: The promotion attempt (None when not asked).
        epochs: Epochs trained.
        planned_epochs: Epochs the config asked for.
        train_seconds: Wall time from job start to the end of the last epoch.
        total_seconds: Wall time of the whole job.
        work_dir: Ultralytics' run folder (plots, results.csv, staged data).
        domain: The training domain written into the artifact and what it measured (None: none written).
    """

    artifact_dir: Path
    evaluation: DetectionEval
    run_id: str
    version: int | None
    promotion: PromotionResult | None
    epochs: int
    planned_epochs: int
    train_seconds: float
    total_seconds: float
    work_dir: Path
    domain: DomainReport | None = None


def stage_dataset(
    data_dir: str | Path, work_dir: Path, config: DetectorTrainConfig
) -> tuple[Path, list[str]]:
    """Lay out the ETL output as an Ultralytics dataset under ``work_dir`` (links to images, copied labels).

    Returns:
        ``(dataset.yaml path, class names)``.

    Raises:
        FileNotFoundError: The ETL output or its ``dataset.yaml`` is missing.
    """
    root = Path(data_dir).resolve()
    data_yaml = root / "dataset.yaml"
    if not data_yaml.is_file():
        raise FileNotFoundError(
            f"{data_yaml} not found: run `snap2caption data etl` (source with boxes) first"
        )
    names_map = yaml.safe_load(data_yaml.read_text())["names"]
    names = [str(names_map[i]) for i in sorted(names_map)] if isinstance(names_map, dict) else list(names_map)
    limits = {"train": config.max_train_images, "val": config.max_val_images, "test": config.max_test_images}
    staged = work_dir / "data"
    if staged.exists():
        shutil.rmtree(staged)
    for split in SPLITS:
        images, labels = staged / "images" / split, staged / "labels" / split
        images.mkdir(parents=True)
        labels.mkdir(parents=True)
        for row in load_split(root, split, limits[split]):
            source = root / row["path"]
            (images / source.name).symlink_to(source)
            label = root / "labels" / split / f"{source.stem}.txt"
            if label.is_file():
                shutil.copyfile(label, labels / label.name)
    doc = {"path": str(staged), **{s: f"images/{s}" for s in SPLITS}, "names": dict(enumerate(names))}
    out = staged / "dataset.yaml"
    out.write_text(yaml.safe_dump(doc, sort_keys=False))
    return out, names


def _trainer_class() -> type:
    """The Ultralytics ``DetectionTrainer`` subclass (defined after ``prepare_ultralytics``)."""
    yolo.prepare_ultralytics()
    from ultralytics.models.yolo.detect import DetectionTrainer

    class SnapDetectionTrainer(DetectionTrainer):
        """``DetectionTrainer`` that builds from a model dict, may start from given weights, and writes no
        pickled checkpoints: the best-fitness EMA weights stay in memory as ``best_state``."""

        def __init__(
            self, overrides: dict[str, Any], model_cfg: dict[str, Any], init_state: dict[str, Any] | None
        ) -> None:
            self.model_cfg = model_cfg
            self.init_state = init_state
            self.best_state: dict[str, torch.Tensor] | None = None
            self.best_epoch = -1
            super().__init__(overrides=overrides)

        def get_model(self, cfg: Any = None, weights: Any = None, verbose: bool = True) -> Any:
            model = yolo.build_detection_model(self.model_cfg, nc=self.data["nc"], verbose=False)
            model = self.set_model_names_for_load(model)
            if self.init_state is not None:
                copied, total = yolo.transfer_weights(model, self.init_state)
                logger.info("fine-tuning: %d of %d tensors copied from the pretrained weights", copied, total)
            return model

        def validate(self) -> Any:
            # Ultralytics' validator turns its own plots flag off for good after the first epoch
            # (``args.plots &= final epoch``) and counts on final_eval to draw the PR curves and confusion
            # matrices; here the epoch count can change under the time budget, so ask again every epoch.
            if self.validator is not None:
                self.validator.args.plots = self.args.plots
            return super().validate()

        def save_model(self) -> bool:
            if self.fitness is not None and self.best_fitness == self.fitness:
                self.best_state = yolo.state_dict(self.ema.ema)
                self.best_epoch = int(self.epoch)
            return False  # nothing written, so no on_model_save

        def final_eval(self) -> None:
            """Skipped: the job evaluates the exported model on the test split itself."""

    return SnapDetectionTrainer


def _overrides(config: DetectorTrainConfig, data_yaml: Path, work_dir: Path) -> dict[str, Any]:
    return {
        "task": "detect",
        "model": config.model,
        "data": str(data_yaml),
        "imgsz": config.imgsz,
        "epochs": config.epochs,
        "batch": config.batch,
        "workers": config.workers,
        "cache": "ram" if config.cache else False,
        "optimizer": config.optimizer,
        "lr0": config.lr0,
        "nbs": config.nbs,
        "warmup_epochs": config.warmup_epochs,
        "close_mosaic": config.close_mosaic,
        "mosaic": config.mosaic,
        "patience": config.patience,
        "seed": config.seed,
        "deterministic": config.deterministic,
        "device": "cpu",
        "amp": False,  # no AMP check (it would download weights); AMP is a GPU feature anyway
        "pretrained": False,  # weights, if any, come from init_state (never an Ultralytics download)
        "plots": config.plots,
        "val": True,
        "save": True,  # save_model runs every epoch (only then can it see the best one); ours writes nothing
        "project": str(work_dir),
        "name": "train",
        "exist_ok": True,
        "verbose": True,
    }


def domain_card(report: DomainReport | None, why_none: str) -> str:
    """The model card's paragraph on the training domain."""
    if report is None:
        return f"**Domain.** No domain model: {why_none}. The detector service answers `in_domain: null`."
    domain = report.domain
    photos = (
        "scikit-image was not installed, so it was not measured on real photos"
        if report.real_photo_detection_rate is None
        else f"it calls {report.real_photo_detection_rate:.0%} of scikit-image's {len(report.real_photos)} "
        f"real photos ({', '.join(report.real_photos)}) out of domain"
    )
    return (
        f"**Domain.** `domain.json` + `domain.npz` describe where the training images lie in the detector's "
        f"own features (`{domain.feature}`, {domain.dim} values per image, from the same forward pass as "
        f"the boxes): a probabilistic-PCA Mahalanobis distance fitted on {domain.n_fit} training images, "
        f"its threshold calibrated on {domain.calibration.size} validation images for a false-rejection "
        f"rate of {domain.false_rejection_rate:g}. Measured: it rejects {report.test_rejection_rate:.1%} of "
        f"{report.test_images} held-out test images (in domain), and {photos}. The detector service "
        "withholds the objects of an image outside this domain (`withheld`, `include_out_of_domain`)."
    )


def model_card(
    config: DetectorConfig,
    run_config: DetectorRunConfig,
    evaluation: DetectionEval,
    facts: dict,
    domain: str = "",
) -> str:
    """The artifact's ``README.md`` (``domain``: the paragraph of :func:`domain_card`)."""
    rows = "\n".join(
        f"| {name} | {v['instances']} | {v['ap50_95']:.3f} | {v['ap50']:.3f} |"
        for name, v in evaluation.per_class.items()
    )
    data, train = run_config.run.data, run_config.train
    return f"""# detector: {config.model} on {data}

Object detector (Ultralytics YOLO, {config.model}, {
        "fine-tuned from " + str(train.pretrained) if train.pretrained else "trained from scratch"
    }) for {config.num_classes} classes: {", ".join(config.names)}.

**Data.** Trained on the ETL output at `{data}`. When that is the project's synthetic "shapes" benchmark
(coloured shapes on plain backgrounds), this model detects those shapes and nothing else: it is never
presented as COCO quality.

**Input.** Letterbox to {config.imgsz} x {config.imgsz} (aspect kept, grey {config.pad_value} padding,
centred), RGB, pixels / 255, NCHW float32. `model.onnx` outputs `(batch, 4 + {config.num_classes}, anchors)`:
box centre x, y, width, height in input pixels, then per-class sigmoid scores; NMS runs in
`snap2caption.models.detector` (numpy). Class names, input size and preprocessing are also in the ONNX
file's `metadata_props`.

**Evaluation.** {evaluation.computed_by}; split `{evaluation.split}`, {evaluation.images} images,
{evaluation.instances} boxes, runtime {evaluation.runtime}; score threshold 0.001, multi-label NMS at
IoU 0.7, at most 100 detections per image.

| metric | value |
|---|---|
| mAP50-95 (COCO AP) | {evaluation.map50_95:.4f} |
| mAP50 | {evaluation.map50:.4f} |

| class | instances | AP50-95 | AP50 |
|---|---|---|---|
{rows}

{domain}

**Training.** {facts["epochs"]} of {facts["planned_epochs"]} planned epochs in {
        facts["train_seconds"]:.0f} s on
{facts["machine"]} (`device=cpu`, `amp=False`, {train.threads} threads); full config in `config.json`.

**Licence.** The network architecture and training code are Ultralytics YOLO, AGPL-3.0.
"""


def train_detector(
    config: DetectorRunConfig, *, callbacks: Sequence[Any] = (), tags: Mapping[str, str] | None = None
) -> TrainResult:
    """Train, export, evaluate and (with ``run.register``) register a detector. See the module docstring.

    Args:
        config: The resolved run config. The artifact goes to ``run.out`` (replaced), by default
            ``$SNAP2CAPTION_HOME/models/<run.name>/run-<UTC time>``.
        callbacks: More Ultralytics callbacks, each with ``attach(trainer)`` (e.g. a Ray Tune reporter).
        tags: More MLflow run tags (e.g. the parent run of a search); ``mlflow.runName`` names the run.

    Raises:
        FileNotFoundError: No ETL output at ``run.data``.
    """
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunStatus

    started = time.monotonic()
    run = config.run
    cfg = config.train
    out_dir = Path(run.out) if run.out else default_out(run.name)
    yolo.prepare_ultralytics()
    torch.set_num_threads(cfg.threads)
    registry = Registry(run.tracking_uri)
    client = MlflowClient(tracking_uri=registry.tracking_uri, registry_uri=registry.registry_uri)
    extra_tags = dict(tags or {})
    mlflow_run = client.create_run(
        registry.ensure_experiment(run.experiment_name),
        run_name=extra_tags.pop("mlflow.runName", f"detector-{Path(cfg.model).stem}-{cfg.imgsz}"),
        tags={"snap2caption.model": run.name, "preset": run.preset, **extra_tags},
    )
    run_id = mlflow_run.info.run_id
    try:
        # Flat params beside Ultralytics' own yolo.* ones: the two sections share no key.
        params = {**dataclasses.asdict(run), **cfg.to_dict()}
        client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])
        work = Path(run.work_dir) if run.work_dir else snap2caption_home() / "runs" / "detector" / run_id
        work.mkdir(parents=True, exist_ok=True)
        data_yaml, names = stage_dataset(run.data, work, cfg)
        model_cfg = yolo.model_yaml(cfg.model)
        init_state = yolo.read_pretrained(cfg.pretrained) if cfg.pretrained else None

        trainer = _trainer_class()(_overrides(cfg, data_yaml, work), model_cfg, init_state)
        MlflowLogger(client, run_id).attach(trainer)
        budget = TimeBudget(cfg.time_budget_min * 60, started) if cfg.time_budget_min > 0 else None
        if budget:
            budget.attach(trainer)
        for callback in callbacks:
            callback.attach(trainer)
        trainer.train()
        train_seconds = time.monotonic() - started
        epochs = int(trainer.epoch) + 1
        state = trainer.best_state or yolo.state_dict(trainer.ema.ema)
        logger.info(
            "trained %d epochs in %.0f s; best epoch %d", epochs, train_seconds, trainer.best_epoch + 1
        )

        model = yolo.build_detection_model(model_cfg, nc=len(names))
        yolo.load_state(model, state)
        facts = {
            "epochs": epochs,
            "planned_epochs": cfg.epochs,
            "best_epoch": trainer.best_epoch + 1,
            "train_seconds": round(train_seconds, 1),
            "machine": f"{platform.machine()} x{os.cpu_count()} CPUs, torch {torch.__version__}",
            "mlflow_run_id": run_id,
        }
        det_config = DetectorConfig(
            names=names,
            imgsz=cfg.imgsz,
            stride=int(yolo.detect_head(model).stride.max()),
            model=cfg.model,
            extra={"train": {**cfg.to_dict(), "data": str(Path(run.data).resolve())}, "facts": facts},
        )
        out = write_artifact(out_dir, model, model_cfg, det_config)
        detector = detector_model.load(out, "onnx", verify=False, threads=cfg.threads)
        evaluation = evaluate_detector(detector, run.data, cfg.eval_split, limit=cfg.max_test_images)
        metrics = evaluation.metrics("test")
        det_config = dataclasses.replace(det_config, extra={**det_config.extra, "metrics": metrics})
        (out / CONFIG_FILE).write_text(json.dumps(det_config.to_dict(), indent=2, sort_keys=True) + "\n")
        (out / EVAL_FILE).write_text(json.dumps(evaluation.to_dict(), indent=2) + "\n")
        domain, why_none = fit_domain_or_explain(detector, run.data, cfg)
        if domain is not None:
            domain.domain.save(out)  # before the manifest: load-time verification covers it
        card = model_card(det_config, config, evaluation, facts, domain_card(domain, why_none))
        (out / CARD_FILE).write_text(card)
        # The drift reference of the training images ships with the model (the detector service's monitor).
        reference = read_reference(Path(run.data) / "manifests")
        if reference is not None:
            write_reference(reference, out)
        else:
            logger.warning("%s has no drift reference: the model ships without one", run.data)
        write_manifest(out)

        now = int(time.time() * 1000)
        client.log_batch(
            run_id,
            metrics=[Metric(metric_key(k), v, now, epochs) for k, v in metrics.items()]
            + [Metric(k, v, now, epochs) for k, v in (domain.metrics() if domain else {}).items()]
            + [
                Metric("train_seconds", train_seconds, now, epochs),
                Metric("epochs_run", epochs, now, epochs),
            ],
        )
        client.log_artifact(run_id, str(out / EVAL_FILE))
        version: int | None = None
        promotion: PromotionResult | None = None
        if run.register:
            tags = {"model_yaml": cfg.model, "imgsz": str(cfg.imgsz), "names": json.dumps(names)}
            version = registry.register(run.name, out, metrics=metrics, run_id=run_id, tags=tags).version
            if run.promote:
                promotion = registry.promote(run.name)
        else:
            client.log_artifacts(run_id, str(out), "model")
    except BaseException:
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))
        raise
    client.set_terminated(run_id)
    return TrainResult(
        artifact_dir=out,
        evaluation=evaluation,
        run_id=run_id,
        version=version,
        promotion=promotion,
        epochs=epochs,
        planned_epochs=cfg.epochs,
        train_seconds=train_seconds,
        total_seconds=time.monotonic() - started,
        work_dir=work,
        domain=domain,
    )


def fit_domain_or_explain(
    detector: detector_model.Detector, data_dir: str | Path, config: DetectorTrainConfig
) -> tuple[DomainReport | None, str]:
    """The detector's domain (:func:`fit_detector_domain`), or None and why (a validation split too small
    to calibrate on: the model then ships without one, as older artifacts do)."""
    try:
        return fit_detector_domain(detector, data_dir, images=config.domain_images), ""
    except ValueError as exc:
        logger.warning("no domain model for the detector: %s", exc)
        return None, str(exc)


def default_out(name: str) -> Path:
    """``$SNAP2CAPTION_HOME/models/<name>/run-<UTC time>``: where a run writes without ``run.out``."""
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    return snap2caption_home() / "models" / name / f"run-{stamp}"
