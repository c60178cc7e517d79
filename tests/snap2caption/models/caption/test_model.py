"""The caption model: config, loss, decoding (KV cache, batching, controls, confidence) and LoRA wiring.

Everything runs on the ``tiny`` preset (random 64-px images, a 2-layer 32-wide GPT-2); the LoRA test uses a
``paper``-shaped model with reduced sizes: transformer mapping, a small saved GPT-2 as the "pretrained" base.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from snap2caption.config import ConfigError
from snap2caption.models.caption.config import CaptionConfig
from snap2caption.models.caption.model import CaptionModel, adaptive_pool, build_caption_model
from snap2caption.models.caption.tokenizer import CaptionTokenizer
from tests.snap2caption.models.caption.conftest import CONFIGS, TARGETS, TINY

# peft calls a transformers method that warns about its own deprecation.
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")


def tiny_config(*overrides: str) -> CaptionConfig:
    return CaptionConfig.from_yaml(TINY, overrides)


@pytest.fixture(scope="module")
def trained(tok: CaptionTokenizer, pixels: torch.Tensor) -> tuple[CaptionModel, list[float]]:
    """A tiny model overfit to one caption per image, and its loss curve."""
    torch.manual_seed(0)
    model = CaptionModel(tiny_config(), tok).train()
    input_ids, mask = tok.batch_encode(TARGETS, max_tokens=24)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses: list[float] = []
    while len(losses) < 400 and (not losses or losses[-1] > 0.01):
        loss = model(input_ids, mask, pixels=pixels).loss
        assert loss is not None
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model.eval(), losses


# ------------------------------------------------------------------------------------------ config


def test_presets_load_and_starter_is_the_default() -> None:
    assert CaptionConfig.from_yaml(CONFIGS / "starter.yaml") == CaptionConfig()
    tiny = tiny_config()
    assert (tiny.encoder.name, tiny.decoder.n_layer, tiny.decoder.n_embd, tiny.prefix_len) == (
        "tiny",
        2,
        32,
        4,
    )
    paper = CaptionConfig.from_yaml(CONFIGS / "paper.yaml")
    assert paper.encoder.name == "resnet50" and paper.decoder.pretrained == "gpt2-medium"
    assert paper.mapping.type == "transformer" and paper.prefix_len == 10
    assert paper.lora.enabled and paper.lora.r == 8 and paper.lora.target_modules == ["c_attn", "c_proj"]
    assert CaptionConfig.from_dict(paper.to_dict()) == paper


def test_overrides_are_parsed_to_the_field_type() -> None:
    cfg = tiny_config(
        "lora.r=16",
        "model.lora.enabled=true",
        "lora.target_modules=[c_attn, c_fc]",
        "decoding.length_penalty=2",
        "decoder.pretrained=/models/gpt2",
        "encoder.pretrained=/weights/tiny.safetensors",
        "tokenizer.pretrained=null",
    )
    assert cfg.lora.r == 16 and cfg.lora.enabled is True
    assert cfg.lora.target_modules == ["c_attn", "c_fc"]
    assert cfg.decoding.length_penalty == 2.0 and isinstance(cfg.decoding.length_penalty, float)
    assert cfg.decoder.pretrained == "/models/gpt2" and cfg.encoder.pretrained == "/weights/tiny.safetensors"
    assert tiny_config("encoder.pretrained=false").encoder.pretrained is False
    assert tiny_config("lora.dropout=1e-1").lora.dropout == 0.1  # YAML 1.1 reads 1e-1 as a string
    # Overrides apply before validation: together they may fix what one alone would break.
    assert tiny_config(
        "decoder.n_positions=16", "decoding.max_new_tokens=8", "tokenizer.max_caption_tokens=8"
    )
    assert tiny_config("lora.target_modules=c_attn,c_proj").lora.target_modules == ["c_attn", "c_proj"]


@pytest.mark.parametrize(
    ("override", "suggestion"),
    [("lora.rank=8", "lora.r"), ("decoder.nlayer=2", "decoder.n_layer"), ("prefix_length=4", "prefix_len")],
)
def test_unknown_override_suggests_nearest_key(override: str, suggestion: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"did you mean '{suggestion}'")):
        tiny_config(override)


def test_unknown_key_in_yaml_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  decoder:\n    n_layers: 2\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"did you mean 'decoder\.n_layer'"):
        CaptionConfig.from_yaml(path)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("lora.r=abc", "lora.r must be an integer"),
        ("encoder.name=vit", "encoder.name must be one of"),
        ("mapping.order=diagonal", "mapping.order must be one of"),
        ("decoder.n_head=3", "divisible"),
        ("decoding.max_new_tokens=200", "n_positions"),
        ("novalue", "not key=value"),
    ],
)
def test_bad_values_are_refused(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        tiny_config(override)


def test_prefix_order_applies_to_the_mlp_mapping_only() -> None:
    with pytest.raises(ConfigError, match=r"mapping\.order applies to the mlp mapping only"):
        tiny_config("mapping.type=transformer", "mapping.order=columns")


# ------------------------------------------------------------------------------------ model, loss


def test_prefix_shapes_and_features_path(random_model: CaptionModel, pixels: torch.Tensor) -> None:
    features = random_model.encoder(pixels)  # (B, 32, 8, 8)
    prefix = random_model.encode(pixels)
    assert prefix.shape == (3, 4, 32)  # (B, P, D)
    assert torch.equal(random_model.encode(features=features), prefix)
    transformer = CaptionModel(
        tiny_config("mapping.type=transformer", "mapping.grid=4", "mapping.num_heads=4"),
        random_model.tokenizer,
    )
    assert transformer.encode(pixels).shape == (3, 4, 32)
    with pytest.raises(ValueError, match="exactly one"):
        random_model.encode(pixels, features=features)


@pytest.mark.parametrize(
    ("size", "grid"),
    [((7, 7), (4, 4)), ((7, 7), (5, 5)), ((7, 7), (2, 5)), ((8, 8), (3, 3)), ((5, 9), (3, 2))],
)
def test_pooling_to_any_grid_equals_adaptive_average_pooling(
    size: tuple[int, int], grid: tuple[int, int]
) -> None:
    """The mapping's pooling (written as matrix products so that it exports) is adaptive average pooling."""
    features = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(
        adaptive_pool(features, grid), torch.nn.functional.adaptive_avg_pool2d(features, grid)
    )
    assert adaptive_pool(features, size) is features


