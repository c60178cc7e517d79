"""The static decoder: Hugging Face step logits and captions, in-place cache, bucket padding, bf16.

CPU tests run the real code on the ``tiny`` preset (a 2-layer, 32-wide GPT-2); the CUDA-graph branch needs a
GPU and its tests are marked ``gpu`` (skipped here: no CUDA device in this environment).
"""

from __future__ import annotations

import copy
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch

from snap2caption.models.caption.config import CaptionConfig
from snap2caption.models.caption.model import CaptionModel
from snap2caption.models.caption.static import StaticDecoder, StaticKVCache, default_buckets
from snap2caption.models.caption.tokenizer import CaptionTokenizer
from tests.snap2caption.models.caption.conftest import TARGETS, TINY

# peft calls a transformers method that warns about its own deprecation (the LoRA case below).
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
CUDA = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA device; the CUDA-graph branch is unmeasured without one",
)


@pytest.fixture(scope="module")
def trained(tok: CaptionTokenizer, pixels: torch.Tensor) -> CaptionModel:
    """A tiny model fit to one caption per image: peaked distributions, so bf16 cannot flip a near-tie."""
    torch.manual_seed(0)
    model = CaptionModel(CaptionConfig.from_yaml(TINY), tok).train()
    input_ids, mask = tok.batch_encode(TARGETS, max_tokens=24)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(200):
        loss = model(input_ids, mask, pixels=pixels).loss
        assert loss is not None
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.05:
            break
    model.eval()
    assert [c.text for c in model.generate(pixels)] == TARGETS
    return model


def attached(model: CaptionModel, **kwargs: Any) -> tuple[CaptionModel, StaticDecoder]:
    """A copy of ``model`` with a static decoder attached (the original keeps the Hugging Face step)."""
    copy_ = copy.deepcopy(model)
    options: dict[str, Any] = {"max_batch": 16, "max_new_tokens": 24, "dtype": torch.float32, **kwargs}
    return copy_, StaticDecoder.attach(copy_, **options)


def prompt_of(model: CaptionModel, pixels: torch.Tensor) -> torch.Tensor:
    """(B, P + 1, D) prefix + BOS, as generate() builds it."""
    prefix = model.encode(pixels)
    bos = torch.full((prefix.shape[0], 1), model.tokenizer.bos_id)
    return torch.cat([prefix, model.embed_tokens(bos)], dim=1)


# ----------------------------------------------------------------------------------------- float32


@torch.no_grad()
def test_static_step_matches_hugging_face_logits(
    random_model: CaptionModel, trained: CaptionModel, pixels: torch.Tensor
) -> None:
    for model in (random_model, trained):
        static_model, static = attached(model)
        prompt = prompt_of(model, pixels)
        want, hf_cache = model.step(prompt)
        got, cache = static_model.step(prompt)
        assert cache is static.cache and cache.length == prompt.shape[1] and cache.batch == 3
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
        for _ in range(6):  # one-token steps on the cache, fed the argmax like greedy decoding
            nxt = model.embed_tokens(want.argmax(-1)[:, None])  # (3, 1, D)
            want, hf_cache = model.step(nxt, hf_cache)
            got, cache = static_model.step(nxt, cache)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
        assert cache is not None and cache.length == prompt.shape[1] + 6
        # Without the cache the whole sequence is fed each time; same logits.
        full, none = static_model.step(prompt, None, use_cache=False)
        assert none is None
        torch.testing.assert_close(full, model.step(prompt, None, use_cache=False)[0], rtol=0, atol=1e-4)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_generate_gives_the_same_captions(
    random_model: CaptionModel, trained: CaptionModel, pixels: torch.Tensor, num_beams: int
) -> None:
    kwargs: dict[str, Any] = {
        "num_beams": num_beams,
        "repetition_penalty": 1.3,
        "no_repeat_ngram_size": 3,
        "min_new_tokens": 4,
        "max_new_tokens": 16,
    }
    for model in (random_model, trained):
        static_model, _ = attached(model)
        want = model.generate(pixels, **kwargs)
        got = static_model.generate(pixels, **kwargs)
        assert [c.token_ids for c in got] == [c.token_ids for c in want]
        assert [c.confidence for c in got] == pytest.approx([c.confidence for c in want], abs=1e-4)
        assert all(c.n_tokens >= 4 for c in got)
        # The full-recompute path of the loop runs on the static step too.
        uncached = static_model.generate(pixels, use_cache=False, **kwargs)
        assert [c.token_ids for c in uncached] == [c.token_ids for c in want]


