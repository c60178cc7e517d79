"""The detector engine in-process: settings checks, readiness with one model missing, one decode per image,
the tagger artifact's calibrated minimum score as the default."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import time
from pathlib import Path
from typing import Any

import onnxruntime as ort
import pytest
from pydantic import ValidationError

from services.detector import engine as engine_module
from services.detector.config import Settings
from services.detector.engine import DetectOptions, DetectorEngine, ObjectsResult, TagOptions, TagsResult
from snap2caption.errors import NotReady
from snap2caption.imaging import decode_image
from snap2caption.manifest import write_manifest
from snap2caption.models import detector as detector_model
from snap2caption.models import tagger as tagger_model
from snap2caption.models.providers import CUDA, OrtProviders
from snap2caption.models.tagger.config import read_config, write_config
from snap2caption.registry import ModelVersionInfo
from tests.services.detector.conftest import Artifacts, assert_same_objects, assert_same_tags, noise_image
from tests.snap2caption.serving.test_model_store import FakeRegistry


def test_settings_defaults_and_refusals(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings()
    assert (settings.port, settings.detector_model, settings.tagger_model) == (8002, "detector", "tagger")
    assert (settings.detector_alias, settings.detector_runtime) == ("production", "auto")
    monkeypatch.setenv("SNAP2CAPTION_DETECTOR_TAGGER_ALIAS", "candidate")
    monkeypatch.setenv("SNAP2CAPTION_DETECTOR_MAX_QUEUE", "64")
    monkeypatch.setenv("SNAP2CAPTION_DETECTOR_DETECTOR_RUNTIME", "torch")
    monkeypatch.setenv("SNAP2CAPTION_DETECTOR_TAGGER_BACKEND", "onnx")  # the older name still works
    settings = Settings()
    assert (settings.tagger_alias, settings.max_queue) == ("candidate", 64)
    assert (settings.detector_runtime, settings.tagger_runtime) == ("torch", "onnx")
    with pytest.raises(ValidationError, match="max_det must be <= max_det_limit"):
        Settings(max_det=500, max_det_limit=300)
    with pytest.raises(ValidationError, match="top_k must be <= top_k_limit"):
        Settings(top_k=10, top_k_limit=5)
    with pytest.raises(ValidationError, match="max_images_per_request must be <= max_batch_size"):
        Settings(max_images_per_request=16, max_batch_size=8)
    with pytest.raises(ValidationError):
        Settings(detector_runtime="tensorrt")
    with pytest.raises(ValidationError, match="unknown execution provider 'gpu'"):
        Settings(providers="gpu")


def test_provider_settings_fall_back_to_the_process_wide_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert Settings().ort_providers() == OrtProviders()  # auto, device 0, the default cache, no fp16
    monkeypatch.setenv("SNAP2CAPTION_ORT_PROVIDERS", "cuda")
    monkeypatch.setenv("SNAP2CAPTION_ORT_TRT_FP16", "true")
    assert Settings().ort_providers() == OrtProviders("cuda", trt_fp16=True)
    monkeypatch.setenv("SNAP2CAPTION_DETECTOR_PROVIDERS", "tensorrt,cuda")  # the service's own wins
    monkeypatch.setenv("SNAP2CAPTION_DETECTOR_ORT_DEVICE_ID", "1")
    monkeypatch.setenv("SNAP2CAPTION_DETECTOR_TRT_CACHE_DIR", str(tmp_path))
    assert Settings().ort_providers() == OrtProviders("tensorrt,cuda", 1, tmp_path, True)


@pytest.mark.skipif(CUDA in ort.get_available_providers(), reason="this onnxruntime has CUDA")
def test_asking_for_cuda_without_it_is_a_load_error_in_readyz(artifacts: Artifacts, tmp_path: Path) -> None:
    """No silent fallback to the CPU: the models do not load, and /readyz says why."""
    settings = Settings(
        tracking_uri=artifacts.uri, model_cache_dir=tmp_path, poll_interval_s=0, providers="cuda"
    )

    async def scenario() -> None:
        engine = DetectorEngine(settings)
        engine.start()
        try:
            deadline = time.monotonic() + 30
            lanes = (engine.detector, engine.tagger)
            while not all(lane.store.status()["last_load_error"] for lane in lanes):
                assert time.monotonic() < deadline, engine.readiness()
                await asyncio.sleep(0.05)
            readiness = engine.readiness()
            assert not readiness.ready
            for name in ("detector", "tagger"):
                error = readiness.checks[name]["last_load_error"]
                assert error["error"] == "provider_unavailable", error
                assert "CUDAExecutionProvider asked for" in error["message"]
                assert readiness.checks[name]["version"] is None
        finally:
            await engine.close(1)

    asyncio.run(scenario())


def test_ready_only_when_both_models_are_loaded(artifacts: Artifacts, tmp_path: Path) -> None:
    """The tagger's alias names nothing: the detector serves, the tagger answers 503, /readyz says why."""
    settings = Settings(
        tracking_uri=artifacts.uri, model_cache_dir=tmp_path, tagger_alias="staging", poll_interval_s=0
    )

    async def scenario() -> None:
        engine = DetectorEngine(settings)
        engine.start()
        try:
            deadline = time.monotonic() + 30
            while (
                engine.detector.store.current is None or not engine.tagger.store.status()["last_poll_error"]
            ):
                assert time.monotonic() < deadline, engine.readiness()
                await asyncio.sleep(0.05)
            readiness = engine.readiness()
            assert not readiness.ready
            assert readiness.reason.startswith("tagger not loaded yet") and "staging" in readiness.reason
            assert readiness.checks["detector"]["version"] == 1
            assert readiness.checks["detector"]["runtime"] == "onnx"
            assert readiness.checks["detector"]["providers"] == {"model": ["CPUExecutionProvider"]}
            assert readiness.checks["tagger"]["version"] is None
            assert engine.detect_options(None, None, None) == DetectOptions(0.25, 0.45, 100)
            with pytest.raises(NotReady, match="tagger@staging"):
                engine.tag_options(None, None)
        finally:
            await engine.close(1)

    asyncio.run(scenario())


