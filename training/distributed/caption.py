"""``snap2caption train caption --workers N``: the caption trainer on ``N`` Ray Train workers (DDP).

Each worker runs the same :func:`~training.caption.run.train_caption` as a single process, as one rank of
the process group Ray Train sets up (gloo on CPU, nccl on GPU), through
:class:`~training.distributed.strategy.DDPStrategy`. Rank 0 validates, tracks in MLflow, checkpoints, saves
and registers; its run summary and the Ray node of every rank come back to the driver.

Per worker, an optimizer step trains ``train.batch_size x train.grad_accum`` pairs; the global batch is
that times ``N``. A run on ``N`` workers takes the same steps as one process with ``grad_accum x N``
(``tests/training/distributed/test_caption.py`` checks it).

Ray starts a local instance (sized so the workers fit; no dashboard unless asked) unless ``address``
names a cluster. The paths of the run (data, output, feature cache, checkpoints) are made absolute here:
on a cluster they must name storage every node sees at the same path (NFS, or the same volume mounted in
the training image on every node).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from training.caption.config import CaptionRunConfig

logger = logging.getLogger(__name__)

# Environment the workers need from the driver's (offline switches, the registry, the home folder).
PROPAGATED_ENV_PREFIXES = ("SNAP2CAPTION_", "MLFLOW_", "HF_", "TRANSFORMERS_", "YOLO_", "TOKENIZERS_")


@dataclass
class Scaling:
    """Where and how wide a distributed run is.

    Attributes:
        workers: Ray Train workers, one DDP rank each.
        gpus_per_worker: GPUs per worker (0: train on CPU with gloo; else nccl).
        cpus_per_worker: CPUs Ray reserves per worker.
        address: A Ray cluster to join (``host:port``, ``ray://host:port``, ``auto``); None starts a local
            Ray.
        dashboard: Start Ray's dashboard with a local Ray (off by default: no extra ports).
    """

    workers: int
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    address: str | None = None
    dashboard: bool = False

    def __post_init__(self) -> None:
        if self.workers < 1 or self.gpus_per_worker < 0 or self.cpus_per_worker <= 0:
            raise ValueError(
                f"workers must be >= 1, gpus_per_worker >= 0 and cpus_per_worker > 0, got {self}"
            )


@dataclass
class DistributedResult:
    """What a distributed run produced.

    Attributes:
        summary: Rank 0's ``metrics.json`` (steps, validation, test, timings, registered version...).
        nodes: The Ray node id of each rank, in rank order.
        wall_s: Seconds from connecting to Ray to the end of the run.
    """

    summary: dict[str, Any]
    nodes: list[str]
    wall_s: float


def connect_ray(scaling: Scaling) -> None:
    """Join ``scaling.address``, or start a local Ray large enough for the workers; no usage stats.

    The workers get the driver's offline switches and registry settings (``PROPAGATED_ENV_PREFIXES``).
    """
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return
    env = {k: v for k, v in os.environ.items() if k.startswith(PROPAGATED_ENV_PREFIXES)}
    options: dict[str, Any] = {"runtime_env": {"env_vars": env}, "logging_level": logging.WARNING}
    if scaling.address:
        ray.init(address=scaling.address, **options)
        return
    cores = os.cpu_count() or 1
    needed = scaling.workers * scaling.cpus_per_worker
    if needed > cores:
        logger.warning(
            "%d workers need %g CPUs, this machine has %d: they share them", scaling.workers, needed, cores
        )
    ray.init(num_cpus=max(cores, int(needed + 0.999)), include_dashboard=scaling.dashboard, **options)


def absolute_paths(config: CaptionRunConfig) -> CaptionRunConfig:
    """The config with every path of the run absolute and the tracking URI resolved, as the driver sees
    them: a worker starts in another folder, and maybe on another node with another environment."""
    from snap2caption.registry import default_tracking_uri

    run = config.run
    overrides: list[tuple[str, Any]] = [
        ("run.data", str(Path(run.data).resolve())),
        ("run.out", str(Path(run.out).resolve())),
        ("run.tracking_uri", run.tracking_uri or default_tracking_uri()),
    ]
    for key in ("features", "checkpoints"):
        value = getattr(run, key)
        if value:
            overrides.append((f"run.{key}", str(Path(value).resolve())))
    if run.resume and run.resume != "latest":
        overrides.append(("run.resume", str(Path(run.resume).resolve())))
    return config.with_overrides(overrides)


def train_caption_distributed(config: CaptionRunConfig, scaling: Scaling) -> DistributedResult:
    """Train with ``scaling.workers`` DDP ranks under Ray Train; rank 0 saves, logs and registers.

    Raises:
        ray.train.TrainingFailedError: A worker failed (its error is attached).
    """
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    started = time.monotonic()
    config = absolute_paths(config)
    ours = not ray.is_initialized()
    connect_ray(scaling)
    resources = {"CPU": scaling.cpus_per_worker} | (
        {"GPU": scaling.gpus_per_worker} if scaling.gpus_per_worker else {}
    )
    # Ray Train v2 (Ray's default) hands the driver rank 0's return value; the annotations are v1's (None).
    worker = cast(Callable[[dict[Any, Any]], None], train_worker)
    trainer = TorchTrainer(
        worker,
        train_loop_config={"config": config.to_dict()},
        scaling_config=ScalingConfig(
            num_workers=scaling.workers,
            use_gpu=scaling.gpus_per_worker > 0,
            resources_per_worker=resources,
        ),
        run_config=RunConfig(
            name=f"caption-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=str(Path(config.run.out) / "ray"),
        ),
    )
    try:
        result: Any = trainer.fit()
    finally:
        if ours:
            ray.shutdown()  # stops the local Ray this run started; leaves a cluster, disconnected
    value = result.return_value
    return DistributedResult(value["summary"], value["nodes"], time.monotonic() - started)


def train_worker(loop_config: dict[str, Any]) -> dict[str, Any]:
    """One Ray Train worker: one DDP rank of :func:`train_caption` on this worker's device.

    Returns:
        On every rank, the Ray node of each rank; on rank 0, its run summary too (what Ray Train hands the
        driver as ``Result.return_value``).
    """
    import ray
    import ray.train.torch
    import torch.distributed as dist

    from training.caption.run import train_caption
    from training.distributed.strategy import DDPStrategy

    device = ray.train.torch.get_device()
    config = CaptionRunConfig.from_dict(loop_config["config"]).with_overrides([("train.device", str(device))])
    strategy = DDPStrategy(device)
    nodes: list[Any] = [None] * strategy.world_size
    dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    logger.info(
        "rank %d of %d: node %s, %s", strategy.rank, strategy.world_size, nodes[strategy.rank], device
    )
    result = train_caption(config, progress=False, strategy=strategy)
    return {"summary": result.summary, "nodes": nodes}