# ---------------------------------------------------------------------------------- cache, buckets


def test_reorder_cache_is_in_place() -> None:
    cache = StaticKVCache(2, 8, 2, 10, 4, torch.float32, torch.device("cpu"))
    cache.reset(3)
    cache.length = 5
    cache.keys.normal_()
    cache.values.normal_()
    keys_ptr, values_ptr = cache.keys.data_ptr(), cache.values.data_ptr()
    before_k, before_v = cache.keys.clone(), cache.values.clone()
    rows = torch.tensor([2, 0, 0, 1, 2, 2])  # grows 3 -> 6 rows, like beam search's first expansion
    cache.reorder_cache(rows)
    assert cache.batch == 6
    assert (cache.keys.data_ptr(), cache.values.data_ptr()) == (keys_ptr, values_ptr)
    torch.testing.assert_close(cache.keys[:, :6, :, :5], before_k[:, rows, :, :5], rtol=0, atol=0)
    torch.testing.assert_close(cache.values[:, :6, :, :5], before_v[:, rows, :, :5], rtol=0, atol=0)
    assert torch.equal(cache.keys[:, :, :, 5:], before_k[:, :, :, 5:])  # unwritten positions untouched
    cache.reorder_cache(torch.tensor([5, 4, 3, 2, 1, 0]))  # same size, reversed
    torch.testing.assert_close(cache.keys[:, :6, :, :5], before_k[:, rows.flip(0), :, :5], rtol=0, atol=0)
    with pytest.raises(ValueError, match="do not fit"):
        cache.reorder_cache(torch.zeros(9, dtype=torch.long))


def test_default_buckets() -> None:
    assert default_buckets(1) == [1]
    assert default_buckets(512) == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
    assert default_buckets(24) == [1, 2, 4, 8, 16, 24]
    with pytest.raises(ValueError):
        default_buckets(0)


@torch.no_grad()
def test_padding_to_a_bucket_gives_the_same_rows(random_model: CaptionModel, pixels: torch.Tensor) -> None:
    exact_model, exact = attached(random_model, max_batch=3, buckets=[3])  # 3 rows run as 3
    padded_model, padded = attached(random_model, max_batch=16)  # 3 rows run padded to 4
    assert padded._bucket(3) == 4 and exact._bucket(3) == 3
    # Garbage in the pad row's input and cache: it must not leak into the live rows.
    padded._x.normal_(0, 100)
    padded.cache.keys[:, 3:].normal_(0, 100)
    padded.cache.values[:, 3:].normal_(0, 100)
    prompt = prompt_of(random_model, pixels)
    a, cache_a = exact_model.step(prompt)
    b, cache_b = padded_model.step(prompt)
    for _ in range(5):
        nxt = random_model.embed_tokens(a.argmax(-1)[:, None])
        a, cache_a = exact_model.step(nxt, cache_a)
        b, cache_b = padded_model.step(nxt, cache_b)
        assert b.shape == a.shape == (3, random_model.config.decoder.vocab_size)
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)


