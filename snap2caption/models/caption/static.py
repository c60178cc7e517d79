"""The caption model's GPU decode path: a static-shape KV cache, our own GPT-2 step, CUDA graphs, bf16.

Hugging Face's per-step call (:meth:`CaptionModel.step`) spends almost all of its time at small batches
launching kernels and growing its cache, not computing: GPT-2 Medium's weights stream in about 0.25 ms on an
H100, while 20 eager greedy tokens take 294 ms (DESIGN.md, "Measured here"). This module removes that overhead
without touching the decoding loop:

- :class:`StaticKVCache` preallocates keys and values, (L, N_max, H, T_max, Dh) each, in the decoder's dtype
  on its device; a step writes its positions in place and beam search reorders rows in place, so every
  tensor a captured graph reads or writes keeps its address for the whole life of the decoder;
- :class:`StaticDecoder` runs GPT-2's forward itself over the Hugging Face module's weights (same
  arithmetic as ``transformers.models.gpt2.modeling_gpt2`` in eval mode: pre-LN blocks, fused QKV
  ``Conv1D`` with (in, out) weights, scaled dot-product attention with the softmax in float32,
  ``gelu_new``, final LayerNorm, tied LM head). Every call attends over all T_max cache slots with an
  additive mask built from the position ids, so the one-token step has one static shape per batch size. On
  CUDA that step is captured once per padded batch bucket (1, 2, 4, ... max_batch) as a CUDA graph and
  replayed; the prompt (P + 1 positions) runs uncaptured. :meth:`StaticDecoder.attach` points
  ``model.encode`` / ``model.step`` here, so greedy and beam search stay :meth:`CaptionModel.generate`'s one
  loop.

The captured graph is our own code, not Hugging Face ``generate`` with its static cache under
``torch.compile(mode="reduce-overhead")``, which was seen to fail on an H100 ("accessing tensor output of
CUDAGraphs that has been overwritten"): here every replay's outputs are copied out before they are handed on.

Measured state: the float32 and bfloat16 arithmetic, the cache and the bucket padding are tested on CPU
(``tests/snap2caption/models/caption/test_static.py``); the CUDA graph branch (:meth:`StaticDecoder._capture`)
and the channels-last bf16 encoder have not run in this repository's sessions (no GPU was available); their
tests are marked ``gpu`` and ``bench/gpu_decode.py`` measures them where a GPU is.

One decoder serves one ``generate`` call at a time: its cache and static inputs are single buffers, so
:meth:`StaticDecoder.attach` wraps ``model.generate`` in the decoder's lock (a batcher running several
batches at once queues them on it; on one GPU they would share the device anyway).
"""

from __future__ import annotations

import functools
import logging
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from transformers import GPT2LMHeadModel

    from snap2caption.models.caption.model import CaptionModel

logger = logging.getLogger(__name__)

# GPT-2 activations we compute ourselves; "gelu_new" is the tanh approximation (transformers'
# NewGELUActivation), which F.gelu(approximate="tanh") computes in one fused kernel.
_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}


def default_buckets(max_batch: int) -> list[int]:
    """Padded batch sizes to capture: powers of two below ``max_batch``, then ``max_batch`` itself.

    ``default_buckets(512) == [1, 2, 4, ..., 512]``, ``default_buckets(24) == [1, 2, 4, 8, 16, 24]``.
    """
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    buckets = [1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch]
    return [*buckets, max_batch]


