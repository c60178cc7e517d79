"""One caption training run end to end, in named phases: data -> model -> (cached features) -> tracking ->
fit -> test -> domain -> confidence calibration -> artifact -> registry -> summary.

``snap2caption train caption`` calls :func:`train_caption`; so do the tests, with the ``tiny`` preset. Every
setting of the run is in its config (:class:`~training.caption.config.CaptionRunConfig`: ``run``, ``model``,
``train``); :func:`train_caption` reads top to bottom as the list of phases, each a function below.

Output folder (``run.out``)::

    <out>/model/          the artifact (weights, config, tokenizer, calibration, domain, model card,
                          MANIFEST.json)
    <out>/checkpoints/    resumable checkpoints (``run.resume``; ``run.checkpoints`` puts them elsewhere)
    <out>/metrics.json    test and validation metrics, timings, provenance, registered version
    <out>/samples.json    test image / references / prediction triples
    <out>/config.yaml     the resolved run config
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import yaml
from torch import Tensor

from snap2caption.config import ConfigError
from snap2caption.models.caption.artifact import save_caption_model
from snap2caption.models.caption.calibration import (
    Calibration,
    expected_calibration_error,
    fit_platt,
)
from snap2caption.models.caption.decoding import repeated_bigrams
from snap2caption.models.caption.domain import DOMAIN_FEATURE, pooled_prefix
from snap2caption.models.caption.export import export_for_serving
from snap2caption.models.caption.model import CaptionModel, MlpMapping, build_tokenizer
from snap2caption.models.caption.views import flip_pixels
from snap2caption.models.domain import DomainModel, fit_domain, min_calibration_images
from snap2caption.monitoring.reference import (
    REFERENCE_FILE,
    DriftReference,
    numeric_reference,
    read_reference,
)
from training.callbacks.base import Callback, CallbackList
from training.callbacks.checkpoint import Checkpoint, CheckpointCallback, latest_checkpoint, read_checkpoint
from training.callbacks.early_stopping import EarlyStopping
from training.callbacks.progress import ProgressCallback
from training.caption.config import CaptionRunConfig
from training.caption.data import CaptionPairs, SplitData, image_loader, manifest_path
from training.caption.evaluate import EvalResult, evaluate_split, pairs_right
from training.caption.features import cached_features, encoder_runner, extract_features
from training.caption.model_card import DataFacts, is_synthetic, model_card, write_model_card
from training.caption.train import (
    CaptionTrainer,
    TrainState,
    auto_threads,
    resolve_device,
    resolve_precision,
)
from training.distributed.strategy import SingleProcess
from training.provenance import dataset_version, git_commit

if TYPE_CHECKING:
    from snap2caption.models.caption.config import CaptionConfig
    from snap2caption.models.caption.tokenizer import CaptionTokenizer
    from snap2caption.registry import ModelVersionInfo
    from training.callbacks.mlflow import MlflowCallback

logger = logging.getLogger(__name__)

# Train settings a resumed run may change (how long, how often, where); anything else must match.
RESUMABLE_CHANGES = {
    "epochs", "max_steps", "time_budget_min", "reserve_min", "checkpoint_every", "keep_checkpoints",
    "eval_every", "patience", "device", "threads", "num_workers", "log_every", "metrics_scorer",
    "test_max_images", "num_samples", "eval_batch_size", "domain_false_rejection_rate",
}  # fmt: skip

# The domain model (``domain.json``): fitted on at most this many training images (a seeded sample),
# calibrated on the validation split to ``train.domain_false_rejection_rate``.
DOMAIN_FIT_MAX_IMAGES = 2000


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


@dataclass
class Splits:
    """The ETL's splits a run reads; ``val`` and ``test`` are optional."""

    train: SplitData
    val: SplitData | None
    test: SplitData | None


@dataclass
class Provenance:
    """Where a run's model came from: code, data and config, as run tags and model-card lines.

    Attributes:
        commit: The git commit of the code.
        dirty: Whether the checkout had uncommitted changes.
        facts: The data it was trained on.
        tags: MLflow run tags (the registered version gets them too, less ``snap2caption.model``).
    """

    commit: str
    dirty: bool
    facts: DataFacts
    tags: dict[str, str]


