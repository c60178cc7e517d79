"""The training loop: exact resume, gradient accumulation, bf16 autocast on CPU, schedule, early stopping."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from tests.training.caption.conftest import tiny_run
from training.callbacks.base import Callback
from training.callbacks.checkpoint import list_checkpoints, read_checkpoint
from training.caption import train as train_module
from training.caption.config import TrainConfig
from training.caption.run import RunResult, train_caption
from training.caption.train import learning_rate, native_bf16, resolve_precision

# peft calls a transformers method that warns about its own deprecation.
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")


class Recorder(Callback):
    """Keeps every step's logs; raises Crash after ``crash_at`` steps (after the checkpoint callback ran)."""

    def __init__(self, crash_at: int | None = None) -> None:
        self.crash_at = crash_at
        self.steps: dict[int, dict[str, float]] = {}

    def on_step_end(self, trainer: Any, logs: dict[str, float]) -> None:
        self.steps[trainer.state.step] = dict(logs)
        if trainer.state.step == self.crash_at:
            raise Crash


class Crash(RuntimeError):
    pass


def _train(data: Path, out: Path, *overrides: str, **kwargs: Any) -> RunResult:
    config = tiny_run(data, out, "run.mlflow=false", "run.register=false", *overrides)
    return train_caption(config, progress=False, **kwargs)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def test_resume_continues_exactly_like_an_uninterrupted_run(caption_data: Path, tmp_path: Path) -> None:
    # Dropout on, so that the restored RNG state matters; validation every 4 steps picks the best weights.
    settings = ("max_steps=12", "checkpoint_every=4", "eval_every=4", "model.decoder.dropout=0.1")
    whole = Recorder()
    _train(caption_data, tmp_path / "whole", *settings, extra_callbacks=[whole])

    crashed = Recorder(crash_at=6)  # dies two steps after the step-4 checkpoint
    with pytest.raises(Crash):
        _train(caption_data, tmp_path / "resumed", *settings, extra_callbacks=[crashed])
    assert [p.name for p in list_checkpoints(tmp_path / "resumed" / "checkpoints")] == ["step-0000004"]
    resumed = Recorder()
    result = _train(
        caption_data, tmp_path / "resumed", *settings, "run.resume=latest", extra_callbacks=[resumed]
    )

    assert sorted(resumed.steps) == list(range(5, 13))
    for step in range(5, 13):
        assert resumed.steps[step]["loss"] == whole.steps[step]["loss"], step
        assert resumed.steps[step]["lr"] == whole.steps[step]["lr"]
    # Steps 5 and 6 ran twice in the crashed process: the same losses as well.
    assert crashed.steps[5]["loss"] == whole.steps[5]["loss"]
    assert result.state.evals == [[4, result.state.evals[0][1]], *result.state.evals[1:]]
    last_whole = _weights(tmp_path / "whole" / "checkpoints" / "step-0000012" / "model.safetensors")
    last_resumed = _weights(tmp_path / "resumed" / "checkpoints" / "step-0000012" / "model.safetensors")
    assert last_whole.keys() == last_resumed.keys()
    assert all(torch.equal(last_whole[k], last_resumed[k]) for k in last_whole)
    # The saved artifacts (best weights by validation CIDEr-D) are identical too.
    art_whole = _weights(tmp_path / "whole" / "model" / "model.safetensors")
    art_resumed = _weights(tmp_path / "resumed" / "model" / "model.safetensors")
    assert all(torch.equal(art_whole[k], art_resumed[k]) for k in art_whole)


def test_checkpoint_holds_no_pickled_objects(caption_data: Path, tmp_path: Path) -> None:
    _train(caption_data, tmp_path, "max_steps=2")
    (folder,) = list_checkpoints(tmp_path / "checkpoints")
    checkpoint = read_checkpoint(folder)  # torch.load(weights_only=True) inside
    assert checkpoint.state["train_state"]["step"] == 2
    assert checkpoint.config["train"]["max_steps"] == 2
    assert sorted(p.name for p in folder.iterdir()) == [
        "best.safetensors",
        "model.safetensors",
        "state.pt",
        "tokenizer.json",
    ]


def test_resume_refuses_another_model_config(caption_data: Path, tmp_path: Path) -> None:
    from snap2caption.config import ConfigError

    _train(caption_data, tmp_path, "max_steps=2")
    with pytest.raises(ConfigError, match="model config differs"):
        _train(caption_data, tmp_path, "max_steps=4", "model.decoder.n_layer=1", "run.resume=latest")