class StaticKVCache:
    """Preallocated keys and values for every layer, reordered in place.

    Args:
        n_layer: L.
        max_batch: N_max, the most rows (images x beams) at once.
        n_head: H.
        max_len: T_max, the most positions (prefix + BOS + generated tokens).
        head_dim: Dh.
        dtype: Buffer dtype (the decoder's).
        device: Buffer device (the decoder's).

    Attributes:
        keys: (L, N_max, H, T_max, Dh) key buffer; rows ``[:batch]`` and positions ``[:length]`` are live.
        values: (L, N_max, H, T_max, Dh) value buffer, laid out like ``keys``.
        length: Positions written so far.
        batch: Live rows.
    """

    def __init__(
        self,
        n_layer: int,
        max_batch: int,
        n_head: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (n_layer, max_batch, n_head, max_len, head_dim)
        # Normal tensors even when built inside inference_mode: generate() runs under no_grad, and inference
        # tensors cannot be updated in place outside inference mode.
        with torch.inference_mode(False), torch.no_grad():
            # Zeros, not empty: masked positions are multiplied by a zero weight, and 0 * NaN would be NaN.
            self.keys = torch.zeros(shape, dtype=dtype, device=device)
            self.values = torch.zeros(shape, dtype=dtype, device=device)
            # One flat scratch buffer for reorder_cache: its front, viewed as (L, n, H, t, Dh), is contiguous.
            self._scratch = torch.empty(self.keys.numel(), dtype=dtype, device=device)
        self.length = 0
        self.batch = 0

    @property
    def max_batch(self) -> int:
        return int(self.keys.shape[1])

    @property
    def max_len(self) -> int:
        return int(self.keys.shape[3])

    def reset(self, batch: int) -> None:
        """Start a new sequence of ``batch`` rows (nothing is cleared: positions >= length are masked)."""
        if not 1 <= batch <= self.max_batch:
            raise ValueError(
                f"batch of {batch} rows does not fit the static cache (max_batch {self.max_batch})"
            )
        self.length = 0
        self.batch = batch

    def get_seq_length(self) -> int:
        """Positions written so far (Hugging Face's cache method name)."""
        return self.length

    def reorder_cache(self, rows: Tensor) -> None:
        """Row ``i`` becomes old row ``rows[i]`` (beams expand, move and die), in place.

        The live block is gathered into the scratch buffer, then copied back over the buffer's front, so
        ``keys`` and ``values`` keep their storage (and every captured graph its pointers).

        Args:
            rows: (N_new,) long indices into the current live rows; N_new <= N_max.
        """
        n_new, t = int(rows.numel()), self.length
        if n_new > self.max_batch:
            raise ValueError(f"{n_new} rows do not fit the static cache (max_batch {self.max_batch})")
        rows = rows.to(self.keys.device)
        shape = (self.keys.shape[0], n_new, self.keys.shape[2], t, self.keys.shape[4])
        gathered = self._scratch[: math.prod(shape)].view(shape)  # (L, N_new, H, t, Dh), contiguous
        with torch.no_grad():
            for buffer in (self.keys, self.values):
                torch.index_select(buffer[:, : self.batch, :, :t], 1, rows, out=gathered)
                buffer[:, :n_new, :, :t].copy_(gathered)
        self.batch = n_new


@dataclass
class _Layer:
    """One GPT-2 block's weights; ``Conv1D`` weights stay (in, out): ``y = b + x @ w``."""

    ln_1: tuple[Tensor, Tensor]
    c_attn: tuple[Tensor, Tensor]  # (D, 3D), (3D,)
    attn_proj: tuple[Tensor, Tensor]  # (D, D), (D,)
    ln_2: tuple[Tensor, Tensor]
    c_fc: tuple[Tensor, Tensor]  # (D, F), (F,)
    mlp_proj: tuple[Tensor, Tensor]  # (F, D), (D,)
    scaling: float


def _layer(block: Any) -> _Layer:
    """A transformers ``GPT2Block``'s weights (shared, not copied)."""
    return _Layer(
        ln_1=(block.ln_1.weight, block.ln_1.bias),
        c_attn=(block.attn.c_attn.weight, block.attn.c_attn.bias),
        attn_proj=(block.attn.c_proj.weight, block.attn.c_proj.bias),
        ln_2=(block.ln_2.weight, block.ln_2.bias),
        c_fc=(block.mlp.c_fc.weight, block.mlp.c_fc.bias),
        mlp_proj=(block.mlp.c_proj.weight, block.mlp.c_proj.bias),
        scaling=float(block.attn.scaling),
    )


def _conv1d(x: Tensor, weight_bias: tuple[Tensor, Tensor]) -> Tensor:
    """transformers' ``Conv1D``: (..., in) -> (..., out) with a (in, out) weight."""
    weight, bias = weight_bias
    return torch.addmm(bias, x.reshape(-1, x.shape[-1]), weight).view(*x.shape[:-1], weight.shape[1])


def _attention(q: Tensor, keys: Tensor, values: Tensor, mask: Tensor, scaling: float) -> Tensor:
    """Masked attention over all T_max cache slots, softmax in float32.

    Written out rather than ``F.scaled_dot_product_attention``: with one query and a few dozen keys the
    matmuls are tiny either way, and plain matmul + softmax kernels are known to capture in CUDA graphs on
    every device, with no backend choice (flash / memory-efficient / cuDNN) made behind the mask's back.

    Args:
        q: (n, H, S, Dh) queries.
        keys: (n, H, T_max, Dh) cache keys.
        values: (n, H, T_max, Dh) cache values.
        mask: (1, 1, S, T_max) float32, 0 where visible and -inf elsewhere.
        scaling: Score scale (``GPT2Attention.scaling``: 1 / sqrt(Dh) by default).

    Returns:
        (n, H, S, Dh) attention output in the values' dtype.
    """
    scores = torch.matmul(q, keys.transpose(-1, -2)).float() * scaling + mask  # (n, H, S, T_max)
    return torch.matmul(torch.softmax(scores, dim=-1).to(values.dtype), values)


class StaticDecoder:
    """GPT-2 decoding over a static KV cache, with the one-token step replayed as CUDA graphs on CUDA.

    Build it with :meth:`attach`. Args are as there, plus:

    Args:
        decoder: The ``GPT2LMHeadModel`` (LoRA merged), already on its device and in ``dtype``, eval mode.
        max_len: T_max, positions the cache holds.
        buckets: Padded batch sizes, ascending, the last = ``max_batch``; default :func:`default_buckets`.

    Attributes:
        cache: The one :class:`StaticKVCache`.
        buckets: Padded batch sizes of the one-token step.
        graphs: Bucket -> captured graph (empty off CUDA or with ``cuda_graphs=False``).
        lock: Held by the attached ``model.generate`` for a whole call.
    """

    def __init__(
        self,
        decoder: GPT2LMHeadModel,
        *,
        max_batch: int,
        max_len: int,
        cuda_graphs: bool = True,
        buckets: Sequence[int] | None = None,
    ) -> None:
        config = decoder.config
        if getattr(config, "add_cross_attention", False) or config.reorder_and_upcast_attn:
            raise ValueError("the static decoder implements plain GPT-2 (no cross-attention, no upcast attn)")
        if config.activation_function not in _ACTIVATIONS:
            raise ValueError(f"activation {config.activation_function!r} is not supported by the static step")
        if max_len > config.n_positions:
            raise ValueError(f"max_len {max_len} exceeds the decoder's n_positions ({config.n_positions})")
        first = next(decoder.parameters())
        self.device, self.dtype = first.device, first.dtype
        self.n_embd, self.n_head = int(config.n_embd), int(config.n_head)
        self.eps = float(config.layer_norm_epsilon)
        self.act = _ACTIVATIONS[config.activation_function]
        gpt = decoder.transformer
        self.wpe = gpt.wpe.weight  # (n_positions, D)
        self.ln_f = (gpt.ln_f.weight, gpt.ln_f.bias)
        self.lm_head = decoder.lm_head.weight  # (V, D), tied to wte
        self.layers = [_layer(block) for block in gpt.h]
        self.buckets = sorted(buckets) if buckets is not None else default_buckets(max_batch)
        if self.buckets[-1] != max_batch or self.buckets[0] < 1:
            raise ValueError(f"buckets {self.buckets} must be >= 1 and end at max_batch ({max_batch})")
        self.cache = StaticKVCache(
            len(self.layers), max_batch, self.n_head, max_len, self.n_embd // self.n_head,
            self.dtype, self.device,
        )  # fmt: skip
        with torch.inference_mode(False), torch.no_grad():
            self._key_pos = torch.arange(max_len, device=self.device)  # (T_max,) position of each cache slot
            # Static inputs of the one-token step; bucket b reads rows [:b].
            self._x = torch.zeros(max_batch, 1, self.n_embd, dtype=self.dtype, device=self.device)
            self._pos = torch.zeros(1, dtype=torch.long, device=self.device)
        # One cache, one set of static inputs: attach() makes model.generate hold this for the whole call.
        self.lock = threading.Lock()
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._graph_out: dict[int, Tensor] = {}
        if cuda_graphs and self.device.type == "cuda":
            self._capture()
        elif cuda_graphs:
            logger.info(
                "static decoder on %s: CUDA graphs need CUDA, running the same step eagerly", self.device
            )

    # -------------------------------------------------------------------------------------- attach

    @classmethod
    def attach(
        cls,
        model: CaptionModel,
        max_batch: int,
        max_new_tokens: int,
        dtype: torch.dtype = torch.bfloat16,
        cuda_graphs: bool = True,
        buckets: Sequence[int] | None = None,
    ) -> StaticDecoder:
        """Make ``model.generate`` run on a static decoder (its decoding loop stays as it is).

        The model becomes a dedicated inference runtime: its GPT-2 decoder is cast to ``dtype`` in place
        (float32 shares the weights as they are), and its encoder switches to channels-last; on CUDA the
        encoder and mapping network run under bf16 autocast when ``dtype`` is bfloat16. Move the model to
        its device (``model.to("cuda")``) and call ``model.eval()`` first.

        Args:
            model: The caption model; LoRA must be merged (:meth:`CaptionModel.merge_lora`).
            max_batch: Most decoder rows at once: images x beams (beam search runs B * K rows).
            max_new_tokens: Most tokens a ``generate`` call may ask for; the cache holds
                P + 1 + max_new_tokens positions.
            dtype: Decoder (and cache) dtype: ``torch.bfloat16`` or ``torch.float32``.
            cuda_graphs: Capture the one-token step per bucket on CUDA; ignored (logged) elsewhere.
            buckets: Padded batch sizes; default powers of two up to ``max_batch``.

        Returns:
            The attached decoder (its ``cache``, ``buckets`` and ``graphs`` are inspectable).
        """
        if model.lora_active:
            raise ValueError("merge LoRA (model.merge_lora()) before attaching the static decoder")
        if dtype not in (torch.bfloat16, torch.float32):
            raise ValueError(f"dtype must be torch.bfloat16 or torch.float32, got {dtype}")
        if model.training:
            raise ValueError("call model.eval() first: the static step has no dropout")
        max_len = model.prefix_len + 1 + max_new_tokens
        decoder: Any = model.base_decoder
        decoder.to(dtype=dtype)  # in place; float32 -> float32 is a no-op
        static = cls(decoder, max_batch=max_batch, max_len=max_len, cuda_graphs=cuda_graphs, buckets=buckets)
        model.encoder.to(memory_format=torch.channels_last)
        model.encode = _static_encode(model.encode, dtype, static.device)  # type: ignore[method-assign]
        model.step = static.step  # type: ignore[method-assign]
        model.generate = _serialised(model.generate, static.lock)  # type: ignore[method-assign]
        return static

    # ---------------------------------------------------------------------------------------- step

    @torch.no_grad()
    def step(
        self, inputs_embeds: Tensor, cache: Any | None = None, *, use_cache: bool = True
    ) -> tuple[Tensor, StaticKVCache | None]:
        """:meth:`CaptionModel.step` on the static cache.

        Args:
            inputs_embeds: (N, S, D) new positions (the P + 1 prompt, then one token a step); without
                ``use_cache``, the whole sequence so far.
            cache: None to start a sequence, else the cache this decoder returned last.
            use_cache: Keep the positions for the next step.

        Returns:
            (N, V) float32 logits of the last position, and the cache (None without ``use_cache``).
        """
        x = inputs_embeds.to(device=self.device, dtype=self.dtype)
        n, s, _ = x.shape
        if cache is None or not use_cache:
            self.cache.reset(n)
        elif cache is not self.cache:
            raise ValueError("this cache does not belong to this static decoder")
        elif n != self.cache.batch:
            raise ValueError(f"{n} rows fed to a cache of {self.cache.batch} rows")
        start = self.cache.length
        if start + s > self.cache.max_len:
            raise ValueError(
                f"position {start + s} exceeds the static cache ({self.cache.max_len} positions): attach "
                "with a larger max_new_tokens"
            )
        if s == 1 and start > 0:
            logits = self._one_token(x, start)
        else:
            logits = self._forward(x, torch.arange(start, start + s, device=self.device))
        self.cache.length = start + s
        return logits, (self.cache if use_cache else None)

    def _bucket(self, n: int) -> int:
        for bucket in self.buckets:
            if bucket >= n:
                return bucket
        raise ValueError(f"batch of {n} rows exceeds the static decoder's max_batch ({self.buckets[-1]})")

    def _one_token(self, x: Tensor, position: int) -> Tensor:
        """The static-shape step: (n, 1, D) -> (n, V), padded to the bucket's rows, replayed or run.

        Rows ``[n:bucket]`` of the static input hold whatever an earlier step left there: each row attends
        only to its own cache row, so they change nothing in rows ``[:n]``, and their outputs are dropped.
        """
        n = x.shape[0]
        bucket = self._bucket(n)
        self._x[:n].copy_(x)
        self._pos.fill_(position)
        graph = self.graphs.get(bucket)
        if graph is None:
            return self._forward(self._x[:bucket], self._pos)[:n]
        graph.replay()
        # A copy: the graph's output is overwritten by the next replay.
        return self._graph_out[bucket][:n].clone()

    def _forward(self, x: Tensor, positions: Tensor) -> Tensor:
        """GPT-2 over new positions, keys/values written into the static cache.

        Args:
            x: (n, S, D) input embeddings of positions ``positions``; the cache's rows ``[:n]`` are used.
            positions: (S,) long absolute positions (ascending, contiguous).

        Returns:
            (n, V) float32 logits of the last position.
        """
        n, s, d = x.shape
        heads = self.n_head
        cache = self.cache
        hidden = x + F.embedding(positions, self.wpe)  # (n, S, D)
        # (1, 1, S, T_max) float32 additive mask: the query at position p sees cache slots 0..p (its own
        # just written); slots beyond are stale or empty and get zero weight.
        visible = self._key_pos[None, :] <= positions[:, None]  # (S, T_max)
        mask = torch.zeros(visible.shape, device=self.device).masked_fill(~visible, float("-inf"))[None, None]
        for i, layer in enumerate(self.layers):
            h = F.layer_norm(hidden, (d,), *layer.ln_1, eps=self.eps)
            qkv = _conv1d(h, layer.c_attn).view(n, s, 3, heads, d // heads)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (n, H, S, Dh)
            keys, values = cache.keys[i, :n], cache.values[i, :n]  # (n, H, T_max, Dh) views
            keys.index_copy_(2, positions, k)
            values.index_copy_(2, positions, v)
            attn = _attention(q, keys, values, mask, layer.scaling).transpose(1, 2).reshape(n, s, d)
            hidden = hidden + _conv1d(attn, layer.attn_proj)
            h = F.layer_norm(hidden, (d,), *layer.ln_2, eps=self.eps)
            hidden = hidden + _conv1d(self.act(_conv1d(h, layer.c_fc)), layer.mlp_proj)
        last = F.layer_norm(hidden[:, -1], (d,), *self.ln_f, eps=self.eps)  # (n, D)
        return F.linear(last, self.lm_head).float()  # (n, V)

    # ------------------------------------------------------------------------------ CUDA graphs

    def _capture(self) -> None:
        """Capture the one-token step for every bucket (largest first, one shared memory pool).

        Unmeasured in this repository's sessions (no GPU): the ``gpu``-marked tests and
        ``bench/gpu_decode.py`` exercise it on a CUDA machine.
        """
        pool = torch.cuda.graph_pool_handle()
        self.cache.reset(self.cache.max_batch)
        self._pos.fill_(1)
        with torch.inference_mode(False), torch.no_grad():
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):  # warm-up: lazy init, cuBLAS workspaces, kernel selection
                for bucket in self.buckets:
                    for _ in range(2):
                        self._forward(self._x[:bucket], self._pos)
            torch.cuda.current_stream(self.device).wait_stream(side)
            for bucket in reversed(self.buckets):
                graph = torch.cuda.CUDAGraph()
                # thread_local: a model swap captures while the old model keeps serving on other threads.
                with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                    self._graph_out[bucket] = self._forward(self._x[:bucket], self._pos)  # (bucket, V)
                self.graphs[bucket] = graph
        torch.cuda.synchronize(self.device)
        self.cache.reset(1)
        logger.info("static decoder: captured CUDA graphs for batch buckets %s", self.buckets)


def _static_encode(
    encode: Callable[..., Tensor], dtype: torch.dtype, device: torch.device
) -> Callable[..., Tensor]:
    """Wrap :meth:`CaptionModel.encode`: channels-last pixels on the model's device, bf16 autocast on CUDA.

    Off CUDA the encoder keeps float32 (CPU bf16 convolutions are slow without AMX); the (B, P, D) prefix
    is cast to the decoder's dtype either way.
    """
    autocast = device.type == "cuda" and dtype == torch.bfloat16

    def static_encode(pixels: Tensor | None = None, *, features: Tensor | None = None) -> Tensor:
        if pixels is not None:
            pixels = pixels.to(device=device, memory_format=torch.channels_last)
        if features is not None:
            features = features.to(device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            prefix = encode(pixels, features=features)  # (B, P, D)
        return prefix.to(dtype)

    return static_encode


def _serialised(generate: Callable[..., Any], lock: threading.Lock) -> Callable[..., Any]:
    """``generate`` holding ``lock`` for the whole call: the static cache lives from prompt to last token."""

    @functools.wraps(generate)
    def serialised_generate(*args: Any, **kwargs: Any) -> Any:
        with lock:
            return generate(*args, **kwargs)

    return serialised_generate