def train_caption(
    config: CaptionRunConfig,
    *,
    progress: bool | None = None,
    extra_callbacks: list[Callback] | None = None,
    started: float | None = None,
    strategy: SingleProcess | None = None,
) -> RunResult:
    """Train, evaluate on the test split, save the artifact with its model card, log and register.

    Args:
        config: The run config: where (``run``), what model (``model``) and how to train it (``train``).
        progress: Progress bars: True, False, or None (only on a terminal).
        extra_callbacks: More callbacks (e.g. a Ray Tune reporter).
        started: ``time.monotonic()`` when the run began (the time budget counts from it); default now.
        strategy: One process (default), or this process's rank of a DDP group (``train caption
            --workers``, :mod:`training.distributed`): rank 0 validates, tests, tracks, checkpoints, saves
            and registers; the other ranks only train (``extra_callbacks`` run on every rank).

    Returns:
        What the run produced.
    """
    started = time.monotonic() if started is None else started
    strategy = strategy or SingleProcess()
    timings: dict[str, float] = {}
    device = setup_device(config)
    config = with_precision(config, device)
    checkpoint = open_checkpoints(config, owner=strategy.is_main)
    splits = load_splits(config)
    if not strategy.is_main:
        splits = Splits(splits.train, val=None, test=None)  # only rank 0 validates and tests
    model = build_model(config, splits, checkpoint, device)
    with strategy.main_first():  # rank 0 fills the feature cache, then the others read it
        pairs, val_features = training_pairs(config, model, splits, device, progress, timings)
    provenance = describe_run(config, splits, pairs)
    tracker = start_tracking(config, model, pairs, provenance, strategy)
    callbacks = CallbackList(
        [
            *(standard_callbacks(config, progress) if strategy.is_main else []),
            *([tracker] if tracker else []),
            *(extra_callbacks or []),
        ]
    )
    trainer = CaptionTrainer(
        config,
        model,
        pairs,
        val=splits.val,
        val_features=val_features,
        device=device,
        callbacks=callbacks,
        deadline=deadline(config, started) if strategy.is_main else None,  # rank 0's clock rules
        strategy=strategy,
    )
    if checkpoint is not None:
        trainer.load_state_dict(checkpoint.state, checkpoint.best_weights)
    strategy.seed_rank(config.train.seed, trainer.state.step)

    failed = True
    try:
        with timed(timings, "train_s"):
            state = trainer.fit()
        if not strategy.is_main:  # the weights every rank trained are rank 0's to test, save and register
            failed = False
            out = Path(config.run.out)
            return RunResult(out, out / "model", state, None, None, None, timings)
        held_out: dict[str, Tensor] = {}
        mirrored: dict[str, Mirrored] = {}
        with contextlib.ExitStack() as stack:  # the held-out encoder stays open for the mirrored views
            if uses_cached_features(config):
                run = stack.enter_context(held_out_runner(config, model, device))
                with timed(timings, "encode_s"):
                    held_out = encode_held_out(config, model, splits, device, run)
                mirrored = mirrored_grids(config, model, splits, run)
            test = None
            if splits.test is not None:
                with timed(timings, "test_s"):
                    test = test_model(
                        config, model, splits.test, progress, held_out.get("test"), mirrored.get("test")
                    )
                callbacks.on_test_end(trainer, test)
            with timed(timings, "domain_s"):
                domain = describe_domain(
                    config, model, splits, pairs, val_features, provenance, tracker, held_out.get("test")
                )
            calibration = None
            if splits.val is not None and len(splits.val):
                with timed(timings, "calibration_s"):
                    calibration = calibrate_confidence(
                        config,
                        model,
                        splits.val,
                        splits.test,
                        test,
                        progress,
                        held_out.get("val"),
                        mirrored.get("val"),
                    )
                if tracker is not None:
                    tracker.log_metrics(calibration_metrics(calibration), state.step)
        with timed(timings, "save_s"):
            artifact, training = save_artifact(
                config, trainer, test, calibration, provenance, tracker, timings, started, domain
            )
            callbacks.on_model_saved(trainer, artifact)
        registered = None
        if config.run.register:
            assert test is not None and tracker is not None  # load_splits and the config checked both
            with timed(timings, "register_s"):
                registered = register_model(config, tracker, artifact, test, state, provenance)
        timings["total_s"] = time.monotonic() - started
        summary = write_summary(
            config, trainer, test, calibration, training, provenance, tracker, registered, timings, domain
        )
        failed = False
    finally:
        callbacks.on_run_end(trainer, failed)

    return RunResult(
        out_dir=Path(config.run.out),
        artifact_dir=artifact,
        state=state,
        test=test,
        registered=registered,
        run_id=tracker.run_id if tracker else None,
        timings=timings,
        summary=summary,
    )


# ============================================================================================== phases


def with_precision(config: CaptionRunConfig, device: torch.device) -> CaptionRunConfig:
    """The config with ``train.precision`` resolved for ``device`` (``auto`` -> bf16 or fp32), so that what
    is tracked, checkpointed and written in the model card is the precision the run used."""
    precision = resolve_precision(config.train.precision, device)
    if precision != config.train.precision:
        logger.info("train.precision %s -> %s on %s", config.train.precision, precision, device)
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, precision=precision))
    return config


