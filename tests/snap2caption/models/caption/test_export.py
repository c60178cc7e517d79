"""The caption model's ONNX export: same prefix, same logits, same captions as PyTorch."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from snap2caption.manifest import verify_manifest, write_manifest
from snap2caption.models.caption.artifact import load_caption_model
from snap2caption.models.caption.export import export_onnx
from snap2caption.models.caption.files import has_onnx
from snap2caption.models.caption.ort import OrtCaptioner
from tests.snap2caption.models.caption.conftest import saved_tiny


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, folder = saved_tiny(tmp_path_factory.mktemp("caption") / "artifact")
    assert not has_onnx(folder)
    export_onnx(model, folder)
    return folder


def test_export_is_part_of_the_verified_artifact(exported: Path) -> None:
    assert has_onnx(exported)
    verify_manifest(exported)  # the manifest was re-hashed with the ONNX files in it
    load_caption_model(exported)


def test_onnx_network_calls_match_torch(exported: Path) -> None:
    model, _ = load_caption_model(exported)
    onnx = OrtCaptioner(exported)
    pixels = torch.randn(3, *model.preprocess.output_shape, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        prefix = model.encode(pixels)
        (onnx_prefix,) = onnx.encoder.run(None, {"pixels": pixels.numpy()})
        torch.testing.assert_close(torch.from_numpy(onnx_prefix), prefix, rtol=1e-4, atol=1e-5)
        prompt = torch.cat([prefix, model.embed_tokens(torch.full((3, 1), model.tokenizer.bos_id))], dim=1)
        logits, cache = model.step(prompt)
        onnx_logits, onnx_cache = onnx.step(prompt.numpy(), None)
        torch.testing.assert_close(torch.from_numpy(onnx_logits), logits, rtol=1e-4, atol=1e-4)
        nxt = model.embed_tokens(logits.argmax(-1)[:, None])  # (3, 1, D): one decoding step on the cache
        torch.testing.assert_close(
            torch.from_numpy(onnx.step(nxt.numpy(), onnx_cache)[0]),
            model.step(nxt, cache)[0],
            rtol=1e-4,
            atol=1e-4,
        )


@pytest.mark.parametrize("num_beams", [1, 3])
def test_onnx_captions_equal_torch_captions(exported: Path, num_beams: int) -> None:
    model, _ = load_caption_model(exported)
    onnx = OrtCaptioner(exported)
    # Seeded: the same inputs in any test order (an argmax near-tie could otherwise come and go).
    pixels = torch.randn(4, *model.preprocess.output_shape, generator=torch.Generator().manual_seed(2))
    got = onnx.generate(pixels.numpy(), num_beams=num_beams, max_new_tokens=12)
    want = model.generate(pixels, num_beams=num_beams, max_new_tokens=12)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    assert [c.confidence for c in got] == pytest.approx([c.confidence for c in want], abs=1e-4)


def test_an_export_of_another_model_is_refused(exported: Path, tmp_path: Path) -> None:
    other, other_folder = saved_tiny(tmp_path / "other", "decoder.n_layer=1")
    export_onnx(other, other_folder)
    mixed = tmp_path / "mixed"  # this artifact, with the other model's ONNX files
    shutil.copytree(exported, mixed)
    shutil.rmtree(mixed / "onnx")
    shutil.copytree(other_folder / "onnx", mixed / "onnx")
    write_manifest(mixed)
    with pytest.raises(ValueError, match="does not match"):
        OrtCaptioner(mixed)


@pytest.mark.parametrize(
    "overrides",
    [
        ("prefix_len=9",),  # 8 x 8 encoder grid -> 3 x 3 cells
        ("prefix_len=6",),  # -> 2 x 3
        ("mapping.type=transformer", "mapping.grid=3", "prefix_len=5"),
        ("encoder.colour_cells=2",),  # sub-cell colours appended to the grid
        ("encoder.detail_stride=4", "encoder.colour_cells=2"),  # and the finer map folded into cells
    ],
)
def test_prefix_grids_that_do_not_divide_the_encoder_grid_export(
    tmp_path: Path, overrides: tuple[str, ...]
) -> None:
    """The search tries prefix lengths whose grid does not divide the encoder's (7 x 7 -> 4 x 4 for P = 16):
    adaptive pooling failed to export there, after the trial had trained."""
    model, folder = saved_tiny(tmp_path / "artifact", *overrides)
    export_onnx(model, folder)
    pixels = torch.randn(2, *model.preprocess.output_shape, generator=torch.Generator().manual_seed(4))
    (prefix,) = OrtCaptioner(folder).encoder.run(None, {"pixels": pixels.numpy()})
    with torch.inference_mode():
        torch.testing.assert_close(torch.from_numpy(prefix), model.encode(pixels), rtol=1e-4, atol=1e-5)


def test_export_leaves_the_model_in_eval_mode(tmp_path: Path) -> None:
    """The exporter restores each wrapper's training flag recursively; a wrapper left in train mode once
    switched the exported model's dropout on (found by running the service tests in another order)."""
    model, folder = saved_tiny(tmp_path / "artifact")
    export_onnx(model, folder)
    assert not any(module.training for module in model.modules())


