"""How the caption trainer runs: in one process, or as one rank of a DDP group.

:class:`CaptionTrainer` asks its strategy the few things that differ between the two (which part of each
global batch this process trains on, how its gradients are summed, when every rank must agree) and reads the
same either way. :class:`SingleProcess` answers them as the plain loop always did; :class:`DDPStrategy`
answers them inside a ``torch.distributed`` process group (the one Ray Train sets up: gloo on CPU, nccl on
GPU). Neither imports Ray, so the trainer does not either.

Why a run on ``N`` ranks takes the same steps as one process with ``N`` times the gradient accumulation:

- every rank draws the same global batches of ``batch_size x grad_accum x N`` pairs (a permutation fixed by
  ``(seed, epoch)``) and trains on its own contiguous slice of each, so rank ``r``'s micro-batches are the
  single process's micro-batches ``r*k .. r*k+k-1`` (``k = grad_accum``);
- each micro-batch's loss is weighted by its share of the *global* batch's target tokens (summed over the
  ranks first) and multiplied by ``N``, which undoes DDP's mean over the ranks: the gradient is that of the
  token mean over the global batch, as in one process;
- DDP starts every rank from rank 0's weights and all-reduces the gradients, so every rank takes the same
  optimizer step; only the order of the floating-point sums differs.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)


class SingleProcess:
    """The plain loop in one process: every answer is the identity.

    Attributes:
        rank: This process's rank (0).
        world_size: Processes training together (1).
    """

    rank = 0
    world_size = 1

    @property
    def is_main(self) -> bool:
        """Whether this process validates, tests, logs, checkpoints, saves and registers (rank 0)."""
        return self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module the training step calls forward on (``model`` itself here)."""
        return model

    def shard(self, batches: Sequence[Sequence[int]]) -> list[list[int]]:
        """This process's part of each global batch: all of it."""
        return [list(b) for b in batches]

    def accumulating(self, module: nn.Module, last: bool) -> contextlib.AbstractContextManager[Any]:
        """Around a micro-batch's forward and backward; ``last``: the optimizer step's last micro-batch."""
        return contextlib.nullcontext()

    def all_sum(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` summed over the ranks."""
        return value

    def any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any rank."""
        return flag

    def from_main(self, value: float) -> float:
        """Rank 0's ``value`` (so that every rank follows one clock)."""
        return value

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block before the other ranks do (e.g. fills a cache they then read)."""
        yield

    def seed_rank(self, seed: int, step: int) -> None:
        """Give this rank its own dropout stream; rank 0 keeps the global RNG as one process would."""

    def describe(self) -> dict[str, Any]:
        """What MLflow records about the parallelism (nothing in one process: its params stay as before)."""
        return {}


class DDPStrategy(SingleProcess):
    """One rank of a ``torch.distributed`` group (initialised already, e.g. by Ray Train).

    Args:
        device: This rank's training device (for the flags sent through nccl, which only moves CUDA tensors).
    """

    def __init__(self, device: torch.device) -> None:
        import torch.distributed as dist

        if not dist.is_initialized():
            raise RuntimeError("DDPStrategy needs an initialised torch.distributed process group")
        self.dist = dist
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.device = device

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` in :class:`~torch.nn.parallel.DistributedDataParallel`; it broadcasts rank 0's weights.

        ``broadcast_buffers=False``: BatchNorm statistics are not trained by gradients; each rank keeps its
        own running statistics and rank 0's are the ones saved (a frozen encoder has none that change).
        """
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.device.index or 0] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)

    def shard(self, batches: Sequence[Sequence[int]]) -> list[list[int]]:
        """The ``rank``-th of ``world_size`` contiguous slices of each global batch (equal sizes: the global
        batch is ``world_size`` times the per-rank one)."""
        shards = []
        for batch in batches:
            size = len(batch) // self.world_size
            shards.append(list(batch[self.rank * size : (self.rank + 1) * size]))
        return shards

    def accumulating(self, module: nn.Module, last: bool) -> contextlib.AbstractContextManager[Any]:
        """DDP's ``no_sync`` on every micro-batch but the last: one all-reduce per optimizer step."""
        if last:
            return contextlib.nullcontext()
        no_sync: contextlib.AbstractContextManager[Any] = module.no_sync()  # type: ignore[operator]
        return no_sync

    def all_sum(self, value: torch.Tensor) -> torch.Tensor:
        summed = value.detach().to(self.device, dtype=torch.float64).clone()
        self.dist.all_reduce(summed, op=self.dist.ReduceOp.SUM)
        return summed.to(value.device, dtype=value.dtype)

    def any_rank(self, flag: bool) -> bool:
        value = torch.tensor(float(flag), device=self.device)
        self.dist.all_reduce(value, op=self.dist.ReduceOp.MAX)
        return bool(value.item())

    def from_main(self, value: float) -> float:
        tensor = torch.tensor(value, dtype=torch.float64, device=self.device)
        self.dist.broadcast(tensor, src=0)
        return float(tensor.item())

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        if not self.is_main:
            self.dist.barrier()
        yield
        if self.is_main:
            self.dist.barrier()

    def seed_rank(self, seed: int, step: int) -> None:
        """Every rank starts from the same seed (one model init); left so, their dropout masks would be
        the same on every rank. A rank other than 0 reseeds from ``(seed, rank, step)``, also on resume
        (a checkpoint holds rank 0's RNG state only)."""
        if not self.is_main:
            torch.manual_seed(seed * 1_000_003 + self.rank * 10_007 + step)

    def describe(self) -> dict[str, Any]:
        return {
            "distributed": {
                "world_size": self.world_size,
                "backend": self.dist.get_backend(),
                "device": self.device.type,
            }
        }
