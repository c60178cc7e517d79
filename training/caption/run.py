"""One caption training run end to end: data -> (cached features) -> train -> test -> artifact -> registry.

``snap2caption train caption`` calls :func:`train_caption`; so do the tests, with the ``tiny`` preset.

Output folder::

    <out>/model/          the artifact (safetensors, config, tokenizer, model card, MANIFEST.json)
    <out>/checkpoints/    resumable checkpoints (``--resume``; ``--checkpoints`` puts them elsewhere)
    <out>/metrics.json    test and validation metrics, timings, provenance, registered version
    <out>/samples.json    test image / references / prediction triples
    <out>/config.yaml     the resolved run config
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml

from snap2caption.config import ConfigError
from snap2caption.models.artifact import save_caption_model
from snap2caption.models.caption import CaptionModel, build_tokenizer
from snap2caption.monitoring.drift import REFERENCE_FILE, DriftReference, numeric_reference, read_reference
from training.callbacks.base import Callback, CallbackList
from training.callbacks.checkpoint import CheckpointCallback, latest_checkpoint, read_checkpoint
from training.callbacks.early_stopping import EarlyStopping
from training.callbacks.progress import ProgressCallback
from training.caption.config import CaptionRunConfig
from training.caption.data import CaptionPairs, SplitData, manifest_path
from training.caption.evaluate import EvalResult, evaluate_split
from training.caption.export import export_for_serving
from training.caption.features import cached_features
from training.caption.register import DataFacts, is_synthetic, model_card, write_model_card
from training.caption.train import CaptionTrainer, TrainState, auto_threads, resolve_device
from training.provenance import dataset_version, git_commit

if TYPE_CHECKING:
    from snap2caption.registry import ModelVersionInfo, Registry

logger = logging.getLogger(__name__)

MODEL_NAME = "captioner"
EXPERIMENT = "captioner"
# Train settings a resumed run may change (how long, how often, where); anything else must match.
RESUMABLE_CHANGES = {
    "epochs", "max_steps", "time_budget_min", "reserve_min", "checkpoint_every", "keep_checkpoints",
    "eval_every", "patience", "device", "threads", "num_workers", "log_every", "metrics_backend",
    "test_max_images", "num_samples", "eval_batch_size",
}  # fmt: skip


@dataclass
class RunResult:
    """What a training run produced.

    Attributes:
        out_dir: The run folder.
        artifact_dir: The model artifact folder.
        state: Final trainer counters.
        test: Test-split evaluation (None without a test split).
        registered: The registered version (None when not registered).
        run_id: MLflow run id (None without MLflow).
        timings: Seconds per phase (``features_s``, ``train_s``, ``test_s``, ``total_s``...).
        summary: Everything written to ``metrics.json``.
    """

    out_dir: Path
    artifact_dir: Path
    state: TrainState
    test: EvalResult | None
    registered: ModelVersionInfo | None
    run_id: str | None
    timings: dict[str, float] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)


def _optional_split(data_dir: Path, name: str) -> SplitData | None:
    return SplitData.load(data_dir, name) if manifest_path(data_dir, name).is_file() else None


def _check_resume(config: CaptionRunConfig, saved: dict[str, Any]) -> None:
    """A resumed run must train the same model the same way; only RESUMABLE_CHANGES may differ."""
    current = config.to_dict()
    if current["model"] != saved["model"]:
        diff = sorted(k for k in current["model"] if current["model"][k] != saved["model"].get(k))
        raise ConfigError(f"cannot resume: the model config differs from the checkpoint's in {diff}")
    changed = sorted(k for k in current["train"] if current["train"][k] != saved["train"].get(k))
    refused = [k for k in changed if k not in RESUMABLE_CHANGES]
    if refused:
        raise ConfigError(f"cannot resume: train settings {refused} differ from the checkpoint's")
    if changed:
        logger.info("resuming with changed train settings %s", changed)


def train_caption(
    config: CaptionRunConfig,
    data_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    features_dir: str | os.PathLike[str] | None = None,
    checkpoints_dir: str | os.PathLike[str] | None = None,
    resume: str | os.PathLike[str] | None = None,
    registry: Registry | None = None,
    register: bool = True,
    mlflow: bool = True,
    model_name: str = MODEL_NAME,
    experiment: str = EXPERIMENT,
    preset: str = "custom",
    progress: bool | None = None,
    extra_callbacks: list[Callback] | None = None,
    started: float | None = None,
) -> RunResult:
    """Train, evaluate on the test split, save the artifact with its model card, log and register.

    Args:
        config: The run config.
        data_dir: ETL output folder (``manifests/{train,val,test}.parquet``).
        out_dir: The run folder (see the module docstring); a fresh run clears its checkpoints.
        features_dir: Feature cache folder (default ``<out_dir>/features``); used when the encoder is frozen
            and ``train.feature_cache`` is on.
        checkpoints_dir: Where checkpoints go (default ``<out_dir>/checkpoints``).
        resume: A checkpoint folder, or ``"latest"`` for the newest one under ``checkpoints_dir``.
        registry: Registry client (default ``Registry()``: ``MLFLOW_TRACKING_URI`` or the embedded store).
        register: Register the artifact as ``model_name`` (alias ``candidate``). Needs a test split.
        mlflow: Log the run to MLflow (registration needs it).
        model_name: Registered model name.
        experiment: MLflow experiment.
        preset: Preset name, for the model card and tags.
        progress: Progress bars: True, False, or None (only on a terminal).
        extra_callbacks: More callbacks (e.g. a Ray Tune reporter).
        started: ``time.monotonic()`` when the run began (the time budget counts from it); default now.

    Returns:
        What the run produced.
    """
    started = time.monotonic() if started is None else started
    cfg = config.train
    data_dir, out = Path(data_dir), Path(out_dir)
    if register and not mlflow:
        raise ValueError("registering needs MLflow (the registry stores the files in the run)")
    deadline = started + (cfg.time_budget_min - cfg.reserve_min) * 60 if cfg.time_budget_min else None
    torch.set_num_threads(cfg.threads or auto_threads())
    logger.info("torch intra-op threads: %d", torch.get_num_threads())
    device = resolve_device(cfg.device)
    timings: dict[str, float] = {}

    checkpoints = Path(checkpoints_dir) if checkpoints_dir is not None else out / "checkpoints"
    checkpoint = None
    if resume is not None:
        path = latest_checkpoint(checkpoints) if str(resume) == "latest" else Path(resume)
        if path is None:
            raise FileNotFoundError(f"no checkpoint under {checkpoints} to resume from")
        checkpoint = read_checkpoint(path)
        _check_resume(config, checkpoint.config)
        logger.info("resuming from %s", path)
    else:
        shutil.rmtree(checkpoints, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)

    train = SplitData.load(data_dir, "train")
    val, test = _optional_split(data_dir, "val"), _optional_split(data_dir, "test")
    if register and test is None:
        raise FileNotFoundError(f"no test split in {data_dir}: registration needs test metrics")

    torch.manual_seed(cfg.seed)
    if checkpoint is not None:
        tokenizer = checkpoint.tokenizer
    else:
        tokenizer = build_tokenizer(config.model, [c for caps in train.captions for c in caps])
    model = CaptionModel(config.model, tokenizer)
    if checkpoint is not None:
        checkpoint.load_weights(model)
    model.to(device)

    use_features = cfg.feature_cache and config.model.encoder.trainable == "none"
    train_features = val_features = None
    if use_features:
        t0 = time.monotonic()
        cache = Path(features_dir) if features_dir is not None else out / "features"
        options: dict[str, Any] = {
            "dtype": cfg.feature_dtype,
            "batch_size": cfg.feature_batch_size,
            "num_workers": cfg.num_workers,
            "device": device,
            "runtime": cfg.feature_runtime,
            "progress": progress is not False,
        }
        train_features = cached_features(model.encoder, train, cache, **options)
        if val is not None:
            val_features = cached_features(model.encoder, val, cache, **options)
        timings["features_s"] = time.monotonic() - t0
    pairs = CaptionPairs(
        train,
        cfg.captions_per_image,
        features=train_features,
        preprocess=None if use_features else model.preprocess,
    )

    commit, dirty = git_commit()
    facts = DataFacts(
        data_dir=str(data_dir),
        version=dataset_version(data_dir),
        images={s.name: len(s) for s in (train, val, test) if s is not None},
        train_pairs=len(pairs),
        synthetic=is_synthetic(data_dir),
    )
    n_params = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    tags = {
        "snap2caption.model": model_name,
        "preset": preset,
        "git_commit": commit,
        "git_dirty": str(dirty).lower(),
        "dataset_version": facts.version,
        "dataset_path": str(data_dir),
        "config_sha256": config.sha256(),
    }
    callbacks: list[Callback] = [
        ProgressCallback(cfg.log_every, enabled=progress),
        EarlyStopping(cfg.patience),
        CheckpointCallback(checkpoints, cfg.checkpoint_every, cfg.keep_checkpoints),
    ]
    mlflow_cb = None
    if mlflow:
        from snap2caption.registry import Registry
        from training.callbacks.mlflow import MlflowCallback

        registry = registry or Registry()
        params = {
            **config.to_dict(),
            "data": {
                "dir": str(data_dir),
                "version": facts.version,
                **{f"{k}_images": v for k, v in facts.images.items()},
            },
            "n_params": n_params,
            "n_trainable": n_trainable,
            "train_pairs": len(pairs),
            "vocab_size": tokenizer.vocab_size,
            "features_cached": use_features,
        }
        mlflow_cb = MlflowCallback(
            registry,
            experiment,
            run_name=f"{preset}-{time.strftime('%Y%m%d-%H%M%S')}",
            params=params,
            tags=tags,
            config=config.to_dict(),
            log_every=cfg.log_every,
        )
        callbacks.append(mlflow_cb)
    callback_list = CallbackList([*callbacks, *(extra_callbacks or [])])

    trainer = CaptionTrainer(
        config,
        model,
        pairs,
        val=val,
        val_features=val_features,
        device=device,
        callbacks=callback_list,
        deadline=deadline,
    )
    if checkpoint is not None:
        trainer.load_state_dict(checkpoint.state, checkpoint.best_weights)

    failed = True
    try:
        t0 = time.monotonic()
        state = trainer.fit()
        timings["train_s"] = time.monotonic() - t0

        test_result = None
        if test is not None:
            t0 = time.monotonic()
            test_result = evaluate_split(
                model,
                test.head(cfg.test_max_images),
                batch_size=cfg.eval_batch_size,
                num_workers=cfg.num_workers,
                num_beams=cfg.eval_num_beams,
                backend=cfg.metrics_backend,
                num_samples=cfg.num_samples,
                progress=progress is True,
            )
            timings["test_s"] = time.monotonic() - t0
            callback_list.on_test_end(trainer, test_result)

        t0 = time.monotonic()
        artifact = out / "model"
        shutil.rmtree(artifact, ignore_errors=True)
        training_facts: dict[str, Any] = {
            "steps": state.step,
            "epochs": state.step / trainer.steps_per_epoch,
            "device": str(device),
            "stop_reason": trainer.stop_reason,
            "best_step": state.best_step if state.best_step >= 0 else state.step,
            "best_val_cider_d": state.best_score if state.best_step >= 0 else float("nan"),
            **timings,
            "total_s": time.monotonic() - started,
        }
        provenance = {"git_commit": commit + (" (dirty)" if dirty else ""), "config_sha256": config.sha256()}
        if mlflow_cb is not None and mlflow_cb.run_id:
            provenance["mlflow_run_id"] = mlflow_cb.run_id
        save_caption_model(
            model,
            tokenizer,
            artifact,
            drift_reference=drift_reference(data_dir, facts.version, test_result),
            extra={
                "preset": preset,
                "dataset_version": facts.version,
                "git_commit": commit,
                "training": training_facts,
            },
        )
        card = model_card(
            name=model_name,
            config=config.to_dict(),
            preset=preset,
            data=facts,
            test=test_result.to_dict() if test_result else None,
            training=training_facts,
            provenance=provenance,
            n_params=n_params,
            n_trainable=n_trainable,
            vocab_size=tokenizer.vocab_size,
        )
        write_model_card(artifact, card)
        export_for_serving(artifact)  # ONNX + int8 decoder: what the onnx serving backends load
        callback_list.on_model_saved(trainer, artifact)
        timings["save_s"] = time.monotonic() - t0

        registered = None
        if register:
            assert test_result is not None and mlflow_cb is not None
            t0 = time.monotonic()
            metrics = test_result.prefixed("test")
            if state.best_step >= 0:
                metrics["val_cider_d"] = state.best_score
            registered = mlflow_cb.registry.register(
                model_name,
                artifact,
                metrics=metrics,
                run_id=mlflow_cb.run_id,
                tags={k: v for k, v in tags.items() if k != "snap2caption.model"},
                description=f"{preset}, {state.step} steps, test CIDEr-D {metrics['test_cider_d']:.3f}",
            )
            mlflow_cb.set_tags({"registered_version": str(registered.version)})
            timings["register_s"] = time.monotonic() - t0
        timings["total_s"] = time.monotonic() - started

        summary: dict[str, Any] = {
            "model": str(artifact),
            "preset": preset,
            "steps": state.step,
            "epochs": round(state.step / trainer.steps_per_epoch, 3),
            "stop_reason": trainer.stop_reason,
            "best_step": training_facts["best_step"],
            "val": {
                "cider_d_best": state.best_score if state.best_step >= 0 else None,
                "history": state.evals,
            },
            "test": test_result.to_dict() if test_result else None,
            "timings_s": {k: round(v, 2) for k, v in timings.items()},
            "dataset": {"path": str(data_dir), "version": facts.version, "images": facts.images},
            "git_commit": commit,
            "mlflow_run_id": mlflow_cb.run_id if mlflow_cb else None,
            "registered": {"name": model_name, "version": registered.version} if registered else None,
        }
        _write_json(out / "metrics.json", summary)
        _write_json(out / "samples.json", test_result.samples if test_result else [])
        (out / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False), encoding="utf-8")
        failed = False
    finally:
        callback_list.on_run_end(trainer, failed)

    return RunResult(
        out_dir=out,
        artifact_dir=artifact,
        state=state,
        test=test_result,
        registered=registered,
        run_id=mlflow_cb.run_id if mlflow_cb else None,
        timings=timings,
        summary=summary,
    )


def drift_reference(data_dir: Path, version: str, test: EvalResult | None) -> DriftReference | None:
    """The ETL's ``reference_stats.json`` (train-split image statistics) with the dataset version training
    saw and, when the run was tested, the distribution of the final model's caption confidence on the
    test split: what the captioner's drift monitor compares its traffic with. ``None`` (drift off for
    this model) when the dataset predates the reference."""
    reference = read_reference(data_dir / "manifests")
    if reference is None:
        logger.warning("%s has no %s: the model ships without a drift reference", data_dir, REFERENCE_FILE)
        return None
    reference = dataclasses.replace(reference, dataset_version=version)
    if test is not None and test.confidences:
        confidence = numeric_reference(test.confidences)
        source = f"{test.split} split, {len(test.confidences)} captions of the final model"
        reference = reference.with_features(
            {"caption_confidence": confidence}, {"caption_confidence": source}
        )
    return reference


def _write_json(path: Path, data: Any) -> None:
    import json

    path.write_text(json.dumps(data, indent=2, default=float) + "\n", encoding="utf-8")