def test_analyze_decodes_each_image_once_for_both_models(
    artifacts: Artifacts, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``/v1/analyze``'s path: one decode per image feeds the detector's letterbox and the tagger's
    preprocessing, and each model answers what a direct call on that image gives."""
    decoded: list[bytes] = []

    def counting_decode(data: bytes, *args: Any, **kwargs: Any) -> Any:
        decoded.append(data)
        return decode_image(data, *args, **kwargs)

    monkeypatch.setattr(engine_module, "decode_image", counting_decode)
    images = [noise_image(40 + 7 * i, 30 + 5 * i, seed=300 + i) for i in range(3)]
    settings = Settings(tracking_uri=artifacts.uri, model_cache_dir=tmp_path, poll_interval_s=0)

    async def scenario() -> tuple[list[ObjectsResult], list[TagsResult]]:
        engine = DetectorEngine(settings)
        engine.start()
        try:
            deadline = time.monotonic() + 60
            while engine.detector.store.current is None or engine.tagger.store.current is None:
                assert time.monotonic() < deadline, engine.readiness()
                await asyncio.sleep(0.05)
            objects_options = engine.detect_options(None, None, None)
            tags_options = engine.tag_options(3, None)
            prepared = await engine.prepare(images, objects=objects_options, tags=tags_options)
            assert sorted(decoded) == sorted(images)  # each image once, for both models
            objects, tags = await engine.analyze(prepared, time.monotonic() + 30)
            assert objects is not None and tags is not None
            return list(objects.outputs), list(tags.outputs)
        finally:
            await engine.close(1)

    objects, tags = asyncio.run(scenario())
    detector = detector_model.load(artifacts.detector, "onnx")
    tagger = tagger_model.load(artifacts.tagger, "onnx")
    for data, found, tagged in zip(images, objects, tags, strict=True):
        image = decode_image(data).image
        assert_same_objects(
            [
                {
                    "label": d.class_name,
                    "class_id": d.class_id,
                    "score": d.score,
                    "box": dict(zip(("x1", "y1", "x2", "y2"), d.box_xyxy, strict=True)),
                }
                for d in found.objects
            ],
            detector.detect([image])[0],
        )
        assert_same_tags([t.to_dict() for t in tagged.tags], tagger.tag([image], top_k=3)[0])


class Folders:
    """A registry double: every alias of model ``name`` is version 1, a copy of ``folders[name]``."""

    def __init__(self, folders: dict[str, Path]) -> None:
        self.folders = folders

    def resolve(self, name: str, ref: str | int) -> ModelVersionInfo:
        return FakeRegistry(1).info(1)

    def download(self, name: str, ref: str | int, dst: str | Path) -> tuple[Path, ModelVersionInfo]:
        target = Path(dst) / name / "v1"
        if not target.exists():
            shutil.copytree(self.folders[name], target)
        return target, FakeRegistry(1).info(1)


def test_the_tagger_artifacts_min_score_is_the_default(artifacts: Artifacts, tmp_path: Path) -> None:
    """A tagger artifact whose calibrated ``min_score`` is 0.2: tags under it are not returned unless a
    request (or the service's setting) asks for another minimum."""
    folder = tmp_path / "tagger"
    shutil.copytree(artifacts.tagger, folder)
    write_config(dataclasses.replace(read_config(folder), min_score=0.2), folder)
    write_manifest(folder)
    images = [noise_image(50, 40, seed=400 + i) for i in range(3)]

    def run(settings: Settings) -> tuple[TagOptions, TagOptions, list[TagsResult]]:
        async def scenario() -> tuple[TagOptions, TagOptions, list[TagsResult]]:
            source = Folders({"detector": artifacts.detector, "tagger": folder})
            engine = DetectorEngine(settings, source_factory=lambda: source)
            engine.start()
            try:
                deadline = time.monotonic() + 60
                while engine.tagger.store.current is None:
                    assert time.monotonic() < deadline, engine.readiness()
                    await asyncio.sleep(0.05)
                default, explicit = engine.tag_options(None, None), engine.tag_options(None, 0.0)
                prepared = await engine.prepare(images, objects=None, tags=default)
                _, tags = await engine.analyze(prepared, time.monotonic() + 30)
                assert tags is not None
                return default, explicit, list(tags.outputs)
            finally:
                await engine.close(1)

        return asyncio.run(scenario())

    default, explicit, tagged = run(Settings(model_cache_dir=tmp_path / "cache", poll_interval_s=0))
    assert default.min_score == 0.2 and explicit.min_score == 0.0  # a request's own minimum wins
    tagger = tagger_model.load(folder, "onnx")
    assert tagger.min_score == 0.2
    everything = tagger.tag([decode_image(data).image for data in images], top_k=5)
    assert any(t.score < 0.2 for tags in everything for t in tags)  # the minimum really drops tags here
    for data, result in zip(images, tagged, strict=True):
        assert all(t.score >= 0.2 for t in result.tags)
        assert_same_tags(
            [t.to_dict() for t in result.tags], tagger.tag([decode_image(data).image], min_score=0.2)[0]
        )

    setting = Settings(model_cache_dir=tmp_path / "cache-2", poll_interval_s=0, min_score=0.05)
    assert run(setting)[0].min_score == 0.05  # the service's setting wins over the artifact's
