"""Distributed caption training under Ray Train: 2 CPU workers (DDP over gloo) against one process.

The two runs take the same optimizer steps by construction (:mod:`training.distributed.strategy`): the same
global batches (4 pairs x 2 accumulation x 2 workers = 16 = 4 x 4 accumulation in one process), the same
micro-batches, the same loss weights; dropout is 0 in the tiny preset and the encoder is frozen (cached
features), so nothing random differs. What may differ is the order of floating-point sums: DDP adds the two
ranks' gradients ((g1+g2)+(g3+g4)) where one process accumulates g1+g2+g3+g4 in turn, and the loss is summed
over the ranks the same way. Float32 rounding is ~6e-8 relative per addition; over 6 AdamW steps (whose
update divides by sqrt(v), so it can carry a relative error of the gradient into the weights) the weights
measured here differ by at most 4e-6; the bounds below (1e-4 on weights, 1e-5 relative on the loss) leave
a 25x margin for other CPUs and BLAS builds while a single wrong step (a different batch, a loss
weighted twice, a rank training alone) moves the weights by ~1e-2 at this learning rate.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient
from safetensors.torch import load_file

from snap2caption.registry import Registry
from tests.training.caption.conftest import caption_data, registry, tiny_run  # noqa: F401 (fixtures)
from training.caption.run import train_caption
from training.distributed.caption import Scaling, train_caption_distributed

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),
]

# Frozen tiny encoder (cached features), 6 steps, validation every 3: the path the starter model trains on.
SETTINGS = ("model.encoder.trainable=none", "max_steps=6", "eval_every=3", "batch_size=4", "threads=1")
WEIGHT_TOLERANCE = 1e-4
LOSS_RELATIVE_TOLERANCE = 1e-5


def _losses(client: MlflowClient, run_id: str) -> list[float]:
    history = client.get_metric_history(run_id, "train_loss")
    return [m.value for m in sorted(history, key=lambda m: m.step)]


def test_two_workers_train_what_one_process_trains_with_the_same_global_batch(
    caption_data: Path,  # noqa: F811
    registry: Registry,  # noqa: F811
    tmp_path: Path,
) -> None:
    one = train_caption(tiny_run(caption_data, tmp_path / "one", *SETTINGS, "grad_accum=4"), progress=False)
    two = train_caption_distributed(
        tiny_run(caption_data, tmp_path / "two", *SETTINGS, "grad_accum=2"), Scaling(workers=2)
    )
    s1, s2 = one.summary, two.summary

    # The same steps, stopping for the same reason; validated at the same steps with the same scores.
    assert s2["steps"] == s1["steps"] == 6
    assert s2["stop_reason"] == s1["stop_reason"]
    assert [step for step, _ in s2["val"]["history"]] == [3, 6]
    for (_, a), (_, b) in zip(s1["val"]["history"], s2["val"]["history"], strict=True):
        assert b == pytest.approx(a, abs=1e-6)
    assert s2["test"]["metrics"]["cider_d"] == pytest.approx(s1["test"]["metrics"]["cider_d"], abs=1e-6)

    # The same weights, within float32 summation-order noise.
    w1 = load_file(str(tmp_path / "one" / "model" / "model.safetensors"))
    w2 = load_file(str(tmp_path / "two" / "model" / "model.safetensors"))
    assert w1.keys() == w2.keys()
    worst = max(float((w1[k].float() - w2[k].float()).abs().max()) for k in w1)
    assert worst < WEIGHT_TOLERANCE, f"weights differ by {worst}"

    # MLflow: one run per training (rank 0's), the same per-step loss; one registered version each.
    client = MlflowClient(registry.tracking_uri)
    assert s2["mlflow_run_id"] != s1["mlflow_run_id"]
    l1, l2 = _losses(client, s1["mlflow_run_id"]), _losses(client, s2["mlflow_run_id"])
    assert len(l1) == len(l2) == 6
    assert l2 == pytest.approx(l1, rel=LOSS_RELATIVE_TOLERANCE)
    runs = client.search_runs([client.get_run(s2["mlflow_run_id"]).info.experiment_id])
    assert len(runs) == 2
    params = client.get_run(s2["mlflow_run_id"]).data.params
    assert params["distributed.world_size"] == "2" and params["distributed.backend"] == "gloo"
    assert "distributed.world_size" not in client.get_run(s1["mlflow_run_id"]).data.params
    versions = client.search_model_versions("name='captioner'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    assert s2["registered"] == {"name": "captioner", "version": 2}

    assert len(two.nodes) == 2  # both ranks reported in (one local node here)