def setup_device(config: CaptionRunConfig) -> torch.device:
    """Torch's intra-op threads (``train.threads``, or the idle cores) and the training device."""
    torch.set_num_threads(config.train.threads or auto_threads())
    logger.info("torch intra-op threads: %d", torch.get_num_threads())
    return resolve_device(config.train.device)


def open_checkpoints(config: CaptionRunConfig, *, owner: bool = True) -> Checkpoint | None:
    """The checkpoint ``run.resume`` names, checked against this config; a fresh run empties the
    checkpoint folder instead, when this process owns it (``owner``: not a rank other than 0). Creates the
    run folder.

    Raises:
        FileNotFoundError: ``run.resume=latest`` and no checkpoint to resume from.
        ConfigError: The checkpoint trained another model, or trained it another way.
    """
    run = config.run
    out = Path(run.out)
    folder = checkpoints_dir(config)
    checkpoint = None
    if run.resume is not None:
        path = latest_checkpoint(folder) if run.resume == "latest" else Path(run.resume)
        if path is None:
            raise FileNotFoundError(f"no checkpoint under {folder} to resume from")
        checkpoint = read_checkpoint(path)
        check_resume(config, checkpoint.config)
        logger.info("resuming from %s", path)
    elif owner:
        shutil.rmtree(folder, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    return checkpoint


def load_splits(config: CaptionRunConfig) -> Splits:
    """The train split and, when the ETL made them, the val and test splits of ``run.data``.

    Raises:
        FileNotFoundError: No train split; or no test split while ``run.register`` needs test metrics.
    """
    data = Path(config.run.data)
    splits = Splits(
        SplitData.load(data, "train"), _optional_split(data, "val"), _optional_split(data, "test")
    )
    if config.run.register and splits.test is None:
        raise FileNotFoundError(f"no test split in {data}: registration needs test metrics")
    return splits


def build_model(
    config: CaptionRunConfig, splits: Splits, checkpoint: Checkpoint | None, device: torch.device
) -> CaptionModel:
    """The network on ``device``, seeded by ``train.seed``: the checkpoint's tokenizer and weights when
    resuming, else a tokenizer trained on the training captions and fresh weights."""
    torch.manual_seed(config.train.seed)
    if checkpoint is not None:
        tokenizer = checkpoint.tokenizer
    else:
        tokenizer = build_tokenizer(config.model, [c for caps in splits.train.captions for c in caps])
    model = CaptionModel(with_repeatable_bigrams(config, splits.train, tokenizer), tokenizer)
    if checkpoint is not None:
        checkpoint.load_weights(model)
    return model.to(device)


def with_repeatable_bigrams(
    config: CaptionRunConfig, train: SplitData, tokenizer: CaptionTokenizer
) -> CaptionConfig:
    """The model config, with ``decoding.repeatable_bigrams`` learned from the training targets (the first
    ``train.captions_per_image`` captions of each image) when ``decoding.limit_repeats`` is on."""
    decoding = config.model.decoding
    if not decoding.limit_repeats:
        return config.model
    keep = config.train.captions_per_image or None
    targets = (tokenizer.encode(c) for caps in train.captions for c in caps[:keep])
    pairs = repeated_bigrams(targets)
    logger.info("decoding.limit_repeats: %d token pairs repeat within a training caption", len(pairs))
    return dataclasses.replace(config.model, decoding=dataclasses.replace(decoding, repeatable_bigrams=pairs))


def training_pairs(
    config: CaptionRunConfig,
    model: CaptionModel,
    splits: Splits,
    device: torch.device,
    progress: bool | None,
    timings: dict[str, float],
) -> tuple[CaptionPairs, Tensor | None]:
    """The (image, caption) training pairs and the validation features.

    With a frozen encoder and ``train.feature_cache`` on, the encoder runs once per split (cached under
    ``run.features``; ``timings["features_s"]``) and the pairs hold features; otherwise they decode and
    preprocess the images and there are no validation features.
    """
    cfg = config.train
    if not uses_cached_features(config):
        pairs = CaptionPairs(splits.train, cfg.captions_per_image, preprocess=model.preprocess)
        return with_attention_targets(config, model, pairs), None
    with timed(timings, "features_s"):
        cache = Path(config.run.features) if config.run.features else Path(config.run.out) / "features"
        options: dict[str, Any] = {
            "dtype": cfg.feature_dtype,
            "batch_size": cfg.feature_batch_size,
            "num_workers": cfg.num_workers,
            "device": device,
            "runtime": cfg.feature_runtime,
            "progress": progress is not False,
        }
        train_features = cached_features(model.encoder, splits.train, cache, **options)
        val_features = None
        if splits.val is not None:
            val_features = cached_features(model.encoder, splits.val, cache, **options)
    pairs = CaptionPairs(splits.train, cfg.captions_per_image, features=train_features)
    return with_attention_targets(config, model, pairs), val_features


def with_attention_targets(
    config: CaptionRunConfig, model: CaptionModel, pairs: CaptionPairs
) -> CaptionPairs:
    """The pairs, with per-phrase attention targets when ``train.attention_supervision`` is on.

    Raises:
        ConfigError: Supervision asked of a model whose prefix tokens are not grid cells (the transformer
            mapping), or of a layer the decoder does not have.
    """
    cfg = config.train
    if not cfg.attention_supervision:
        return pairs
    if not isinstance(model.mapping, MlpMapping):
        raise ConfigError(
            "train.attention_supervision needs model.mapping.type=mlp (prefix tokens that are cells)"
        )
    n_layer = model.decoder.config.n_layer
    if cfg.attention_layer >= n_layer:
        raise ConfigError(
            f"train.attention_layer must be below the decoder's {n_layer} layers, got {cfg.attention_layer}"
        )
    supervised = pairs.add_attention_targets(
        model.preprocess, model.mapping.grid, prefix_order=cfg.phrase_order == "prefix"
    )
    if not supervised:
        logger.warning(
            "train.attention_supervision: no training pair has phrases matched to boxes (does the manifest "
            "hold boxes, and do the captions list the boxes' categories?); training on captions alone"
        )
    logger.info(
        "attention supervision (weight %g, layer %d): %d of %d training pairs have phrases matched to boxes",
        cfg.attention_supervision,
        cfg.attention_layer,
        supervised,
        len(pairs),
    )
    return pairs


def describe_run(config: CaptionRunConfig, splits: Splits, pairs: CaptionPairs) -> Provenance:
    """The code, data and config the run trains from, as run tags."""
    data = str(Path(config.run.data))
    commit, dirty = git_commit()
    facts = DataFacts(
        data_dir=data,
        version=dataset_version(data),
        images={s.name: len(s) for s in (splits.train, splits.val, splits.test) if s is not None},
        train_pairs=len(pairs),
        synthetic=is_synthetic(data),
    )
    tags = {
        "snap2caption.model": config.run.name,
        "preset": config.run.preset,
        "git_commit": commit,
        "git_dirty": str(dirty).lower(),
        "dataset_version": facts.version,
        "dataset_path": data,
        "config_sha256": config.sha256(),
    }
    return Provenance(commit, dirty, facts, tags)


def standard_callbacks(config: CaptionRunConfig, progress: bool | None) -> list[Callback]:
    """Progress, early stopping and checkpoints: the callbacks every run has."""
    cfg = config.train
    return [
        ProgressCallback(cfg.log_every, enabled=progress),
        EarlyStopping(cfg.patience),
        CheckpointCallback(checkpoints_dir(config), cfg.checkpoint_every, cfg.keep_checkpoints),
    ]


def start_tracking(
    config: CaptionRunConfig,
    model: CaptionModel,
    pairs: CaptionPairs,
    provenance: Provenance,
    strategy: SingleProcess,
) -> MlflowCallback | None:
    """The MLflow callback (None with ``run.mlflow`` off, and on ranks other than 0): the run's params
    (the parallelism too), tags and resolved config, in ``run.experiment_name`` of the registry at
    ``run.tracking_uri``."""
    if not config.run.mlflow or not strategy.is_main:
        return None
    from snap2caption.registry import Registry
    from training.callbacks.mlflow import MlflowCallback

    facts = provenance.facts
    params = {
        **config.to_dict(),
        "data": {
            "dir": facts.data_dir,
            "version": facts.version,
            **{f"{k}_images": v for k, v in facts.images.items()},
        },
        **parameter_counts(model),
        "train_pairs": len(pairs),
        "vocab_size": model.tokenizer.vocab_size,
        "features_cached": uses_cached_features(config),
        **strategy.describe(),
    }
    return MlflowCallback(
        Registry(config.run.tracking_uri),
        config.run.experiment_name,
        run_name=f"{config.run.preset}-{time.strftime('%Y%m%d-%H%M%S')}",
        params=params,
        tags=provenance.tags,
        config=config.to_dict(),
        log_every=config.train.log_every,
    )


# ``(view, rows) -> grids`` of a held-out split's images at those rows, mirrored as the view sees them.
Mirrored = Callable[[int, list[int]], Tensor]


@contextlib.contextmanager
def held_out_runner(
    config: CaptionRunConfig, model: CaptionModel, device: torch.device
) -> Iterator[Callable[[Tensor], Tensor]]:
    """The frozen encoder on the runtime that cached the training features (ONNX Runtime on a CPU: ~3x
    eager PyTorch), for the phases after training."""
    runtime = config.train.feature_runtime if device.type == "cpu" else "torch"
    with encoder_runner(model.encoder, runtime, device) as run:
        yield run


def encode_held_out(
    config: CaptionRunConfig,
    model: CaptionModel,
    splits: Splits,
    device: torch.device,
    run: Callable[[Tensor], Tensor] | None = None,
) -> dict[str, Tensor]:
    """The frozen encoder's float32 grids of the test (its first ``train.test_max_images``) and validation
    images, decoded from their files as the served model decodes them, each computed once for every
    phase after training (test, domain, calibration), by ``run`` (default: :func:`held_out_runner`;
    measured on 2 cores the three phases took ~95 s when each ran the eager encoder over its images, the
    test images twice)."""
    cfg = config.train
    with contextlib.ExitStack() as stack:
        if run is None:
            run = stack.enter_context(held_out_runner(config, model, device))
        return {
            name: extract_features(
                model.encoder,
                split,
                batch_size=cfg.feature_batch_size,
                num_workers=cfg.num_workers,
                device=device,
                dtype=torch.float32,
                progress=False,
                run=run,
            )
            for name, split in _held_out_splits(config, splits).items()
        }


def mirrored_grids(
    config: CaptionRunConfig, model: CaptionModel, splits: Splits, run: Callable[[Tensor], Tensor]
) -> dict[str, Mirrored]:
    """Per held-out split, the grids of its images mirrored (:mod:`snap2caption.models.caption.views`),
    encoded by ``run`` when asked: only the images whose first caption is unsure are (about a quarter of
    the starter's; all of them took 40 s more on 2 cores)."""
    cfg = config.train

    def mirrored(paths: list[Path]) -> Mirrored:
        def grids(view: int, rows: list[int]) -> Tensor:
            loader = image_loader([paths[i] for i in rows], model.preprocess, cfg.feature_batch_size, 0)
            return torch.cat([run(flip_pixels(pixels, view)).to("cpu", torch.float32) for pixels in loader])

        return grids

    return {name: mirrored(list(split.paths)) for name, split in _held_out_splits(config, splits).items()}


def _held_out_splits(config: CaptionRunConfig, splits: Splits) -> dict[str, SplitData]:
    test = splits.test.head(config.train.test_max_images) if splits.test is not None else None
    wanted = (("test", test), ("val", splits.val))
    return {name: split for name, split in wanted if split is not None and len(split)}


def test_model(
    config: CaptionRunConfig,
    model: CaptionModel,
    test: SplitData,
    progress: bool | None,
    features: Tensor | None = None,
    mirrored: Mirrored | None = None,
) -> EvalResult:
    """The final model on (the first ``train.test_max_images`` of) the test split, scored by
    ``train.metrics_scorer``: the metrics the registry's gate reads. ``features``: that split's encoder
    grids (:func:`encode_held_out`), else the images are encoded here; ``mirrored``: its mirrored grids
    (:func:`mirrored_grids`), for the model's ``decoding.views``."""
    cfg = config.train
    return evaluate_split(
        model,
        test.head(cfg.test_max_images),
        features=features,
        mirrored=mirrored,
        batch_size=cfg.eval_batch_size,
        num_workers=cfg.num_workers,
        num_beams=cfg.eval_num_beams,
        scorer=cfg.metrics_scorer,
        num_samples=cfg.num_samples,
        progress=progress is True,
    )


def describe_domain(
    config: CaptionRunConfig,
    model: CaptionModel,
    splits: Splits,
    pairs: CaptionPairs,
    val_features: Tensor | None,
    provenance: Provenance,
    tracker: MlflowCallback | None,
    test_features: Tensor | None = None,
) -> DomainModel | None:
    """The final model's training domain (:mod:`snap2caption.models.domain`) in its ``prefix.pooled``
    feature space: fitted on (a seeded sample of at most ``DOMAIN_FIT_MAX_IMAGES``) training images,
    calibrated on the validation split to ``train.domain_false_rejection_rate``, its in-domain rejection rate
    measured on the test split (computed from pixels, as the served model computes it). The counts and
    the rate go into ``domain.json``'s ``extra``, the run summary and MLflow.

    Returns:
        None (with a warning; the artifact then has no domain model) without a validation split large
        enough to calibrate the rate.
    """
    alpha = config.train.domain_false_rejection_rate
    need = min_calibration_images(alpha)
    if splits.val is None or len(splits.val) < need:
        found = len(splits.val) if splits.val is not None else 0
        logger.warning(
            "no domain model: %d validation images cannot calibrate a false-rejection rate of %s (need %d)",
            found,
            alpha,
            need,
        )
        return None
    train = splits.train
    rows = np.arange(len(train))
    if len(rows) > DOMAIN_FIT_MAX_IMAGES:
        rng = np.random.default_rng(config.train.seed)
        rows = np.sort(rng.choice(rows, DOMAIN_FIT_MAX_IMAGES, replace=False))
    was_training = model.training
    model.eval()
    try:
        batch = max(config.train.eval_batch_size, 1)
        if pairs.features is not None:
            fit = _pooled_from_features(model, pairs.features[torch.from_numpy(rows)], batch)
        else:
            fit = _pooled_from_pixels(model, [train.paths[i] for i in rows], batch, config.train.num_workers)
        if val_features is not None:
            calibration = _pooled_from_features(model, val_features, batch)
        else:
            calibration = _pooled_from_pixels(model, splits.val.paths, batch, config.train.num_workers)
        test = None
        if test_features is not None:  # the test images' grids, encoded from their files once
            test = _pooled_from_features(model, test_features[:DOMAIN_FIT_MAX_IMAGES], batch)
        elif splits.test is not None:
            test_paths = splits.test.paths[:DOMAIN_FIT_MAX_IMAGES]
            test = _pooled_from_pixels(model, test_paths, batch, config.train.num_workers)
    finally:
        model.train(was_training)
    domain = fit_domain(fit, calibration, feature=DOMAIN_FEATURE, false_rejection_rate=alpha)
    facts: dict[str, Any] = {
        "dataset_version": provenance.facts.version,
        "fit_split": train.name,
        "calibration_split": splits.val.name,
        "n_fit": int(fit.shape[0]),
        "n_calibration": int(calibration.shape[0]),
        "test_split": splits.test.name if splits.test is not None else None,
        "n_test": int(test.shape[0]) if test is not None else 0,
        "test_rejection_rate": domain.rejection_rate(test) if test is not None else None,
    }
    domain = dataclasses.replace(domain, extra=facts)
    logger.info(
        "domain model: fitted on %d %s images, calibrated on %d %s images (false-rejection rate %s); "
        "test-split rejection rate %s",
        facts["n_fit"],
        train.name,
        facts["n_calibration"],
        splits.val.name,
        alpha,
        facts["test_rejection_rate"],
    )
    if tracker is not None:
        metrics = {
            "domain_n_fit": float(facts["n_fit"]),
            "domain_n_calibration": float(facts["n_calibration"]),
            "domain_false_rejection_rate": alpha,
        }
        if facts["test_rejection_rate"] is not None:
            metrics["domain_test_rejection_rate"] = float(facts["test_rejection_rate"])
        tracker.log_metrics(metrics, 0)
    return domain


# What "right" means for the calibrated caption confidence (stored in calibration.json).
RIGHT = (
    "the (colour, shape) pairs the caption names equal those its references name (pair exact match; "
    "the synthetic benchmark's vocabulary)"
)


def calibrate_confidence(
    config: CaptionRunConfig,
    model: CaptionModel,
    val: SplitData,
    test_split: SplitData | None,
    test: EvalResult | None,
    progress: bool | None,
    val_features: Tensor | None = None,
    mirrored: Mirrored | None = None,
) -> Calibration:
    """Fit the caption confidence's calibration on the validation split; measure its ECE held out.

    The final model captions every validation image from its file (the serving path) with its own decoding
    defaults (what the captioner serves); a caption is right when its (colour, shape) pairs equal the
    references' (:func:`~training.caption.evaluate.pairs_right`). Platt scaling is fitted on all of them and
    the ECE before/after is measured on the test split's captions (already made by the test phase, with the
    same decoding unless ``train.eval_num_beams`` changed it). Without such test captions it is fitted on the
    even-numbered validation images and measured on the odd ones.

    ``val_features``: the validation images' encoder grids from their files (:func:`encode_held_out`);
    ``mirrored``: their mirrored grids (:func:`mirrored_grids`), for the model's ``decoding.views``.
    """
    cfg = config.train
    result = evaluate_split(
        model,
        val,
        features=val_features,
        mirrored=mirrored,
        batch_size=cfg.eval_batch_size,
        num_workers=cfg.num_workers,
        scorer="python",
        metrics=["CIDEr-D"],
        progress=progress is True,
    )
    raw = result.confidences
    right = [pairs_right(refs, result.predictions[i]) for i, refs in val.references().items()]
    served_beams = model.config.decoding.num_beams
    if test is not None and test_split is not None and cfg.eval_num_beams in (0, served_beams):
        references = test_split.head(cfg.test_max_images).references()
        fit_raw, fit_right, fit_split = raw, right, val.name
        eval_raw = test.confidences
        eval_right = [pairs_right(refs, test.predictions[i]) for i, refs in references.items()]
        eval_split = test.split
    else:
        fit_raw, fit_right, fit_split = raw[::2], right[::2], f"{val.name} (even-numbered images)"
        eval_raw, eval_right, eval_split = raw[1::2], right[1::2], f"{val.name} (odd-numbered images)"
    slope, intercept = fit_platt(fit_raw, fit_right)
    fitted = Calibration(slope, intercept, RIGHT, fit_split, len(fit_raw), sum(fit_right))
    if not eval_raw:
        return fitted
    calibration = dataclasses.replace(
        fitted,
        eval_split=eval_split,
        n_eval=len(eval_raw),
        ece_before=expected_calibration_error(eval_raw, eval_right),
        ece_after=expected_calibration_error(fitted.apply(np.asarray(eval_raw)), eval_right),
    )
    logger.info(
        "confidence calibration: slope %.3f intercept %.3f on %d %s captions (%d right); ECE on %d %s "
        "captions %.4f -> %.4f",
        slope, intercept, len(fit_raw), fit_split, sum(fit_right), len(eval_raw), eval_split,
        calibration.ece_before, calibration.ece_after,
    )  # fmt: skip
    return calibration


def calibration_metrics(calibration: Calibration) -> dict[str, float]:
    """The calibration's numbers as MLflow metrics (``calibration_ece_before`` / ``_after`` / ...)."""
    metrics = {
        "calibration_slope": calibration.slope,
        "calibration_intercept": calibration.intercept,
        "calibration_n_fit": float(calibration.n_fit),
    }
    if calibration.ece_before is not None and calibration.ece_after is not None:
        metrics["calibration_ece_before"] = calibration.ece_before
        metrics["calibration_ece_after"] = calibration.ece_after
    return metrics


def save_artifact(
    config: CaptionRunConfig,
    trainer: CaptionTrainer,
    test: EvalResult | None,
    calibration: Calibration | None,
    provenance: Provenance,
    tracker: MlflowCallback | None,
    timings: dict[str, float],
    started: float,
    domain: DomainModel | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Write ``<out>/model``: weights, config and tokenizer, the drift reference, the confidence calibration,
    the domain model (``domain.json`` + ``domain.npz``, when there is one), the model card and the ONNX
    export (what the ``onnx`` runtimes load); ``MANIFEST.json`` covers all of them.

    Returns:
        The artifact folder, and the training facts the model card states.
    """
    model, state = trainer.model, trainer.state
    artifact = Path(config.run.out) / "model"
    shutil.rmtree(artifact, ignore_errors=True)
    training: dict[str, Any] = {
        "steps": state.step,
        "epochs": state.step / trainer.steps_per_epoch,
        "device": str(trainer.device),
        "stop_reason": trainer.stop_reason,
        "best_step": state.best_step if state.best_step >= 0 else state.step,
        "best_val_cider_d": state.best_score if state.best_step >= 0 else float("nan"),
        **timings,
        "total_s": time.monotonic() - started,
    }
    facts = provenance.facts
    record = {
        "git_commit": provenance.commit + (" (dirty)" if provenance.dirty else ""),
        "config_sha256": config.sha256(),
    }
    if tracker is not None and tracker.run_id:
        record["mlflow_run_id"] = tracker.run_id
    save_caption_model(
        model,
        model.tokenizer,
        artifact,
        drift_reference=drift_reference(Path(config.run.data), facts.version, test),
        calibration=calibration,
        extra={
            "preset": config.run.preset,
            "dataset_version": facts.version,
            "git_commit": provenance.commit,
            "training": training,
        },
    )
    card = model_card(
        name=config.run.name,
        config=config.to_dict(),
        preset=config.run.preset,
        data=facts,
        test=test.to_dict() if test else None,
        training=training,
        provenance=record,
        **parameter_counts(model),
        vocab_size=model.tokenizer.vocab_size,
    )
    if domain is not None:
        domain.save(artifact)  # before the model card rewrites the manifest, so the manifest covers it
    write_model_card(artifact, card)
    export_for_serving(artifact)  # ONNX + int8 decoder
    return artifact, training


def register_model(
    config: CaptionRunConfig,
    tracker: MlflowCallback,
    artifact: Path,
    test: EvalResult,
    state: TrainState,
    provenance: Provenance,
) -> ModelVersionInfo:
    """Register the artifact as ``run.name`` (alias ``candidate``) with its test metrics (and the best
    validation CIDEr-D), tagged with the run's provenance."""
    metrics = test.prefixed("test")
    if state.best_step >= 0:
        metrics["val_cider_d"] = state.best_score
    preset = config.run.preset
    registered = tracker.registry.register(
        config.run.name,
        artifact,
        metrics=metrics,
        run_id=tracker.run_id,
        tags={k: v for k, v in provenance.tags.items() if k != "snap2caption.model"},
        description=f"{preset}, {state.step} steps, test CIDEr-D {metrics['test_cider_d']:.3f}",
    )
    tracker.set_tags({"registered_version": str(registered.version)})
    return registered


def write_summary(
    config: CaptionRunConfig,
    trainer: CaptionTrainer,
    test: EvalResult | None,
    calibration: Calibration | None,
    training: dict[str, Any],
    provenance: Provenance,
    tracker: MlflowCallback | None,
    registered: ModelVersionInfo | None,
    timings: dict[str, float],
    domain: DomainModel | None = None,
) -> dict[str, Any]:
    """Write ``metrics.json``, ``samples.json`` and ``config.yaml`` into the run folder.

    Returns:
        What ``metrics.json`` holds.
    """
    out, state, facts = Path(config.run.out), trainer.state, provenance.facts
    summary: dict[str, Any] = {
        "model": str(out / "model"),
        "preset": config.run.preset,
        "steps": state.step,
        "epochs": round(state.step / trainer.steps_per_epoch, 3),
        "stop_reason": trainer.stop_reason,
        "best_step": training["best_step"],
        "val": {
            "cider_d_best": state.best_score if state.best_step >= 0 else None,
            "history": state.evals,
        },
        "test": test.to_dict() if test else None,
        "domain": _domain_summary(domain),
        "calibration": calibration.to_dict() if calibration else None,
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
        "dataset": {"path": facts.data_dir, "version": facts.version, "images": facts.images},
        "git_commit": provenance.commit,
        "mlflow_run_id": tracker.run_id if tracker else None,
        "registered": {"name": config.run.name, "version": registered.version} if registered else None,
    }
    _write_json(out / "metrics.json", summary)
    _write_json(out / "samples.json", test.samples if test else [])
    (out / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False), encoding="utf-8")
    return summary


# ============================================================================================= helpers


def checkpoints_dir(config: CaptionRunConfig) -> Path:
    """``run.checkpoints``, else ``<out>/checkpoints``."""
    run = config.run
    return Path(run.checkpoints) if run.checkpoints else Path(run.out) / "checkpoints"


def parameter_counts(model: CaptionModel) -> dict[str, int]:
    """``n_params`` and ``n_trainable`` (the parameters the optimizer updates)."""
    return {
        "n_params": sum(p.numel() for p in model.parameters()),
        "n_trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


def uses_cached_features(config: CaptionRunConfig) -> bool:
    """Whether the run trains on cached encoder features: a frozen encoder and ``train.feature_cache``."""
    return config.train.feature_cache and config.model.encoder.trainable == "none"


def deadline(config: CaptionRunConfig, started: float) -> float | None:
    """When the loop must stop (``time.monotonic()``): the budget less the reserve for testing and saving."""
    cfg = config.train
    return started + (cfg.time_budget_min - cfg.reserve_min) * 60 if cfg.time_budget_min else None


@contextlib.contextmanager
def timed(timings: dict[str, float], key: str) -> Iterator[None]:
    """Record the seconds the block took as ``timings[key]`` (when it does not raise)."""
    t0 = time.monotonic()
    yield
    timings[key] = time.monotonic() - t0


def check_resume(config: CaptionRunConfig, saved: dict[str, Any]) -> None:
    """A resumed run must train the same model the same way; only RESUMABLE_CHANGES (and ``run``) may
    differ."""
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


def _pooled_from_features(model: CaptionModel, features: Tensor, batch_size: int) -> np.ndarray:
    """``prefix.pooled`` of (N, C, h, w) cached encoder features: the mapping network, no encoder pass."""
    device = next(model.parameters()).device
    out = []
    with torch.inference_mode():
        for start in range(0, features.shape[0], batch_size):
            chunk = features[start : start + batch_size].to(device).float()
            out.append(pooled_prefix(model.encode(features=chunk).float().cpu().numpy()))
    return np.concatenate(out)


def _pooled_from_pixels(
    model: CaptionModel, paths: list[Path], batch_size: int, num_workers: int
) -> np.ndarray:
    """``prefix.pooled`` of image files, decoded and preprocessed as the served model does."""
    device = next(model.parameters()).device
    out = []
    with torch.inference_mode():
        for pixels in image_loader(paths, model.preprocess, batch_size, num_workers):
            out.append(pooled_prefix(model.encode(pixels.to(device)).float().cpu().numpy()))
    return np.concatenate(out)


def _domain_summary(domain: DomainModel | None) -> dict[str, Any] | None:
    """What ``metrics.json`` says about the domain model."""
    if domain is None:
        return None
    info = domain.info()
    keep = (
        "feature",
        "false_rejection_rate",
        "threshold",
        "n_fit",
        "n_calibration",
        "calibration_rejection_rate",
    )
    return {**{k: info[k] for k in keep}, **domain.extra}


def _optional_split(data_dir: Path, name: str) -> SplitData | None:
    return SplitData.load(data_dir, name) if manifest_path(data_dir, name).is_file() else None


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
    path.write_text(json.dumps(data, indent=2, default=float) + "\n", encoding="utf-8")