def test_loss_ignores_prefix_and_padding(random_model: CaptionModel, pixels: torch.Tensor) -> None:
    tok = random_model.tokenizer
    input_ids, mask = tok.batch_encode(TARGETS[:2], max_tokens=24)  # row 0 is padded
    n0 = int(mask[0].sum())
    out = random_model(input_ids, mask, pixels=pixels[:2])
    assert out.logits.shape == (*input_ids.shape, len(tok))  # caption positions only, no prefix

    # Row 0 alone without padding has the same per-token loss as inside the padded batch.
    alone = random_model(input_ids[:1, :n0], mask[:1, :n0], pixels=pixels[:1])
    torch.testing.assert_close(alone.logits, out.logits[:1, :n0], atol=1e-5, rtol=1e-5)

    # Whatever sits in padded positions does not change the loss.
    garbage = input_ids.clone()
    garbage[0, n0:] = 7
    assert out.loss is not None
    torch.testing.assert_close(random_model(garbage, mask, pixels=pixels[:2]).loss, out.loss)

    # The loss is the mean cross-entropy over caption tokens 1..T-1 where the mask is 1, nothing else.
    logp = torch.log_softmax(out.logits[:, :-1], dim=-1).gather(2, input_ids[:, 1:, None])[..., 0]
    keep = mask[:, 1:].bool()
    torch.testing.assert_close(out.loss, -logp[keep].mean())
    assert int(keep.sum()) == int(mask.sum()) - 2  # BOS of each row is never a target

    # Explicit labels: -100 everywhere but one token scores exactly that token.
    labels = torch.full_like(input_ids, -100)
    labels[1, 3] = input_ids[1, 3]
    single = random_model(input_ids, mask, labels, pixels=pixels[:2]).loss
    torch.testing.assert_close(single, -logp[1, 2])


