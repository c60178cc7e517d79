"""The caption training loop: AdamW, warmup + cosine, gradient accumulation, mixed precision, clipping.

Read :meth:`CaptionTrainer.fit` top to bottom; everything else (progress bar, MLflow, checkpoints, early
stopping) hooks in through :mod:`training.callbacks`.

Determinism: the data order of epoch ``e`` is a function of ``(seed, e)`` alone, DataLoaders never draw
from the global RNG, and a checkpoint holds the weights, the optimizer and scaler state, the global RNG
state (dropout) and the counters. So a run resumed from step ``s`` takes exactly the steps an uninterrupted
run takes after ``s`` (with ``time_budget_min`` = 0; a time budget makes the stopping step and the schedule
depend on the machine's speed).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from snap2caption.models.caption.model import CaptionModel
from training.callbacks.base import Callback, CallbackList
from training.caption.config import CaptionRunConfig, Precision, TrainConfig
from training.caption.data import (
    CaptionBatch,
    CaptionCollator,
    CaptionPairs,
    SplitData,
    epoch_batches,
    pair_loader,
)
from training.caption.evaluate import EvalResult, evaluate_split
from training.distributed.strategy import SingleProcess

logger = logging.getLogger(__name__)

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; anything else as given (checked to exist)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={name} but CUDA is not available")
    return device


def auto_threads() -> int:
    """Intra-op threads for this machine now: the cores the 1-minute load average leaves idle, at least 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    idle = cores - os.getloadavg()[0]
    return max(1, min(cores, round(idle)))


def native_bf16(device: torch.device, cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether ``device`` computes bf16 in hardware: a CUDA GPU that supports it, or an x86 CPU whose flags
    (``/proc/cpuinfo``) list AMX-BF16 or AVX512-BF16; elsewhere bf16 autocast is emulated and slower."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type != "cpu":
        return False
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    lines = (line for line in text.splitlines() if line.startswith("flags"))
    flags = set(next(lines, ":").split(":", 1)[1].split())
    return bool({"amx_bf16", "avx512_bf16"} & flags)


def resolve_precision(precision: Precision, device: torch.device) -> Precision:
    """``train.precision`` as it will run: ``auto`` becomes bf16 on native bf16 hardware, else fp32."""
    if precision != "auto":
        return precision
    return "bf16" if native_bf16(device) else "fp32"


def check_precision(precision: str, device: torch.device) -> None:
    """fp16 needs CUDA (a grad scaler on CPU is pointless and CPU fp16 kernels are slow or missing)."""
    if precision == "fp16" and device.type != "cuda":
        raise RuntimeError("train.precision=fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise RuntimeError("this GPU has no bf16 support; use train.precision=fp16")


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; matrices decay, vectors (biases, norms) do not (nanoGPT)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, cfg.beta2))


