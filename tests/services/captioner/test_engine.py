"""The captioner backends in-process: ONNX Runtime answers what PyTorch does, on the serving input path."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from services.captioner.engine import DecodeOptions, load_backend, prepare_image
from snap2caption.imaging import DEFAULT_LIMITS
from snap2caption.models.artifact import save_caption_model
from snap2caption.models.caption import CaptionModel
from snap2caption.models.caption_onnx import export_caption_onnx
from snap2caption.models.tokenizer import CaptionTokenizer
from tests.services.captioner.conftest import CAPTIONS, COLOURS, IMAGE_MAX_SIDE, image_bytes


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
    export_caption_onnx(v1_model[0], folder)
    return folder


def test_the_onnx_backend_needs_the_export(artifact: Path) -> None:
    with pytest.raises(ValueError, match=r"has no onnx/encoder\.onnx"):
        load_backend("onnx", artifact, image_max_side=None, threads=1)
    with pytest.raises(ValueError, match="unknown caption backend"):
        load_backend("tensorrt", artifact, image_max_side=None, threads=1)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_onnx_and_torch_backends_caption_alike(onnx_artifact: Path, num_beams: int) -> None:
    torch_backend = load_backend("torch", onnx_artifact, image_max_side=None, threads=1)
    onnx_backend = load_backend("onnx", onnx_artifact, image_max_side=None, threads=1)
    assert torch_backend.spec == onnx_backend.spec and torch_backend.spec.max_side == IMAGE_MAX_SIDE
    pixels = np.stack([prepare_image(image_bytes(c), torch_backend.spec, DEFAULT_LIMITS) for c in COLOURS])
    options = DecodeOptions(max_new_tokens=24, num_beams=num_beams)
    want = torch_backend.caption(pixels, options)
    got = onnx_backend.caption(pixels, options)
    assert [c.text for c in want] == CAPTIONS  # the overfitted model says what it was taught
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    assert [c.confidence for c in got] == pytest.approx([c.confidence for c in want], abs=1e-4)


def test_torch_backend_with_the_static_decoder_captions_alike(artifact: Path) -> None:
    """The GPU path's static-cache decoder, on CPU in float32 (no CUDA graphs here): same captions."""
    from services.captioner.engine import StaticOptions

    plain = load_backend("torch", artifact, image_max_side=None, threads=1)
    static = load_backend(
        "torch",
        artifact,
        image_max_side=None,
        threads=1,
        static=StaticOptions(enabled=True, dtype="float32", cuda_graphs=True, max_batch=4, max_beams=3),
    )
    pixels = (
        np.random.default_rng(0).standard_normal((3, *plain.spec.preprocess.output_shape)).astype(np.float32)
    )
    for beams in (1, 3):
        options = DecodeOptions(12, beams)
        got, want = static.caption(pixels, options), plain.caption(pixels, options)
        assert [c.token_ids for c in got] == [c.token_ids for c in want]