def test_overfit_one_batch(trained: tuple[CaptionModel, list[float]], pixels: torch.Tensor) -> None:
    model, losses = trained
    assert losses[-1] < 0.1 * losses[0]
    assert [c.text for c in model.generate(pixels)] == TARGETS


# --------------------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("num_beams", [1, 3])
def test_kv_cache_matches_full_recompute(
    trained: tuple[CaptionModel, list[float]],
    random_model: CaptionModel,
    pixels: torch.Tensor,
    num_beams: int,
) -> None:
    for model in (trained[0], random_model):
        kwargs: dict[str, Any] = {
            "num_beams": num_beams,
            "repetition_penalty": 1.3,
            "no_repeat_ngram_size": 3,
        }
        cached = model.generate(pixels, use_cache=True, **kwargs)
        full = model.generate(pixels, use_cache=False, **kwargs)
        assert [c.token_ids for c in cached] == [c.token_ids for c in full]
        for a, b in zip(cached, full, strict=True):
            assert a.confidence == pytest.approx(b.confidence, abs=1e-5)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_batched_equals_one_by_one(
    trained: tuple[CaptionModel, list[float]], pixels: torch.Tensor, num_beams: int
) -> None:
    model = trained[0]
    batched = model.generate(pixels, num_beams=num_beams)
    assert len({c.n_tokens for c in batched}) == 3  # rows finish at different steps
    for i, caption in enumerate(batched):
        (single,) = model.generate(pixels[i : i + 1], num_beams=num_beams)
        assert single.token_ids == caption.token_ids
        assert single.confidence == pytest.approx(caption.confidence, abs=1e-5)


def test_confidence_is_the_mean_token_log_prob(
    trained: tuple[CaptionModel, list[float]], random_model: CaptionModel, pixels: torch.Tensor
) -> None:
    model = trained[0]
    tok = model.tokenizer
    for num_beams in (1, 3):
        for i, caption in enumerate(model.generate(pixels, num_beams=num_beams)):
            assert caption.confidence <= 0.0
            assert caption.n_tokens == len(caption.token_ids)
            assert caption.text == tok.decode(caption.token_ids)
            # Teacher-force the caption + EOS and average the log-probs of those tokens.
            ids = torch.tensor([[tok.bos_id, *caption.token_ids, tok.eos_id]])
            with torch.no_grad():
                logits = model(ids, pixels=pixels[i : i + 1]).logits
            logp = torch.log_softmax(logits[0, :-1], dim=-1).gather(1, ids[0, 1:, None])
            assert caption.confidence == pytest.approx(float(logp.mean()), abs=1e-4)
    # The overfit model is sure of its captions, an untrained one is not.
    unsure = max(c.confidence for c in random_model.generate(pixels))
    assert unsure < min(c.confidence for c in model.generate(pixels))


def test_length_controls(trained: tuple[CaptionModel, list[float]], pixels: torch.Tensor) -> None:
    model = trained[0]
    for num_beams in (1, 3):
        capped = model.generate(pixels, max_new_tokens=2, num_beams=num_beams)
        assert all(c.n_tokens <= 2 for c in capped)
        natural = model.generate(pixels, num_beams=num_beams)
        shortest = min(c.n_tokens for c in natural)
        floor = shortest + 3
        longer = model.generate(pixels, min_new_tokens=floor, max_new_tokens=16, num_beams=num_beams)
        assert all(c.n_tokens >= floor for c in longer)


def test_length_penalty_steers_beam_search(tok: CaptionTokenizer, pixels: torch.Tensor) -> None:
    torch.manual_seed(2)  # an untrained decoder whose beams end (EOS) at different lengths
    model = CaptionModel(tiny_config(), tok).eval()
    short = [c.n_tokens for c in model.generate(pixels, num_beams=4, length_penalty=-3.0)]
    long = [c.n_tokens for c in model.generate(pixels, num_beams=4, length_penalty=3.0)]
    assert all(s <= n for s, n in zip(short, long, strict=True)) and sum(short) < sum(long)