class GradRecorder(Callback):
    """The summed gradient of each optimizer step, captured just before the optimizer applies it."""

    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_train_start(self, trainer: Any) -> None:
        names = {id(p): n for n, p in trainer.model.named_parameters()}

        def capture(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            self.grads.append({names[id(p)]: p.grad.detach().clone() for p in params})

        trainer.optimizer.register_step_pre_hook(capture)


def test_grad_accumulation_equals_one_big_batch(caption_data: Path, tmp_path: Path) -> None:
    # Frozen encoder on cached features: BatchNorm in eval mode, so micro-batches see the same network.
    frozen = ("model.encoder.trainable=none", "max_steps=5", "eval_every=0")
    one, accumulated = Recorder(), Recorder()
    one_grads, accumulated_grads = GradRecorder(), GradRecorder()
    _train(
        caption_data,
        tmp_path / "one",
        *frozen,
        "batch_size=8",
        "grad_accum=1",
        extra_callbacks=[one, one_grads],
    )
    _train(
        caption_data,
        tmp_path / "acc",
        *frozen,
        "batch_size=4",
        "grad_accum=2",
        extra_callbacks=[accumulated, accumulated_grads],
    )
    for step in range(1, 6):
        assert accumulated.steps[step]["loss"] == pytest.approx(one.steps[step]["loss"], rel=1e-5)
    # Two micro-batches of 4 give the gradient of one batch of 8, at every step. (Weights are not compared:
    # Adam turns the float noise of gradients that are zero in theory, e.g. the key bias's, into full steps.)
    assert len(one_grads.grads) == len(accumulated_grads.grads) == 5
    for big, small in zip(one_grads.grads, accumulated_grads.grads, strict=True):
        assert big.keys() == small.keys()
        for name in big:
            torch.testing.assert_close(small[name], big[name], rtol=1e-4, atol=1e-6, msg=name)


def test_bf16_autocast_runs_on_cpu(caption_data: Path, tmp_path: Path) -> None:
    seen: list[torch.dtype] = []

    class Probe(Callback):
        def on_train_start(self, trainer: Any) -> None:
            trainer.model.mapping.register_forward_hook(lambda m, i, o: seen.append(o.dtype))

    rec = Recorder()
    result = _train(caption_data, tmp_path, "precision=bf16", "max_steps=3", extra_callbacks=[Probe(), rec])
    assert torch.bfloat16 in seen  # the training forward ran under autocast
    assert all(math.isfinite(s["loss"]) for s in rec.steps.values()) and result.state.step == 3


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_bf16_only_where_the_hardware_has_it(
    caption_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, native: bool
) -> None:
    monkeypatch.setattr(train_module, "native_bf16", lambda device: native)
    seen: list[torch.dtype] = []

    class Probe(Callback):
        def on_train_start(self, trainer: Any) -> None:
            trainer.model.mapping.register_forward_hook(lambda m, i, o: seen.append(o.dtype))

    result = _train(caption_data, tmp_path, "precision=auto", "max_steps=2", extra_callbacks=[Probe()])
    want = "bf16" if native else "fp32"
    assert (torch.bfloat16 in seen) == native
    saved = (result.out_dir / "config.yaml").read_text()
    assert f"precision: {want}" in saved  # what the run used, not "auto"
    assert f"precision {want}" in (result.artifact_dir / "README.md").read_text()


def test_native_bf16_reads_the_cpu_flags(tmp_path: Path) -> None:
    cpu = torch.device("cpu")
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f amx_bf16 amx_tile\n")
    assert native_bf16(cpu, info)
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\n")
    assert native_bf16(cpu, info)
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f\n")
    assert not native_bf16(cpu, info)
    assert not native_bf16(cpu, tmp_path / "missing")
    assert not native_bf16(torch.device("meta"), info)
    assert resolve_precision("fp32", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"


def test_fp16_needs_cuda(caption_data: Path, tmp_path: Path) -> None:
    # device=cpu explicitly, so the refusal is tested on a CUDA machine too.
    with pytest.raises(RuntimeError, match="fp16 needs a CUDA device"):
        _train(caption_data, tmp_path, "precision=fp16", "max_steps=1", "device=cpu")


def test_early_stopping_on_validation_cider(caption_data: Path, tmp_path: Path) -> None:
    # A learning rate too small to change the captions: CIDEr-D never beats its first value.
    result = _train(
        caption_data, tmp_path, "lr=1e-9", "warmup_steps=0", "eval_every=1", "patience=2", "max_steps=50"
    )
    assert result.state.step == 3
    assert result.summary["stop_reason"].startswith("early stopping")
    assert result.state.best_step == 1


def test_warmup_then_cosine_to_the_floor() -> None:
    cfg = TrainConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=10)
    assert learning_rate(cfg, 0, 110) == pytest.approx(0.1)
    assert learning_rate(cfg, 9, 110) == pytest.approx(1.0)
    assert learning_rate(cfg, 60, 110) == pytest.approx(0.55)
    assert learning_rate(cfg, 110, 110) == pytest.approx(0.1)
    # With a time budget, the decay follows whichever of steps and time is further along.
    assert learning_rate(cfg, 20, 110, time_fraction=1.0) == pytest.approx(0.1)


def test_training_learns_which_token_pairs_may_repeat(caption_data: Path, tmp_path: Path) -> None:
    """``decoding.limit_repeats``: the artifact carries the pairs the training targets repeat, and the ONNX
    runtime that serves it reads them."""
    from snap2caption.models.caption.decoding import repeated_bigrams
    from snap2caption.models.caption.ort import OrtCaptioner
    from snap2caption.models.caption.tokenizer import CaptionTokenizer
    from training.caption.data import SplitData

    result = _train(
        caption_data, tmp_path, "model.decoding.limit_repeats=true", "max_steps=1", "captions_per_image=2"
    )
    learned = OrtCaptioner(result.artifact_dir).decoding
    tokenizer = CaptionTokenizer.load(result.artifact_dir)
    captions = SplitData.load(caption_data, "train").captions
    targets = [tokenizer.encode(c) for caps in captions for c in caps[:2]]
    assert learned.limit_repeats and learned.repeatable_bigrams == repeated_bigrams(targets)
    assert learned.repeatable_bigrams  # the synthetic captions list objects: ", a" comes back
    every = [tokenizer.encode(c) for caps in captions for c in caps]
    assert repeated_bigrams(every) != learned.repeatable_bigrams  # only the targets it trained on count
    off = _train(caption_data, tmp_path / "off", "max_steps=1")  # tiny: limit_repeats false
    assert OrtCaptioner(off.artifact_dir).decoding.repeatable_bigrams is None