def test_several_new_positions_onto_a_filled_past_match_torch(exported: Path) -> None:
    """The causal mask of the hand-written step: new positions see the whole past and each other up to
    themselves (the greedy loop only ever sends one, a prompt with no past, or beams' reordered caches)."""
    model, _ = load_caption_model(exported)
    onnx = OrtCaptioner(exported)
    generator = torch.Generator().manual_seed(3)
    width = model.base_decoder.config.n_embd
    first, more = torch.randn(2, 5, width, generator=generator), torch.randn(2, 3, width, generator=generator)
    with torch.inference_mode():
        _, cache = model.step(first)
        logits, _ = model.step(more, cache)
    _, onnx_cache = onnx.step(first.numpy(), None)
    onnx_logits, (keys, values) = onnx.step(more.numpy(), onnx_cache)
    torch.testing.assert_close(torch.from_numpy(onnx_logits), logits, rtol=1e-4, atol=1e-4)
    assert keys.shape[3] == values.shape[3] == 8  # (L, N, H, T + S, D/H)


def test_the_decoder_step_is_written_not_traced(exported: Path) -> None:
    """About 40 nodes per layer: a traced GPT-2 step held ~1,200 after ONNX Runtime's own optimisations."""
    import onnx

    model, _ = load_caption_model(exported)
    graph = onnx.load(str(exported / "onnx" / "decoder.onnx")).graph
    assert len(graph.node) <= 45 * model.base_decoder.config.n_layer + 30


def test_a_decoder_the_graph_does_not_implement_is_refused() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    from snap2caption.models.caption.onnx_decoder import build_decoder_step

    sizes = {"n_layer": 1, "n_embd": 16, "n_head": 2, "vocab_size": 10, "n_positions": 8}
    config = GPT2Config(**sizes, activation_function="silu")
    with pytest.raises(ValueError, match="activation 'silu'"):
        build_decoder_step(GPT2LMHeadModel(config))


@pytest.mark.parametrize("activation", ["gelu_pytorch_tanh", "gelu", "relu"])
def test_each_activation_the_graph_implements_matches_torch(activation: str) -> None:
    """``decoder.activation``'s choices: the written step's logits are GPT-2's own for each."""
    import onnxruntime as ort
    from transformers import GPT2Config, GPT2LMHeadModel

    from snap2caption.models.caption.onnx_decoder import build_decoder_step

    torch.manual_seed(0)
    sizes = {"n_layer": 2, "n_embd": 16, "n_head": 2, "vocab_size": 10, "n_positions": 8}
    gpt2 = GPT2LMHeadModel(GPT2Config(**sizes, activation_function=activation)).eval()
    embeds = torch.randn(3, 4, 16, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = gpt2(inputs_embeds=embeds).logits[:, -1]
    session = ort.InferenceSession(
        build_decoder_step(gpt2).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    empty = np.zeros((2, 3, 2, 0, 8), np.float32)  # (L, N, H, T = 0, D/H)
    logits = session.run(
        ["logits"], {"inputs_embeds": embeds.numpy(), "past_keys": empty, "past_values": empty}
    )[0]
    torch.testing.assert_close(torch.from_numpy(logits), expected, rtol=1e-4, atol=1e-4)
