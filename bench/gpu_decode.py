"""Caption decode speed: Hugging Face ``generate`` (eager) vs the static decoder (bf16 + CUDA graphs).

What is timed is one model call on pixels already on the device: encoder + mapping network + 20 greedy
tokens exactly (``min_new_tokens = max_new_tokens = 20``, so no row stops early), median of the repeats
after warm-up, CUDA synchronised around each call. Rows:

- latency, batch 1: Hugging Face ``GPT2LMHeadModel.generate`` on the prefix embeddings, eager float32
  (the baseline a user would otherwise run) vs :class:`~snap2caption.models.caption.static.StaticDecoder`
  attached to the same model (bf16, CUDA graphs on CUDA);
- throughput, batches 64..512: Hugging Face ``generate`` eager on a bfloat16 copy of the model (the
  strongest eager baseline) vs the static decoder, in images/s;
- agreement: the static decoder's tokens vs :meth:`CaptionModel.generate` with the Hugging Face step (the
  same decoding loop) in float32; equal in float32, a bf16 run may flip near-ties of a random model.

Every ratio is against a baseline measured in the same run; the figures go, with the machine (and the
GPU), load average, versions and arguments, to a JSON result (``bench/results/gpu_decode-<UTC time>.json``,
or ``--out``). ``--device cuda`` on a machine without a CUDA device is refused before anything runs.

Shapes: ``paper`` (ResNet-50 + transformer mapping + GPT-2 Medium, vocabulary 50257, random init:
``training/configs/caption/paper.yaml`` with ``encoder.pretrained=false decoder.pretrained=null
lora.enabled=false``), ``gpt2-small`` (the same with GPT-2 small's sizes) or ``smoke`` (a tiny model: what
CPU runs use so that the script itself is tested).
Nothing is downloaded: weights are random and the tokenizer is a BPE trained on a few captions.

GPU numbers are unmeasured here: no GPU was available in the session that wrote this script, and only the
CPU smoke run has been executed (tests/bench/test_gpu_decode.py). Targets (DESIGN.md,
one H100, paper shapes): batch-1 latency <= 15 ms (HF eager fp32: 294 ms), >= 4,000 images/s saturated
(HF eager bf16 at batch 512: 1,136/s).

    python bench/gpu_decode.py                      # CUDA: paper shapes; CPU: smoke shapes
    python bench/gpu_decode.py --shapes gpt2-small --batches 64,128,256,512 --repeats 10
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from snap2caption.models.caption.config import CaptionConfig
from snap2caption.models.caption.model import CaptionModel, build_caption_model
from snap2caption.models.caption.static import StaticDecoder

sys.path.insert(0, str(Path(__file__).resolve().parent))
from result_json import BenchRecord, add_out_argument

PAPER = Path(__file__).resolve().parents[1] / "training" / "configs" / "caption" / "paper.yaml"
RANDOM_INIT = ["encoder.pretrained=false", "decoder.pretrained=null", "lora.enabled=false"]
SHAPES: dict[str, list[str]] = {
    "paper": [*RANDOM_INIT, "decoder.vocab_size=50257"],
    "gpt2-small": [
        *RANDOM_INIT, "decoder.vocab_size=50257", "decoder.n_layer=12", "decoder.n_embd=768",
        "decoder.n_head=12",
    ],
    "smoke": [
        *RANDOM_INIT, "prefix_len=4", "encoder.name=tiny", "mapping.hidden=64", "mapping.num_layers=1",
        "mapping.num_heads=2", "mapping.grid=2", "decoder.n_layer=2", "decoder.n_embd=64", "decoder.n_head=2",
        "decoder.n_positions=64", "decoder.vocab_size=512", "tokenizer.vocab_size=300",
        "tokenizer.max_caption_tokens=24",
    ],
}  # fmt: skip
CAPTIONS = [
    "a red circle left of a blue square",
    "two green triangles below a yellow star",
    "a dog runs on the beach next to the sea",
    "a plate of food on a wooden table",
]


def build(shapes: str, device: torch.device) -> CaptionModel:
    """A random-init caption model of the named shapes, eval mode, on ``device``."""
    torch.manual_seed(0)
    config = CaptionConfig.from_yaml(PAPER, SHAPES[shapes])
    model, _ = build_caption_model(config, captions=CAPTIONS * 4)
    return model.eval().to(device)


def hf_generate(model: CaptionModel, pixels: Tensor, tokens: int) -> Tensor:
    """Hugging Face ``generate`` (greedy, its own dynamic cache) on the model's prefix: (B, tokens) ids."""
    prefix = model.encode(pixels)  # (B, P, D)
    tok = model.tokenizer
    bos = torch.full((prefix.shape[0], 1), tok.bos_id, dtype=torch.long, device=prefix.device)
    prompt = torch.cat([prefix, model.embed_tokens(bos)], dim=1)  # (B, P + 1, D)
    mask = torch.ones(prompt.shape[:2], dtype=torch.long, device=prompt.device)
    return model.base_decoder.generate(
        inputs_embeds=prompt, attention_mask=mask, max_new_tokens=tokens, min_new_tokens=tokens,
        do_sample=False, num_beams=1, pad_token_id=tok.pad_id, eos_token_id=tok.eos_id,
    )  # fmt: skip


def loop_generate(model: CaptionModel, pixels: Tensor, tokens: int) -> list[list[int]]:
    """:meth:`CaptionModel.generate`, greedy, exactly ``tokens`` tokens: token ids per image."""
    return [c.token_ids for c in model.generate(pixels, max_new_tokens=tokens, min_new_tokens=tokens)]


