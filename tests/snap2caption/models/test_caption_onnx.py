"""The caption model's ONNX export: same prefix, same logits, same captions as PyTorch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from snap2caption.models.artifact import load_caption_model, save_caption_model, verify_artifact
from snap2caption.models.caption import CaptionConfig, build_caption_model
from snap2caption.models.caption_onnx import CaptionOnnx, export_caption_onnx, has_onnx

TINY = Path(__file__).resolve().parents[3] / "training" / "configs" / "caption" / "tiny.yaml"
CAPTIONS = ["a red circle left of a blue square", "two green triangles", "a yellow star above a cat"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model, tokenizer = build_caption_model(CaptionConfig.from_yaml(TINY), captions=CAPTIONS * 2)
    folder = save_caption_model(model.eval(), tokenizer, tmp_path_factory.mktemp("caption") / "artifact")
    assert not has_onnx(folder)
    export_caption_onnx(model, folder)
    return folder


def test_export_is_part_of_the_verified_artifact(exported: Path) -> None:
    assert has_onnx(exported)
    verify_artifact(exported)  # the manifest was re-hashed with the ONNX files in it
    load_caption_model(exported)


def test_onnx_network_calls_match_torch(exported: Path) -> None:
    model, _ = load_caption_model(exported)
    onnx = CaptionOnnx.for_model(model, exported)
    pixels = torch.randn(3, *model.preprocess.output_shape, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        prefix = model.encode(pixels)
        torch.testing.assert_close(onnx.encode(pixels), prefix, rtol=1e-4, atol=1e-5)
        prompt = torch.cat([prefix, model.embed_tokens(torch.full((3, 1), model.tokenizer.bos_id))], dim=1)
        logits, cache = model.step(prompt)
        onnx_logits, onnx_cache = onnx.step(prompt)
        torch.testing.assert_close(onnx_logits, logits, rtol=1e-4, atol=1e-4)
        nxt = model.embed_tokens(logits.argmax(-1)[:, None])  # (3, 1, D): one decoding step on the cache
        torch.testing.assert_close(
            onnx.step(nxt, onnx_cache)[0], model.step(nxt, cache)[0], rtol=1e-4, atol=1e-4
        )


@pytest.mark.parametrize("num_beams", [1, 3])
def test_onnx_captions_equal_torch_captions(exported: Path, num_beams: int) -> None:
    model, _ = load_caption_model(exported)
    reference, _ = load_caption_model(exported)
    CaptionOnnx.for_model(model, exported).attach(model)
    # Seeded: the same inputs in any test order (an argmax near-tie could otherwise come and go).
    pixels = torch.randn(4, *model.preprocess.output_shape, generator=torch.Generator().manual_seed(2))
    got = model.generate(pixels, num_beams=num_beams, max_new_tokens=12)
    want = reference.generate(pixels, num_beams=num_beams, max_new_tokens=12)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    assert [c.confidence for c in got] == pytest.approx([c.confidence for c in want], abs=1e-4)


def test_an_export_of_another_model_is_refused(exported: Path) -> None:
    torch.manual_seed(0)
    other, _ = build_caption_model(
        CaptionConfig.from_yaml(TINY, ["decoder.n_layer=1"]), captions=CAPTIONS * 2
    )
    with pytest.raises(ValueError, match="does not match"):
        CaptionOnnx.for_model(other, exported)


def test_export_leaves_the_model_in_eval_mode(tmp_path: Path) -> None:
    """The exporter restores each wrapper's training flag recursively; a wrapper left in train mode once
    switched the exported model's dropout on (found by running the service tests in another order)."""
    torch.manual_seed(0)
    model, tokenizer = build_caption_model(CaptionConfig.from_yaml(TINY), captions=CAPTIONS * 2)
    folder = save_caption_model(model.eval(), tokenizer, tmp_path / "artifact")
    export_caption_onnx(model, folder)
    assert not any(module.training for module in model.modules())
