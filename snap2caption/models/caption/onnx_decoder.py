"""GPT-2's decoder step written as an ONNX graph, node by node, for the caption export.

Why not trace it: the graph ``torch.onnx.export`` makes of Hugging Face's GPT-2 goes through transformers'
cache classes and mask helpers (the trace broke when their internals moved between releases) and holds about
1,200 nodes after ONNX Runtime's optimisations, 1,000 of them shape bookkeeping (Shape, Gather, Unsqueeze,
Concat, Reshape); its weights sit in ``Gemm`` nodes, which weight-only quantizers (``MatMulNBits``) skip.
Here each layer is the ~40 nodes of its arithmetic, the shapes come from ``Reshape``'s ``0`` (copy this
dimension), and every weight is the second input of a ``MatMul``. Per-step time measured against the trace:
the same within noise (the work is in the weights, not the bookkeeping; README "Serving performance").

The graph has the interface of the traced one (:mod:`~snap2caption.models.caption.export`)::

    inputs_embeds (N, S, D), past_keys / past_values (L, N, H, T, D/H)
    -> logits (N, V) of the last position, keys / values (L, N, H, T + S, D/H)

and the arithmetic of ``GPT2LMHeadModel`` in eval mode (no dropout, no attention mask: every row is a whole
sequence): position embeddings for positions T .. T + S - 1, pre-norm blocks, causal attention over the past
and the new positions scaled by 1/sqrt(D/H), the tanh GELU, the final norm, and the output layer on the last
position. ``tests/snap2caption/models/caption/test_export.py`` checks it against PyTorch: prefix, logits,
caches and captions (greedy and beam search), several new positions on a filled past.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from transformers import GPT2LMHeadModel

_GELU_TANH = ("gelu_new", "gelu_pytorch_tanh")
_ACTIVATIONS = (*_GELU_TANH, "gelu", "relu")


def unsupported(config: Any) -> list[str]:
    """What in a ``GPT2Config`` this graph does not implement (empty: it is exact)."""
    problems = []
    if config.activation_function not in _ACTIVATIONS:
        problems.append(f"activation {config.activation_function!r} (only {', '.join(_ACTIVATIONS)})")
    if not config.scale_attn_weights or config.scale_attn_by_inverse_layer_idx:
        problems.append("attention scaling other than 1/sqrt(head size)")
    if config.reorder_and_upcast_attn or getattr(config, "add_cross_attention", False):
        problems.append("reordered/upcast or cross attention")
    if config.n_embd % config.n_head:
        problems.append("n_embd not a multiple of n_head")
    return problems


class _Graph:
    """Nodes and initializers under construction, with unique names."""

    def __init__(self) -> None:
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self._count = 0

    def name(self, stem: str) -> str:
        self._count += 1
        return f"{stem}_{self._count}"

    def const(self, stem: str, value: np.ndarray) -> str:
        from onnx import numpy_helper

        name = self.name(stem)
        self.initializers.append(numpy_helper.from_array(np.array(value, order="C"), name))  # 0-d stays 0-d
        return name

    def op(
        self, op_type: str, inputs: list[str], stem: str | None = None, outputs: int = 1, **attrs: Any
    ) -> Any:
        from onnx import helper

        names = [self.name(stem or op_type) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, names, name=self.name(op_type), **attrs))
        return names[0] if outputs == 1 else names


def _np(tensor: Any) -> np.ndarray:
    return tensor.detach().float().cpu().numpy()


def build_decoder_step(gpt2: GPT2LMHeadModel, opset: int = 17) -> Any:
    """The ONNX ``ModelProto`` of one decoder step of ``gpt2`` (plain, LoRA merged, any size).

    Raises:
        ValueError: A configuration the graph does not implement (:func:`unsupported`).
    """
    from onnx import TensorProto, helper

    config = gpt2.config
    problems = unsupported(config)
    if problems:
        raise ValueError("cannot build the ONNX decoder step: " + "; ".join(problems))
    n_layer, heads, width = int(config.n_layer), int(config.n_head), int(config.n_embd)
    head = width // heads
    eps = float(config.layer_norm_epsilon)
    transformer = gpt2.transformer
    g = _Graph()

    # Positions T .. T+S-1, their embeddings, and which of the T+S keys each new position may see.
    shape_new = g.op("Shape", ["inputs_embeds"])
    new = g.op("Gather", [shape_new, g.const("one", np.array(1, np.int64))], axis=0)  # S
    past = g.op("Gather", [g.op("Shape", ["past_keys"]), g.const("three", np.array(3, np.int64))], axis=0)
    total = g.op("Add", [past, new])  # T + S
    step = g.const("step", np.array(1, np.int64))
    positions = g.op("Range", [past, total, step])  # (S,)
    key_positions = g.op("Range", [g.const("zero", np.array(0, np.int64)), total, step])  # (T+S,)
    visible = g.op(
        "LessOrEqual",
        [
            g.op("Unsqueeze", [key_positions, g.const("axis0", np.array([0], np.int64))]),  # (1, T+S)
            g.op("Unsqueeze", [positions, g.const("axis1", np.array([1], np.int64))]),  # (S, 1)
        ],
    )  # (S, T+S): key j visible from new position i when j <= T + i
    lowest = g.const("lowest", np.array(np.finfo(np.float32).min, np.float32))
    wpe = g.const("wpe", _np(transformer.wpe.weight))
    x = g.op("Add", ["inputs_embeds", g.op("Gather", [wpe, positions], axis=0)])  # (N, S, D)

    split_sizes = g.const("qkv_sizes", np.array([width] * 3, np.int64))
    to_heads = g.const("heads_shape", np.array([0, 0, heads, head], np.int64))  # (N, S, H, D/H)
    to_width = g.const("width_shape", np.array([0, 0, width], np.int64))
    scale = g.const("scale", np.array(math.sqrt(head), np.float32))
    activation_function = config.activation_function
    if activation_function != "relu":  # the constants of the GELUs, only where used (no unused initializers)
        half = g.const("half", np.array(0.5, np.float32))
        one = g.const("onef", np.array(1.0, np.float32))
    if activation_function == "gelu":
        root_half = g.const("root_half", np.array(math.sqrt(0.5), np.float32))
    if activation_function in _GELU_TANH:
        cube = g.const("cube", np.array(3.0, np.float32))
        gelu_a = g.const("gelu_a", np.array(0.044715, np.float32))
        gelu_b = g.const("gelu_b", np.array(math.sqrt(2.0 / math.pi), np.float32))

    def linear(h: str, module: Any, stem: str) -> str:
        # transformers' Conv1D: weight (in, out), y = x @ W + b
        weight = g.const(f"{stem}.weight", _np(module.weight))
        return g.op("Add", [g.op("MatMul", [h, weight]), g.const(f"{stem}.bias", _np(module.bias))])

    def norm(h: str, module: Any, stem: str) -> str:
        gamma, beta = g.const(f"{stem}.weight", _np(module.weight)), g.const(f"{stem}.bias", _np(module.bias))
        return g.op("LayerNormalization", [h, gamma, beta], axis=-1, epsilon=eps)

    def activation(f: str) -> str:
        if activation_function == "relu":
            return g.op("Relu", [f])
        if activation_function == "gelu":  # 0.5 f (1 + erf(f / sqrt(2))), as torch's exact GELU
            return g.op(
                "Mul",
                [g.op("Mul", [half, f]), g.op("Add", [one, g.op("Erf", [g.op("Mul", [f, root_half])])])],
            )
        # 0.5 f (1 + tanh(sqrt(2/pi) (f + 0.044715 f^3))), as transformers' NewGELUActivation
        inner = g.op("Mul", [gelu_b, g.op("Add", [f, g.op("Mul", [gelu_a, g.op("Pow", [f, cube])])])])
        return g.op("Mul", [g.op("Mul", [half, f]), g.op("Add", [one, g.op("Tanh", [inner])])])

    def split_heads(h: str) -> str:
        return g.op("Transpose", [g.op("Reshape", [h, to_heads])], perm=[0, 2, 1, 3])  # (N, H, S, D/H)

    keys, values = [], []
    block: Any
    for i, block in enumerate(transformer.h):
        stem = f"h.{i}"
        index = g.const("layer", np.array(i, np.int64))
        past_k = g.op("Gather", ["past_keys", index], axis=0)  # (N, H, T, D/H)
        past_v = g.op("Gather", ["past_values", index], axis=0)
        qkv = linear(norm(x, block.ln_1, f"{stem}.ln_1"), block.attn.c_attn, f"{stem}.attn.c_attn")
        q, k, v = g.op("Split", [qkv, split_sizes], outputs=3, axis=2)
        k_all = g.op("Concat", [past_k, split_heads(k)], axis=2)  # (N, H, T+S, D/H)
        v_all = g.op("Concat", [past_v, split_heads(v)], axis=2)
        keys.append(g.op("Unsqueeze", [k_all, g.const("axis0", np.array([0], np.int64))]))
        values.append(g.op("Unsqueeze", [v_all, g.const("axis0", np.array([0], np.int64))]))
        k_t = g.op("Transpose", [k_all], perm=[0, 1, 3, 2])  # (N, H, D/H, T+S)
        scores = g.op("MatMul", [split_heads(q), k_t])  # (N, H, S, T+S)
        scores = g.op("Where", [visible, g.op("Div", [scores, scale]), lowest])
        mixed = g.op("MatMul", [g.op("Softmax", [scores], axis=-1), v_all])  # (N, H, S, D/H)
        merged = g.op("Reshape", [g.op("Transpose", [mixed], perm=[0, 2, 1, 3]), to_width])
        x = g.op("Add", [x, linear(merged, block.attn.c_proj, f"{stem}.attn.c_proj")])
        f = linear(norm(x, block.ln_2, f"{stem}.ln_2"), block.mlp.c_fc, f"{stem}.mlp.c_fc")
        f = activation(f)
        x = g.op("Add", [x, linear(f, block.mlp.c_proj, f"{stem}.mlp.c_proj")])

    last = g.op("Gather", [x, g.op("Sub", [new, g.const("one", np.array(1, np.int64))])], axis=1)  # (N, D)
    last = norm(last, transformer.ln_f, "ln_f")
    lm_head = g.const("lm_head", np.ascontiguousarray(_np(gpt2.lm_head.weight).T))  # (D, V)
    logits_node = helper.make_node("MatMul", [last, lm_head], ["logits"], name="lm_head")
    keys_node = helper.make_node("Concat", keys, ["keys"], name="keys", axis=0)
    values_node = helper.make_node("Concat", values, ["values"], name="values", axis=0)

    def value_info(name: str, dims: list[Any]) -> Any:
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)

    cache = [n_layer, "batch", heads, "past", head]
    graph = helper.make_graph(
        [*g.nodes, logits_node, keys_node, values_node],
        "gpt2_step",
        [value_info("inputs_embeds", ["batch", "new", width]), value_info("past_keys", cache),
         value_info("past_values", cache)],
        [value_info("logits", ["batch", int(config.vocab_size)]),
         value_info("keys", [n_layer, "batch", heads, "total", head]),
         value_info("values", [n_layer, "batch", heads, "total", head])],
        initializer=g.initializers,
    )  # fmt: skip
    opsets = [helper.make_opsetid("", opset)]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="snap2caption")
    model.ir_version = 8  # ONNX Runtime reads IR 8 at opset 17 everywhere it runs
    return model


def export_decoder_step(gpt2: GPT2LMHeadModel, path: str | Path, opset: int = 17) -> Path:
    """Write :func:`build_decoder_step` of ``gpt2`` to ``path`` (checked by ONNX's checker)."""
    import onnx

    model = build_decoder_step(gpt2, opset)
    onnx.checker.check_model(model)
    path = Path(path)
    onnx.save(model, str(path))
    return path
