"""The detector training config: where (``run:``) and how to train (``train:``), presets under
``training/configs/detector/``.

``DetectorRunConfig.load("starter", ["epochs=3"])`` reads ``training/configs/detector/starter.yaml`` (or a
path) through the one loader (:func:`snap2caption.config.load_config`), applies ``key=value`` overrides
(with or without the section: ``train.epochs=3``, ``epochs=3``, ``data=data/processed``) and refuses unknown
keys with the nearest valid one. The resolved config is logged to MLflow and saved in the artifact's
``config.json``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from snap2caption.config import ConfigError
from training.config import RunConfig, TrainingConfig


@dataclass(frozen=True)
class DetectorTrainConfig:
    """How to train a YOLO detector on the ETL's output (the ``train:`` section).

    Attributes:
        model: Ultralytics model YAML: ``yolov5nu.yaml``, ``yolov8n.yaml``, ``yolo11n.yaml`` (any scale
            letter) or a path to one. Trained from scratch unless ``pretrained`` is set.
        pretrained: Local COCO weights to fine-tune from: a safetensors state dict or an Ultralytics ``.pt``
            checkpoint (read with ``torch.load(weights_only=True)``, Ultralytics classes only). Tensors whose
            name and shape fit are copied; the class head is re-initialised for this data's classes.
        imgsz: Square network input side; a multiple of 32.
        epochs: Training epochs (fewer when ``time_budget_min`` cannot fit them).
        batch: Images per optimiser step.
        workers: Data loader processes (0: load in the training process).
        cache: Keep decoded, resized training images in RAM.
        optimizer: Ultralytics optimizer name (``auto``, ``SGD``, ``AdamW``, ...).
        lr0: Initial learning rate (``auto`` optimizer picks its own and ignores this).
        nbs: Nominal batch size: gradients accumulate over ``nbs / batch`` batches per optimiser step. Short
            CPU runs see few images, so a smaller ``nbs`` (more, smaller steps) converges faster.
        warmup_epochs: Epochs of learning-rate warm-up (fractions allowed).
        close_mosaic: Last epochs trained without mosaic augmentation.
        mosaic: Mosaic augmentation probability.
        patience: Epochs without improvement before stopping early.
        seed: Random seed.
        deterministic: Ask torch for deterministic algorithms.
        threads: Torch intra-op threads for training.
        time_budget_min: Wall-clock budget for the whole training job (data staging and epochs, not the
            export and test evaluation that follow); when the epochs left cannot fit, the epoch count is cut
            and the learning-rate schedule rebuilt to end on time. 0 = no budget.
        max_train_images: Use only the first N training images (0 = all); for quick runs and tests.
        max_val_images: Same for the validation split used during training.
        max_test_images: Same for the split the registered metrics come from.
        eval_split: Split the registered ``test_map50_95`` is measured on.
        domain_images: Most images per split for the domain model (fitted on the train split, calibrated
            on the validation split, measured on the test split; the first by image id; 0 = all). The
            validation split needs at least ``1 / DEFAULT_FALSE_REJECTION_RATE - 1`` (49) images, else the
            model ships without a domain model (and a warning says so).
        plots: Draw PR curves, confusion matrices and training curves (logged to MLflow).
    """

    model: str = "yolov8n.yaml"
    pretrained: str | None = None
    imgsz: int = 160
    epochs: int = 10
    batch: int = 16
    workers: int = 2
    cache: bool = False
    optimizer: str = "auto"
    lr0: float = 0.01
    nbs: int = 64
    warmup_epochs: float = 3.0
    close_mosaic: int = 10
    mosaic: float = 1.0
    patience: int = 100
    seed: int = 0
    deterministic: bool = True
    threads: int = 2
    time_budget_min: float = 0.0
    max_train_images: int = 0
    max_val_images: int = 0
    max_test_images: int = 0
    eval_split: Literal["train", "val", "test"] = "test"
    domain_images: int = 1000
    plots: bool = True

    def __post_init__(self) -> None:
        problems = []
        if self.imgsz < 32 or self.imgsz % 32:
            problems.append(f"train.imgsz must be a positive multiple of 32, got {self.imgsz}")
        for name in ("epochs", "batch", "threads", "nbs"):
            if getattr(self, name) < 1:
                problems.append(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in (
            "workers",
            "max_train_images",
            "max_val_images",
            "max_test_images",
            "close_mosaic",
            "domain_images",
        ):
            if getattr(self, name) < 0:
                problems.append(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.time_budget_min < 0:
            problems.append(f"train.time_budget_min must be >= 0, got {self.time_budget_min}")
        if problems:
            raise ConfigError(*problems)

    def to_dict(self) -> dict[str, object]:
        """Plain dict (YAML/JSON-safe)."""
        return dataclasses.asdict(self)


@dataclass
class DetectorRun(RunConfig):
    """The ``run:`` section of a detector training run: the settings every trainer has, and its own.

    ``out`` defaults to ``$SNAP2CAPTION_HOME/models/<name>/run-<UTC time>``.

    Attributes:
        promote: After registering, move ``production`` to the new version if it passes the gate (nothing
            without ``register``).
        work_dir: Ultralytics' run folder (None: ``$SNAP2CAPTION_HOME/runs/detector/<MLflow run id>``).
    """

    name: str = "detector"
    promote: bool = False
    work_dir: str | None = None


@dataclass
class DetectorRunConfig(TrainingConfig):
    """A whole detector training run: where, and how to train.

    Attributes:
        run: Where the run reads and writes, and the names it is tracked and registered under.
        train: The training settings (the network included).
    """

    PRESETS: ClassVar[str] = "detector"  # tiny, starter

    run: DetectorRun = field(default_factory=DetectorRun)
    train: DetectorTrainConfig = field(default_factory=DetectorTrainConfig)