def learning_rate(cfg: TrainConfig, step: int, total_steps: int, time_fraction: float = 0.0) -> float:
    """Linear warmup to ``lr``, then cosine decay to ``lr * min_lr_ratio``.

    Args:
        cfg: The training config.
        step: Optimizer steps taken so far (0 for the first step).
        total_steps: Length of the schedule in steps.
        time_fraction: Share of the time budget used; the decay follows whichever of step and time progress
            is further along (0 without a budget).
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, max((step - cfg.warmup_steps) / span, time_fraction))
    min_lr = cfg.lr * cfg.min_lr_ratio
    return min_lr + 0.5 * (cfg.lr - min_lr) * (1.0 + math.cos(math.pi * progress))


@dataclass
class TrainState:
    """The counters a checkpoint restores (plain data: ints, floats, lists).

    Attributes:
        step: Optimizer steps taken.
        elapsed_s: Seconds spent in the loop (all processes of a resumed run together).
        best_score: Best validation CIDEr-D so far (-inf before the first evaluation).
        best_step: Step of the best score (-1 before).
        evals: ``[step, val CIDEr-D]`` of every validation, in order.
    """

    step: int = 0
    elapsed_s: float = 0.0
    best_score: float = -math.inf
    best_step: int = -1
    evals: list[list[float]] = field(default_factory=list)

    @property
    def evals_since_best(self) -> int:
        """Validations after the best one (what early stopping counts)."""
        return sum(1 for step, _ in self.evals if step > self.best_step)


class CaptionTrainer:
    """Trains a :class:`CaptionModel` on (image, caption) pairs.

    Args:
        config: The run config (``config.train`` drives the loop).
        model: The model, already on ``device``.
        train_pairs: Training pairs (features or pixels).
        val: Validation split (None: no validation; the last weights are kept).
        val_features: (N, C, h, w) features of ``val`` when training on cached features.
        device: Where to train.
        callbacks: Integrations (progress, MLflow, checkpoints, early stopping).
        deadline: ``time.monotonic()`` value by which the loop must stop (None: no budget).
        strategy: One process (default) or one rank of a DDP group
            (:mod:`training.distributed.strategy`); each optimizer step then trains on
            ``batch_size x grad_accum x world_size`` pairs, this process's share being
            ``batch_size x grad_accum``.
    """

    def __init__(
        self,
        config: CaptionRunConfig,
        model: CaptionModel,
        train_pairs: CaptionPairs,
        *,
        val: SplitData | None,
        val_features: Tensor | None = None,
        device: torch.device,
        callbacks: CallbackList | list[Callback] | None = None,
        deadline: float | None = None,
        strategy: SingleProcess | None = None,
    ) -> None:
        self.config = config
        self.cfg = config.train
        self.model = model
        self.tokenizer = model.tokenizer
        self.device = device
        self.precision = resolve_precision(self.cfg.precision, device)
        check_precision(self.precision, device)
        self.train_pairs = train_pairs
        self.collate = CaptionCollator(
            self.tokenizer,
            config.model.tokenizer.max_caption_tokens,
            is_features=train_pairs.features is not None,
        )
        self.val = val.head(self.cfg.eval_max_images) if val is not None else None
        self.val_features = val_features[: len(self.val)] if val_features is not None and self.val else None
        self.callbacks = callbacks if isinstance(callbacks, CallbackList) else CallbackList(callbacks or [])
        self.deadline = deadline
        self.strategy = strategy or SingleProcess()
        self.forward_module = self.strategy.wrap(model)  # what the training step calls (DDP across ranks)
        self.global_batch = self.cfg.effective_batch * self.strategy.world_size
        self.optimizer = build_optimizer(model, self.cfg)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision == "fp16")
        self.steps_per_epoch = len(train_pairs) // self.global_batch
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"{len(train_pairs)} training pairs cannot fill one batch of {self.global_batch} "
                "(train.batch_size x train.grad_accum x workers)"
            )
        self.total_steps = self.cfg.max_steps or self.cfg.epochs * self.steps_per_epoch
        self.state = TrainState()
        self.best_weights: dict[str, Tensor] | None = None
        self.stop_reason = ""
        self._fit_started = 0.0
        self._elapsed_before = 0.0
        self._start_step = 0

    # ------------------------------------------------------------------------------------ the loop

    def fit(self) -> TrainState:
        """Train until ``total_steps``, the time budget, or early stopping; then keep the best weights.

        Returns:
            The final counters (best validation score and step included).
        """
        cfg = self.cfg
        self._fit_started = time.monotonic()
        self._elapsed_before = self.state.elapsed_s
        self._start_step = self.state.step
        self.callbacks.on_train_start(self)
        while not self.stop_reason and self.state.step < self.total_steps:
            epoch, offset = divmod(self.state.step, self.steps_per_epoch)
            batches = epoch_batches(len(self.train_pairs), self.global_batch, cfg.seed, epoch)[offset:]
            mine = self.strategy.shard(batches)
            micro_batches = iter(
                pair_loader(self.train_pairs, self.collate, mine, cfg.batch_size, cfg.num_workers)
            )
            for _ in batches:
                if self._out_of_time():
                    self.stop(f"time budget of {cfg.time_budget_min} min reached")
                if self._stopping():
                    break
                logs = self.train_step([next(micro_batches) for _ in range(cfg.grad_accum)])
                self.state.step += 1
                self.state.elapsed_s = self._elapsed_before + time.monotonic() - self._fit_started
                logs["epoch"] = self.state.step / self.steps_per_epoch
                if self.val is not None and cfg.eval_every and self.state.step % cfg.eval_every == 0:
                    self.validate()
                self.callbacks.on_step_end(self, logs)
                if self._stopping() or self.state.step >= self.total_steps:
                    break
        if not self.stop_reason:
            self.stop_reason = f"{self.total_steps} steps done"
        if self.val is not None and (not self.state.evals or self.state.evals[-1][0] != self.state.step):
            self.validate()  # the last weights compete too
        logger.info("training stopped at step %d: %s", self.state.step, self.stop_reason)
        self.callbacks.on_train_end(self)
        if self.best_weights is not None and self.state.best_step != self.state.step:
            logger.info(
                "restoring the best weights: step %d, val CIDEr-D %.4f",
                self.state.best_step,
                self.state.best_score,
            )
            self.model.load_state_dict(self.best_weights)
        return self.state

    def train_step(self, micro_batches: list[CaptionBatch]) -> dict[str, float]:
        """One optimizer step over ``grad_accum`` micro-batches.

        Each micro-batch's mean token loss is weighted by its share of the effective batch's target tokens,
        so the summed gradient is that of the mean over every target token of the effective batch: the same
        update as one big batch.

        Returns:
            ``loss`` (token mean over the effective batch), ``lr``, ``grad_norm``, ``images_per_s``.
        """
        started = time.perf_counter()
        self.model.train()
        strategy = self.strategy
        # Target tokens of the global batch (every rank's micro-batches); DDP averages the ranks'
        # gradients, so each rank's loss is scaled by world_size to make that average a sum.
        n_targets = int(strategy.all_sum(torch.tensor(sum(b.n_targets for b in micro_batches))))
        total = torch.zeros((), device=self.device)
        for i, batch in enumerate(micro_batches):
            batch = batch.to(self.device)
            with strategy.accumulating(self.forward_module, last=i == len(micro_batches) - 1):
                with self.autocast():
                    inputs: dict[str, Any] = (
                        {"features": batch.images} if batch.is_features else {"pixels": batch.images}
                    )
                    if batch.attention_targets is not None and self.cfg.attention_supervision:
                        inputs["attention_targets"] = batch.attention_targets
                        inputs["attention_layer"] = self.cfg.attention_layer
                    out = self.forward_module(batch.input_ids, batch.attention_mask, **inputs)
                assert out.loss is not None
                loss = out.loss
                if out.attention_loss is not None:
                    loss = loss + self.cfg.attention_supervision * out.attention_loss
                loss = loss * (batch.n_targets / n_targets)
                self.scaler.scale(loss * strategy.world_size).backward()
            total += loss.detach()
        total = strategy.all_sum(total)
        time_fraction = strategy.from_main(self.time_fraction())  # rank 0's clock sets every rank's lr
        lr = learning_rate(self.cfg, self.state.step, self.total_steps, time_fraction)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        grad_norm = math.nan
        if self.cfg.clip_grad_norm:
            self.scaler.unscale_(self.optimizer)
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.clip_grad_norm))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        n_images = sum(b.input_ids.shape[0] for b in micro_batches) * strategy.world_size
        return {
            "loss": float(total),
            "lr": lr,
            "grad_norm": grad_norm,
            "images_per_s": n_images / max(time.perf_counter() - started, 1e-9),
        }

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """bf16/fp16 autocast on the training device, or nothing for fp32."""
        dtype = AUTOCAST_DTYPES.get(self.precision)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def validate(self) -> EvalResult:
        """Caption the validation images, score CIDEr-D (Python scorer) and track the best weights."""
        assert self.val is not None
        result = evaluate_split(
            self.model,
            self.val,
            features=self.val_features,
            batch_size=self.cfg.eval_batch_size,
            num_workers=self.cfg.num_workers,
            num_beams=self.cfg.eval_num_beams,
            scorer="python",
            metrics=["CIDEr-D"],
        )
        score = result.metrics["cider_d"]
        self.state.evals.append([self.state.step, score])
        if score > self.state.best_score:
            self.state.best_score, self.state.best_step = score, self.state.step
            self.best_weights = {
                k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()
            }
        self.callbacks.on_eval_end(self, result)
        return result

    def stop(self, reason: str) -> None:
        """Ask the loop to stop after the current step (callbacks call this)."""
        if not self.stop_reason:
            self.stop_reason = reason

    def _stopping(self) -> bool:
        """Whether the loop stops now: on every rank as soon as one rank stops (rank 0 holds the clock and
        the validation), so that no rank waits for a step the others never take."""
        if self.strategy.any_rank(bool(self.stop_reason)) and not self.stop_reason:
            self.stop("stopped with the other ranks")
        return bool(self.stop_reason)

    # ------------------------------------------------------------------------------------ the clock

    def _out_of_time(self) -> bool:
        """Whether one more step (at the mean pace so far) would cross the deadline."""
        if self.deadline is None:
            return False
        now = time.monotonic()
        steps_here = self.state.step - self._start_step
        pace = (now - self._fit_started) / steps_here if steps_here > 0 else 0.0
        return now + pace >= self.deadline

    def time_fraction(self) -> float:
        """Share of the training time budget used (0 without a deadline)."""
        if self.deadline is None:
            return 0.0
        available = self._elapsed_before + self.deadline - self._fit_started
        used = self._elapsed_before + time.monotonic() - self._fit_started
        return min(1.0, used / available) if available > 0 else 1.0

    # ------------------------------------------------------------------------------- checkpointing

    def state_dict(self) -> dict[str, Any]:
        """Everything but the weights that a resume needs; only tensors and plain data (``weights_only``)."""
        state: dict[str, Any] = {
            "train_state": asdict(self.state),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "callbacks": self.callbacks.state_dict(),
            "config": self.config.to_dict(),
        }
        if self.device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_state_dict(self, state: dict[str, Any], best_weights: dict[str, Tensor] | None) -> None:
        """Restore :meth:`state_dict` output (the weights are loaded separately)."""
        self.state = TrainState(**state["train_state"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng_cpu"])
        if "rng_cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng_cuda"], self.device)
        self.callbacks.load_state_dict(state.get("callbacks", {}))
        self.best_weights = best_weights