def test_limits_are_refused(random_model: CaptionModel, pixels: torch.Tensor, tok: CaptionTokenizer) -> None:
    static_model, static = attached(random_model, max_batch=4, max_new_tokens=8)
    with pytest.raises(ValueError, match="max_batch"):
        static_model.generate(pixels, num_beams=3)  # 3 images x 3 beams = 9 rows > 4
    with pytest.raises(ValueError, match="static cache"):
        static_model.generate(pixels, max_new_tokens=12, min_new_tokens=12)
    assert len(static_model.generate(pixels, max_new_tokens=8, min_new_tokens=8)) == 3
    with torch.no_grad(), pytest.raises(ValueError, match="does not belong"):
        static_model.step(prompt_of(random_model, pixels), object())
    lora = CaptionModel(CaptionConfig.from_yaml(TINY), tok, apply_lora=True).eval()
    with pytest.raises(ValueError, match="merge LoRA"):
        StaticDecoder.attach(lora, max_batch=4, max_new_tokens=8)
    lora.merge_lora()
    StaticDecoder.attach(lora, max_batch=4, max_new_tokens=8, dtype=torch.float32)
    assert static.graphs == {}  # CPU: the same step, run eagerly
    conv = next(m for m in static_model.encoder.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.kernel_size != (1, 1) and conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_concurrent_generate_calls_are_serialised(random_model: CaptionModel, pixels: torch.Tensor) -> None:
    # A batcher with batch_concurrency > 1 calls generate from several threads; the one cache must not mix.
    static_model, _ = attached(random_model)
    jobs = [(pixels[i % 3 : i % 3 + 1 + i % 2], 1 + 2 * (i % 2)) for i in range(6)]  # (images, beams)
    want = [[c.token_ids for c in random_model.generate(x, num_beams=k)] for x, k in jobs]
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = [pool.submit(static_model.generate, x, num_beams=k) for x, k in jobs]
        got = [[c.token_ids for c in f.result()] for f in futures]
    assert got == want


# -------------------------------------------------------------------------------------------- bf16


@torch.no_grad()
def test_bfloat16_agrees_with_float32(
    random_model: CaptionModel, trained: CaptionModel, pixels: torch.Tensor
) -> None:
    # Logits: bf16 keeps 8 mantissa bits; this model's logits are ~0.3 in size, measured error ~2e-3.
    bf16_model, bf16 = attached(random_model, dtype=torch.bfloat16)
    assert bf16.cache.keys.dtype == torch.bfloat16
    assert bf16_model.base_decoder.transformer.wte.weight.dtype == torch.bfloat16
    prompt = prompt_of(random_model, pixels)
    want, hf_cache = random_model.step(prompt)
    got, cache = bf16_model.step(prompt)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=1e-2)
    for _ in range(3):
        nxt = random_model.embed_tokens(want.argmax(-1)[:, None])
        want, hf_cache = random_model.step(nxt, hf_cache)
        got, cache = bf16_model.step(nxt, cache)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-2)
    # Tokens: on a trained model (clear winners) greedy and beam search pick the same captions.
    trained_bf16, _ = attached(trained, dtype=torch.bfloat16)
    for num_beams in (1, 3):
        want_c = trained.generate(pixels, num_beams=num_beams)
        got_c = trained_bf16.generate(pixels, num_beams=num_beams)
        assert [c.text for c in got_c] == TARGETS == [c.text for c in want_c]
        assert [c.confidence for c in got_c] == pytest.approx([c.confidence for c in want_c], abs=5e-3)


# -------------------------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graphs_replay_the_eager_static_step(
    random_model: CaptionModel, trained: CaptionModel, pixels: torch.Tensor, dtype: torch.dtype
) -> None:
    for model in (random_model, trained):
        base = copy.deepcopy(model).cuda()
        graph_model, graphed = attached(base, dtype=dtype, cuda_graphs=True)
        eager_model, eager = attached(base, dtype=dtype, cuda_graphs=False)
        assert sorted(graphed.graphs) == graphed.buckets == [1, 2, 4, 8, 16] and eager.graphs == {}
        x = pixels.cuda()
        with torch.no_grad():
            prefix = graph_model.encode(x)  # channels-last encoder, bf16 autocast when dtype is bf16
            assert prefix.dtype == dtype
            torch.testing.assert_close(prefix.float(), base.encode(x), rtol=0.05, atol=0.05)
            prompt = prompt_of(eager_model, x)
            a, cache_a = eager_model.step(prompt)
            b, cache_b = graph_model.step(prompt)
            for _ in range(5):  # the replayed one-token steps
                nxt = eager_model.embed_tokens(a.argmax(-1)[:, None])
                a, cache_a = eager_model.step(nxt, cache_a)
                b, cache_b = graph_model.step(nxt, cache_b)
                torch.testing.assert_close(b, a, rtol=0, atol=1e-3)
        for num_beams in (1, 3):  # beam search reorders the cache under the captured graphs
            want = eager_model.generate(x, num_beams=num_beams, repetition_penalty=1.3)
            got = graph_model.generate(x, num_beams=num_beams, repetition_penalty=1.3)
            assert [c.token_ids for c in got] == [c.token_ids for c in want]
            assert [c.confidence for c in got] == pytest.approx([c.confidence for c in want], abs=1e-3)
        if dtype == torch.float32:  # and the fp32 graphs decode as the Hugging Face step does
            hf = base.generate(x, num_beams=3)
            assert [c.token_ids for c in graph_model.generate(x, num_beams=3)] == [c.token_ids for c in hf]
