"""Typed config of a caption training run: where (``run:``), the model (``model:``), how to train it
(``train:``).

One YAML per preset under ``training/configs/caption/`` (``tiny``, ``starter``, ``paper``) holds the sections,
loaded by the one loader (:func:`snap2caption.config.load_config`). ``key=value`` overrides take dotted keys,
with or without the section (``train.lr=3e-4``, ``lr=3e-4``, ``model.decoder.n_layer=2``,
``decoder.n_layer=2``, ``run.out=runs/big``); unknown keys are refused with the nearest valid key suggested.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from snap2caption.config import ConfigError, from_dict
from snap2caption.models.caption.config import CaptionConfig
from snap2caption.models.domain import DEFAULT_FALSE_REJECTION_RATE
from training.config import RunConfig, TrainingConfig

Precision = Literal["fp32", "bf16", "fp16", "auto"]


@dataclass
class TrainConfig:
    """How to train a caption model (the ``train:`` section of a preset).

    Attributes:
        batch_size: (image, caption) pairs per forward pass (one micro-batch).
        grad_accum: Micro-batches per optimizer step; the effective batch is ``batch_size * grad_accum``.
            The loss is the mean over the caption tokens of the whole effective batch, so ``k`` micro-batches
            of ``b`` give the same update as one batch of ``k * b``.
        lr: Peak learning rate (AdamW).
        min_lr_ratio: The cosine schedule decays to ``lr * min_lr_ratio``.
        weight_decay: AdamW weight decay, applied to matrices only (not to biases, LayerNorm or embeddings).
        beta2: AdamW's second-moment decay (beta1 is 0.9).
        warmup_steps: Linear warmup from 0 to ``lr`` over this many optimizer steps.
        epochs: Passes over the training pairs (the schedule's length unless ``max_steps`` is set).
        max_steps: Optimizer steps; 0 = ``epochs`` decide.
        time_budget_min: Wall-clock budget of the whole run in minutes, feature extraction included
            (0 = none). Training stops before the step that would overrun it, leaving ``reserve_min`` for
            the final evaluation and saving; the cosine schedule then anneals to the deadline (whichever of
            step and time progress is further), so a budgeted run ends at a low learning rate. A budget makes
            the stopping step depend on the machine's speed: reproducibility tests use ``max_steps``.
        reserve_min: Minutes of the budget kept for the final validation/test evaluation and the artifact.
        precision: ``fp32``; ``bf16`` autocast (CUDA or CPU); ``fp16`` autocast with a gradient scaler
            (CUDA only); ``auto``: bf16 where the device computes it natively (a CUDA GPU with bf16, or a
            CPU with AMX or AVX512-BF16; measured on this project's 2-core Xeon: 1.57x the starter's
            training steps per second at one thread), else fp32. The run resolves it before training and
            records the precision it used.
        clip_grad_norm: Clip the global gradient norm to this; 0 disables clipping.
        checkpoint_every: Save a resumable checkpoint every this many optimizer steps (0 = only the last).
        keep_checkpoints: How many checkpoints to keep (oldest deleted first).
        eval_every: Score validation CIDEr-D every this many optimizer steps (0 = only at the end).
        patience: Stop after this many validation scores without a new best (0 = never stop early). The
            best-scoring weights are what the run saves, whether or not it stopped early.
        seed: Seeds the weights, the data order and dropout; same seed, same run.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``.
        threads: Torch intra-op threads; 0 = the cores the load average leaves idle (at least 1). On a
            shared machine two threads fighting other processes for two cores run slower than one: OpenMP
            barriers wait for a descheduled thread (measured here: a starter step 3.2 s on 1 thread, 6.1 s
            on 2, at load average 3 on 2 cores).
        num_workers: DataLoader worker processes that decode images (pixel path and feature extraction).
        feature_cache: With a frozen encoder, compute encoder features once per split and train on them
            (cached as safetensors, keyed by encoder weights, preprocessing and manifest hash).
        feature_dtype: How cached features are stored.
        feature_batch_size: Images per encoder pass while extracting features.
        feature_runtime: What runs the frozen encoder over the images on a CPU: ``torch``, or
            ``onnxruntime`` (exported on the fly; about 3x faster for EfficientNet-Lite0 on a CPU).
        captions_per_image: Reference captions per image used as training pairs (0 = all of them).
        eval_max_images: Validation images scored at each evaluation (0 = all).
        eval_batch_size: Images per batch when captioning for evaluation.
        eval_num_beams: Beams when captioning for evaluation (0 = the model's ``decoding.num_beams``).
        metrics_scorer: Scorer of the final test metrics (``auto``: pycocoevalcap with METEOR when Java
            runs, else the pure-Python scorers without METEOR). In-training validation always uses the
            Python scorers (CIDEr-D only, no JVM).
        test_max_images: Test images scored at the end (0 = all).
        num_samples: Image/reference/prediction triples kept with the metrics.
        log_every: Log training metrics (loss, learning rate, images/s) every this many optimizer steps.
        attention_supervision: Weight of the attention loss (0 = off): while a caption's phrase is written,
            head 0 of decoder layer ``attention_layer`` is trained to look at the prefix cells of the boxes
            the phrase names (:mod:`training.caption.attention`; the ETL's boxes; the ``mlp`` mapping).
            Training only: the model and its export are unchanged.
        attention_layer: The decoder layer (from 0) whose head 0 is supervised.
        phrase_order: With attention supervision, the order of a training caption's phrases: ``written``
            (as the data has them; the synthetic benchmark's by each object's x), or ``prefix``: the order the
            column-major prefix visits their boxes (column, then row; :func:`training.caption.attention.
            prefix_order`), so the next object named is always the next one down the prefix.
        domain_false_rejection_rate: The share of in-domain images the model's domain check may reject
            (``alpha`` of :mod:`snap2caption.models.domain`): its threshold is calibrated on the validation
            split, which needs at least ``ceil(1 / alpha) - 1`` images (else the artifact has no domain
            model). Lower rejects fewer in-domain images and lets images nearer the domain through.
    """

    batch_size: int = 64
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    beta2: float = 0.99
    warmup_steps: int = 50
    epochs: int = 10
    max_steps: int = 0
    time_budget_min: float = 0.0
    reserve_min: float = 0.5
    precision: Precision = "fp32"
    clip_grad_norm: float = 1.0
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    eval_every: int = 0
    patience: int = 0
    seed: int = 0
    device: str = "auto"
    threads: int = 0
    num_workers: int = 0
    feature_cache: bool = True
    feature_dtype: Literal["float16", "float32"] = "float16"
    feature_batch_size: int = 64
    feature_runtime: Literal["torch", "onnxruntime"] = "torch"
    captions_per_image: int = 0
    eval_max_images: int = 200
    eval_batch_size: int = 100
    eval_num_beams: int = 0
    metrics_scorer: Literal["auto", "python", "pycocoevalcap"] = "auto"
    test_max_images: int = 0
    num_samples: int = 20
    log_every: int = 10
    attention_supervision: float = 0.0
    attention_layer: int = 1
    phrase_order: Literal["written", "prefix"] = "written"
    domain_false_rejection_rate: float = DEFAULT_FALSE_REJECTION_RATE

    def __post_init__(self) -> None:
        problems = []
        positive = (
            "batch_size",
            "grad_accum",
            "epochs",
            "eval_batch_size",
            "feature_batch_size",
            "log_every",
        )
        for name in positive:
            if getattr(self, name) < 1:
                problems.append(f"train.{name} must be >= 1, got {getattr(self, name)}")
        non_negative = (
            "max_steps", "warmup_steps", "checkpoint_every", "eval_every", "patience", "seed", "threads",
            "num_workers", "captions_per_image", "eval_max_images", "eval_num_beams", "test_max_images",
            "num_samples", "time_budget_min", "reserve_min", "clip_grad_norm", "weight_decay",
            "attention_supervision", "attention_layer",
        )  # fmt: skip
        for name in non_negative:
            if getattr(self, name) < 0:
                problems.append(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.keep_checkpoints < 1:
            problems.append(f"train.keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        if not self.lr > 0 or not 0 <= self.min_lr_ratio <= 1 or not 0 < self.beta2 < 1:
            problems.append("train.lr must be > 0, train.min_lr_ratio in [0, 1], train.beta2 in (0, 1)")
        alpha = self.domain_false_rejection_rate
        if not 0 < alpha < 0.5:
            problems.append(f"train.domain_false_rejection_rate must be in (0, 0.5), got {alpha}")
        if self.time_budget_min and self.reserve_min >= self.time_budget_min:
            problems.append("train.reserve_min must be below train.time_budget_min")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            problems.append(f"train.device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if problems:
            raise ConfigError("invalid train config: " + "; ".join(problems))

    @property
    def effective_batch(self) -> int:
        """Pairs per optimizer step."""
        return self.batch_size * self.grad_accum


@dataclass
class CaptionRun(RunConfig):
    """The ``run:`` section of a caption training run: the settings every trainer has, and its own.

    Attributes:
        features: Feature cache folder (None: ``<out>/features``); used when the encoder is frozen and
            ``train.feature_cache`` is on.
        checkpoints: Where checkpoints go (None: ``<out>/checkpoints``); a fresh run empties it.
        resume: A checkpoint folder, or ``latest`` for the newest one under ``checkpoints``; None: a fresh
            run.
        mlflow: Log the run to MLflow (registering needs it: the registry stores the files in the run).
    """

    out: str = "runs/caption"
    name: str = "captioner"
    features: str | None = None
    checkpoints: str | None = None
    resume: str | None = None
    mlflow: bool = True

    def problems(self) -> list[str]:
        """What is wrong with these values (empty when nothing is)."""
        problems = super().problems()
        if self.register and not self.mlflow:
            problems.append("run.register needs run.mlflow (the registry stores the files in the run)")
        return problems


@dataclass
class CaptionRunConfig(TrainingConfig):
    """A whole training run: where, what model, and how to train it. Stored with checkpoints and artifacts.

    Attributes:
        run: Where the run reads and writes, and the names it is tracked and registered under.
        model: The model (architecture, tokenizer, decoding defaults).
        train: The training settings.
    """

    PRESETS: ClassVar[str] = "caption"  # tiny, starter, paper

    run: CaptionRun = field(default_factory=CaptionRun)
    model: CaptionConfig = field(default_factory=CaptionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CaptionRunConfig:
        """Build from ``{"run": {...}, "model": {...}, "train": {...}}``; unknown keys are refused."""
        return from_dict(cls, data)

    def sha256(self) -> str:
        """Hash of what trains the model (``model`` and ``train``, sorted JSON), to tag runs and compare
        checkpoints; ``run`` (paths and names) is left out, so the same training hashes the same anywhere."""
        trained = {key: value for key, value in self.to_dict().items() if key != "run"}
        text = json.dumps(trained, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()