def test_repetition_controls(random_model: CaptionModel, pixels: torch.Tensor) -> None:
    def repeats(captions: list) -> int:
        return sum(c.n_tokens - len(set(c.token_ids)) for c in captions)

    for num_beams in (1, 3):
        plain = random_model.generate(pixels, num_beams=num_beams)
        assert repeats(plain) > 0  # an untrained decoder loops
        blocked = random_model.generate(pixels, num_beams=num_beams, no_repeat_ngram_size=1)
        assert repeats(blocked) == 0
        penalised = random_model.generate(pixels, num_beams=num_beams, repetition_penalty=5.0)
        assert repeats(penalised) < repeats(plain)


def test_decoding_arguments_are_checked(random_model: CaptionModel, pixels: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="n_positions"):
        random_model.generate(pixels, max_new_tokens=100)
    with pytest.raises(ValueError, match="num_beams"):
        random_model.generate(pixels, num_beams=0)


# ------------------------------------------------------------------------------- LoRA, paper-shaped


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory, tok: CaptionTokenizer) -> Path:
    """A small GPT-2 saved with save_pretrained (+ its tokenizer): stands in for gpt2-medium."""
    path = tmp_path_factory.mktemp("gpt2-small-test")
    torch.manual_seed(1)
    config = GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=2)
    GPT2LMHeadModel(config).save_pretrained(path)
    tok.save(path)
    return path


def paper_shaped(gpt2_dir: Path) -> CaptionConfig:
    """``paper.yaml`` with reduced sizes: tiny encoder, transformer mapping, LoRA r=4 on a local GPT-2."""
    return CaptionConfig.from_yaml(
        CONFIGS / "paper.yaml",
        [
            "encoder.name=tiny",
            "encoder.pretrained=false",
            "prefix_len=4",
            "mapping.hidden=64",
            "mapping.num_layers=1",
            "mapping.num_heads=2",
            "mapping.grid=4",
            "mapping.dropout=0.0",
            f"decoder.pretrained={gpt2_dir}",
            "decoder.n_positions=64",
            "decoder.dropout=0.0",
            "lora.r=4",
            "lora.dropout=0.0",
            "tokenizer.max_caption_tokens=24",
            "decoding.max_new_tokens=12",
        ],
    )


def test_lora_wiring_and_merge(gpt2_dir: Path, pixels: torch.Tensor) -> None:
    torch.manual_seed(0)
    model, tok = build_caption_model(paper_shaped(gpt2_dir))
    assert model.lora_active
    # The resolved config holds the sizes actually loaded, so an artifact rebuilds without the base.
    assert (model.config.decoder.n_layer, model.config.decoder.n_embd, model.config.decoder.n_positions) == (
        2,
        32,
        64,
    )
    base = GPT2LMHeadModel.from_pretrained(gpt2_dir)
    loaded = model.base_decoder.state_dict()
    for key, value in base.state_dict().items():
        wrapped = key.replace("c_attn.", "c_attn.base_layer.").replace("c_proj.", "c_proj.base_layer.")
        assert torch.equal(loaded[wrapped], value), key  # pretrained weights really loaded

    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or n.startswith("mapping.") for n in trainable)
    assert any(n.startswith("mapping.") for n in trainable)
    assert any(".c_attn.lora_A" in n for n in trainable) and any(".c_proj.lora_B" in n for n in trainable)

    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    input_ids, mask = tok.batch_encode(TARGETS, max_tokens=24)
    for _ in range(2):
        loss = model(input_ids, mask, pixels=pixels).loss
        assert loss is not None
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], value) for n, value in frozen.items())  # base GPT-2 + encoder untouched
    assert all(not torch.equal(after[n], value) for n, value in before.items())  # every adapter moved

    logits = model(input_ids, mask, pixels=pixels).logits
    captions = model.generate(pixels, num_beams=2)
    model.merge_lora()
    assert not model.lora_active and isinstance(model.decoder, GPT2LMHeadModel)
    torch.testing.assert_close(model(input_ids, mask, pixels=pixels).logits, logits, atol=1e-5, rtol=0)
    assert [c.token_ids for c in model.generate(pixels, num_beams=2)] == [c.token_ids for c in captions]


def test_from_scratch_decoder_trains_whole(random_model: CaptionModel) -> None:
    assert not random_model.lora_active
    decoder_params = list(random_model.decoder.parameters())
    assert decoder_params and all(p.requires_grad for p in decoder_params)
