"""The captioner's runtimes in-process, on the serving input path: ONNX Runtime answers what PyTorch does;
the engine serves the artifact's calibrated confidence."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from services.captioner.config import Settings
from services.captioner.engine import CaptionEngine, CaptionRun, input_spec, prepare_image
from snap2caption.http import Readiness
from snap2caption.imaging import DEFAULT_LIMITS
from snap2caption.manifest import write_manifest
from snap2caption.models import caption
from snap2caption.models.caption import StaticOptions
from snap2caption.models.caption.artifact import save_caption_model
from snap2caption.models.caption.calibration import CALIBRATION_FILE, Calibration
from snap2caption.models.caption.export import export_onnx
from snap2caption.models.caption.model import CaptionModel
from snap2caption.models.caption.tokenizer import CaptionTokenizer
from snap2caption.registry import ModelVersionInfo
from tests.services.captioner.conftest import CAPTIONS, COLOURS, IMAGE_MAX_SIDE, image_bytes
from tests.snap2caption.serving.test_model_store import FakeRegistry


@pytest.fixture(scope="module")
def artifact(
    tmp_path_factory: pytest.TempPathFactory, v1_model: tuple[CaptionModel, CaptionTokenizer]
) -> Path:
    folder = tmp_path_factory.mktemp("engine") / "artifact"
    save_caption_model(*v1_model, folder, extra={"image_max_side": IMAGE_MAX_SIDE})
    return folder


@pytest.fixture(scope="module")
def onnx_artifact(
    tmp_path_factory: pytest.TempPathFactory, artifact: Path, v1_model: tuple[CaptionModel, CaptionTokenizer]
) -> Path:
    """``artifact`` with its ONNX export, in a folder of its own (``artifact`` stays without one)."""
    folder = tmp_path_factory.mktemp("engine-onnx") / "artifact"
    shutil.copytree(artifact, folder)
    export_onnx(v1_model[0], folder)
    return folder


def test_the_onnx_runtime_needs_the_export(artifact: Path) -> None:
    with pytest.raises(ValueError, match=r"has no onnx/encoder\.onnx"):
        caption.load(artifact, "onnx")
    with pytest.raises(ValueError, match="unknown caption runtime"):
        caption.load(artifact, "tensorrt")
    assert caption.load(artifact).runtime == "torch"  # auto, without the export


@pytest.mark.parametrize("num_beams", [1, 3])
def test_onnx_and_torch_runtimes_caption_alike(onnx_artifact: Path, num_beams: int) -> None:
    torch_runtime = caption.load(onnx_artifact, "torch")
    onnx_runtime = caption.load(onnx_artifact)  # auto: the artifact carries the export
    assert (torch_runtime.runtime, onnx_runtime.runtime) == ("torch", "onnx")
    spec = input_spec(torch_runtime, None)
    assert spec == input_spec(onnx_runtime, None) and spec.max_side == IMAGE_MAX_SIDE
    assert input_spec(onnx_runtime, 64).max_side == 64  # the service's setting wins
    pixels = np.stack([prepare_image(image_bytes(c), spec, DEFAULT_LIMITS) for c in COLOURS])
    want = torch_runtime.generate(pixels, max_new_tokens=24, num_beams=num_beams)
    got = onnx_runtime.generate(pixels, max_new_tokens=24, num_beams=num_beams)
    assert [c.text for c in want] == CAPTIONS  # the overfitted model says what it was taught
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    assert [c.confidence for c in got] == pytest.approx([c.confidence for c in want], abs=1e-4)


def test_torch_runtime_with_the_static_decoder_captions_alike(artifact: Path) -> None:
    """The GPU path's static-cache decoder, on CPU in float32 (no CUDA graphs here): same captions."""
    plain = caption.load(artifact, "torch")
    static = caption.load(
        artifact,
        "torch",
        static=StaticOptions(enabled=True, dtype="float32", cuda_graphs=True, max_batch=4, max_beams=3),
    )
    pixels = np.random.default_rng(0).standard_normal((3, *plain.preprocess.output_shape)).astype(np.float32)
    for beams in (1, 3):
        got = static.generate(pixels, max_new_tokens=12, num_beams=beams)
        want = plain.generate(pixels, max_new_tokens=12, num_beams=beams)
        assert [c.token_ids for c in got] == [c.token_ids for c in want]


class OneFolder:
    """A registry double whose every alias is version 1: a copy of one artifact folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def resolve(self, name: str, ref: str | int) -> ModelVersionInfo:
        return FakeRegistry(1).info(1)

    def download(self, name: str, ref: str | int, dst: str | Path) -> tuple[Path, ModelVersionInfo]:
        target = Path(dst) / name / "v1"
        if not target.exists():
            shutil.copytree(self.folder, target)
        return target, FakeRegistry(1).info(1)


def serve(folder: Path, cache: Path) -> tuple[CaptionRun, Readiness]:
    """Caption two colours through a :class:`CaptionEngine` serving ``folder``; its readiness too."""
    settings = Settings(model_cache_dir=cache, poll_interval_s=0, runtime="torch")

    async def scenario() -> tuple[CaptionRun, Readiness]:
        engine = CaptionEngine(settings, source_factory=lambda: OneFolder(folder))
        engine.start()
        try:
            deadline = time.monotonic() + 60
            while engine.lane.store.current is None:
                assert time.monotonic() < deadline, engine.readiness()
                await asyncio.sleep(0.05)
            items = await engine.prepare([image_bytes(c) for c in list(COLOURS)[:2]])
            run = await engine.caption(items, engine.options(None, None), time.monotonic() + 30)
            return run, engine.readiness()
        finally:
            await engine.close(1)

    return asyncio.run(scenario())


def test_the_engine_serves_the_calibrated_confidence_and_keeps_the_raw_one(
    artifact: Path, tmp_path: Path
) -> None:
    calibration = Calibration(0.5, -1.0, "pairs", "val", 100, 30)
    folder = tmp_path / "calibrated"
    shutil.copytree(artifact, folder)
    (folder / CALIBRATION_FILE).write_text(json.dumps(calibration.to_dict()))
    write_manifest(folder)
    run, readiness = serve(folder, tmp_path / "cache")
    assert readiness.checks["calibrated"] is True
    assert [c.text for c in run.captions] == CAPTIONS[:2]
    for c in run.captions:
        assert 0 < c.raw_confidence <= 1
        assert c.confidence == pytest.approx(calibration.probability(c.raw_confidence))
        assert c.confidence < c.raw_confidence - 0.05  # this map lowers a sure caption's confidence

    run, readiness = serve(artifact, tmp_path / "cache-plain")  # no calibration.json
    assert readiness.checks["calibrated"] is False
    assert all(c.confidence == c.raw_confidence for c in run.captions)