def seconds(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` after ``warmup`` calls, CUDA synchronised around each call."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Run the benchmark, print its table and write its JSON result.

    Returns:
        The measured values by name (``hf_b1_ms``, ``static_b1_ms``, ``hf_{B}_ips``, ``static_{B}_ips``,
        ``agreement``, ``attach_s``), for tests and scripts.

    Raises:
        SystemExit: ``--device cuda`` (or ``cuda:N``) where torch sees no CUDA device.
    """
    record = BenchRecord("gpu_decode")
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cuda or cpu")
    parser.add_argument("--shapes", choices=sorted(SHAPES), help="default: paper on CUDA, smoke on CPU")
    parser.add_argument("--batches", help="throughput batch sizes; default 64,128,256,512 (CUDA), 4 (CPU)")
    parser.add_argument("--tokens", type=int, default=20, help="greedy tokens generated, exactly")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-graphs", action="store_true", help="static decoder without CUDA graphs")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (1: see bench/models.py on shared cores)",
    )
    add_out_argument(parser)
    args = parser.parse_args(argv)
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if args.device == "auto" else args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error(
            f"--device {args.device}: torch sees no CUDA device (torch {torch.__version__}, "
            f"built for CUDA {torch.version.cuda or 'none'}); run it on a GPU machine, or with "
            "--device cpu for the smoke shapes (what the CPU tests run, not a GPU measurement)"
        )
    shapes = args.shapes or ("paper" if cuda else "smoke")
    batches = [int(b) for b in (args.batches or ("64,128,256,512" if cuda else "4")).split(",")]
    dtype = torch.bfloat16 if cuda else torch.float32  # CPU bf16 matmuls are slow without AMX
    tokens, repeats = args.tokens, args.repeats
    torch.set_num_threads(args.threads)

    model = build(shapes, device)
    g = model.config.decoder
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    sizes = f"L={g.n_layer} D={g.n_embd} V={g.vocab_size}, encoder={model.config.encoder.name}"
    print(
        f"device={name} torch={torch.__version__} shapes={shapes} ({sizes}) tokens={tokens} repeats={repeats}"
    )
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randn(max(batches), *model.preprocess.output_shape, generator=gen).to(device)
    one = pixels[:1]
    results: dict[str, float] = {}

    # Baselines first, while the model is still float32 (attaching casts its decoder in place).
    results["hf_b1_ms"] = 1000 * seconds(lambda: hf_generate(model, one, tokens), device, repeats)
    with torch.inference_mode():
        reference = loop_generate(model, pixels[: batches[0]], tokens)
    eager = copy.deepcopy(model).to(dtype)  # the throughput baseline, in the static decoder's dtype
    for b in batches:
        batch = pixels[:b].to(dtype)
        results[f"hf_{b}_ips"] = b / seconds(partial(hf_generate, eager, batch, tokens), device, repeats)
    del eager  # free its memory before the static decoder allocates

    start = time.perf_counter()
    StaticDecoder.attach(
        model, max_batch=max(batches), max_new_tokens=tokens, dtype=dtype, cuda_graphs=not args.no_graphs
    )
    attach_s = time.perf_counter() - start
    results["static_b1_ms"] = 1000 * seconds(lambda: loop_generate(model, one, tokens), device, repeats)
    for b in batches:
        batch = pixels[:b]
        results[f"static_{b}_ips"] = b / seconds(
            partial(loop_generate, model, batch, tokens), device, repeats
        )
    with torch.inference_mode():
        static_tokens = loop_generate(model, pixels[: batches[0]], tokens)
    same = sum(a == b for a, b in zip(static_tokens, reference, strict=True))
    results["agreement"] = same / len(reference)
    results["attach_s"] = attach_s

    label = f"static {str(dtype).removeprefix('torch.')}" + (
        "" if args.no_graphs or not cuda else " + graphs"
    )
    print(f"static decoder attach (cast, buffers, graph capture): {attach_s:.2f} s")
    print(f"\n{'latency, batch 1':<34}{'ms':>10}{'vs HF':>10}")
    print(f"{'HF generate eager fp32':<34}{results['hf_b1_ms']:>10.1f}{1.0:>9.2f}x")
    ratio = results["hf_b1_ms"] / results["static_b1_ms"]
    print(f"{label:<34}{results['static_b1_ms']:>10.1f}{ratio:>9.2f}x")
    print(f"\n{'throughput, images/s':<34}" + "".join(f"{f'batch {b}':>12}" for b in batches))
    hf_label = f"HF generate eager {str(dtype).removeprefix('torch.')}"
    print(f"{hf_label:<34}" + "".join(f"{results[f'hf_{b}_ips']:>12.1f}" for b in batches))
    print(f"{label:<34}" + "".join(f"{results[f'static_{b}_ips']:>12.1f}" for b in batches))
    ratios = "".join(f"{results[f'static_{b}_ips'] / results[f'hf_{b}_ips']:>11.2f}x" for b in batches)
    print(f"{'ratio static / HF':<34}{ratios}")
    print(f"\nagreement with the fp32 HF-step loop at batch {batches[0]}: {same}/{len(reference)} rows")
    config: dict[str, Any] = {
        **vars(args),
        "device_name": name,
        "shapes": shapes,
        "batches": batches,
        "dtype": str(dtype).removeprefix("torch."),
        "cuda_graphs": cuda and not args.no_graphs,
        "model_sizes": sizes,
    }
    record.write(results, config=config, out=args.out)
    return results


if __name__ == "__main__":
    main()
