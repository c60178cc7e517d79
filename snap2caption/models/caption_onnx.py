"""The caption model on ONNX Runtime: the image side and the decoder step, exported from the same model.

A caption artifact (``snap2caption.models.artifact``) gains, under ``onnx/``::

    encoder.onnx   pixels (B, 3, H, W) float32 -> prefix (B, P, D): image encoder + mapping network
    decoder.onnx   inputs_embeds (N, S, D), past_keys / past_values (L, N, H, T, D/H)
                   -> logits (N, V) of the last position, keys / values (L, N, H, T + S, D/H)

Both carry ``metadata_props`` (format, sizes) that :class:`CaptionOnnx` checks against ``config.json``.
The decoder is GPT-2 with an explicit KV cache: the first step feeds the P + 1 prompt positions with an
empty past (T = 0), every later step one token and the past it got back.

Decoding itself (greedy, beam search, repetition and length controls) stays the one loop of
:meth:`CaptionModel.generate`: :meth:`CaptionOnnx.attach` points a loaded model's ``encode`` and ``step``,
the two calls that loop makes into the network, at the ONNX sessions, so both runtimes decode alike by
construction and only the network runs in ONNX Runtime. The token embedding lookup stays in torch.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from snap2caption.models.artifact import write_manifest
from snap2caption.models.caption_ort import DECODER_FILE, ENCODER_FILE, FORMAT, open_sessions

if TYPE_CHECKING:
    from snap2caption.models.caption import CaptionModel

OPSET = 17


class _Encoder(nn.Module):
    """pixels (B, 3, H, W) -> prefix (B, P, D)."""

    def __init__(self, model: CaptionModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: Tensor) -> Tensor:
        return self.model.encode(pixels)


class _DecoderStep(nn.Module):
    """One GPT-2 call with the KV cache as two stacked tensors, (L, N, H, T, D/H) each."""

    def __init__(self, model: CaptionModel) -> None:
        super().__init__()
        self.decoder = model.base_decoder
        self.n_layer = int(self.decoder.config.n_layer)

    def forward(self, inputs_embeds: Tensor, past_keys: Tensor, past_values: Tensor) -> tuple[Tensor, ...]:
        from transformers.cache_utils import DynamicCache

        layers = [(past_keys[i], past_values[i]) for i in range(self.n_layer)]
        cache = DynamicCache(ddp_cache_data=layers, config=self.decoder.config)
        out = self.decoder(inputs_embeds=inputs_embeds, cache=cache, use_cache=True, logits_to_keep=1)
        keys = torch.stack([layer.keys for layer in out.cache.layers])  # (L, N, H, T + S, D/H)
        values = torch.stack([layer.values for layer in out.cache.layers])
        return out.logits[:, -1].float(), keys, values


def _sizes(model: CaptionModel) -> dict[str, int]:
    g = model.base_decoder.config
    return {
        "prefix_len": model.prefix_len,
        "n_layer": int(g.n_layer),
        "n_head": int(g.n_head),
        "n_embd": int(g.n_embd),
        "vocab_size": int(g.vocab_size),
        "crop": model.preprocess.crop,
    }


def export_caption_onnx(model: CaptionModel, folder: str | Path, opset: int = OPSET) -> list[Path]:
    """Export ``model`` into ``folder/onnx/`` and re-hash the artifact's manifest.

    Args:
        model: The model, as loaded from (or saved to) ``folder``; LoRA must be merged.
        folder: The artifact folder.
        opset: ONNX opset.

    Returns:
        The two ONNX files.
    """
    from snap2caption.models.onnx_io import set_metadata

    if model.lora_active:
        raise ValueError("merge LoRA (model.merge_lora()) before exporting")
    folder = Path(folder)
    (folder / "onnx").mkdir(parents=True, exist_ok=True)
    model = model.eval()
    sizes = _sizes(model)
    encoder, decoder = folder / ENCODER_FILE, folder / DECODER_FILE
    # The tracer warns about branches on shapes inside transformers' cache and attention code; the
    # exported graph is checked against torch for an empty and a filled past, one and many new
    # positions, greedy and beam search (tests/snap2caption/models/test_caption_onnx.py).
    # The transformer mapping's nn.TransformerEncoder takes a fused "fast path" in eval mode that the
    # exporter cannot translate (aten::_transformer_encoder_layer_fwd): trace the plain ops instead.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        _trace(model, encoder, decoder, sizes, opset)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    for path, part in ((encoder, "encoder"), (decoder, "decoder")):
        set_metadata(path, {"snap2caption.format": FORMAT, "part": part, **sizes})
    write_manifest(folder)
    return [encoder, decoder]


def _trace(model: CaptionModel, encoder: Path, decoder: Path, sizes: dict[str, int], opset: int) -> None:
    """Trace the encoder and the decoder step into ``encoder`` and ``decoder`` (TorchScript exporter)."""
    heads, width = sizes["n_head"], sizes["n_embd"]
    pixels = torch.zeros(1, *model.preprocess.output_shape)
    past = torch.zeros(sizes["n_layer"], 1, heads, 3, width // heads)
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            _Encoder(model).eval(), (pixels,), str(encoder), input_names=["pixels"], output_names=["prefix"],
            dynamic_axes={"pixels": {0: "batch"}, "prefix": {0: "batch"}},
            opset_version=opset, do_constant_folding=True, dynamo=False,
        )  # fmt: skip
        torch.onnx.export(
            _DecoderStep(model).eval(),  # eval: the exporter restores the wrapper's mode, recursively
            (torch.zeros(1, 2, width), past, past),
            str(decoder),
            input_names=["inputs_embeds", "past_keys", "past_values"],
            output_names=["logits", "keys", "values"],
            dynamic_axes={
                "inputs_embeds": {0: "batch", 1: "new"},
                "past_keys": {1: "batch", 3: "past"},
                "past_values": {1: "batch", 3: "past"},
                "logits": {0: "batch"},
                "keys": {1: "batch", 3: "total"},
                "values": {1: "batch", 3: "total"},
            },
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )


def has_onnx(folder: str | Path) -> bool:
    """Whether an artifact folder carries the ONNX export."""
    return all((Path(folder) / name).is_file() for name in (ENCODER_FILE, DECODER_FILE))


class OnnxCache:
    """The decoder's KV cache between ONNX steps: (L, N, H, T, D/H) keys and values.

    It offers what :meth:`CaptionModel.generate` asks of a cache: ``reorder_cache`` (beam search).
    """

    def __init__(self, keys: np.ndarray, values: np.ndarray) -> None:
        self.keys = keys
        self.values = values

    def reorder_cache(self, rows: Tensor) -> None:
        """Keep, for each new row, the cache of row ``rows[i]`` (beams expand, move and die)."""
        index = rows.cpu().numpy()
        self.keys = np.take(self.keys, index, axis=1)
        self.values = np.take(self.values, index, axis=1)


class CaptionOnnx:
    """ONNX Runtime sessions for the image side and the decoder step of one caption model.

    Args:
        folder: The artifact folder (with ``onnx/``).
        sizes: What the sessions must match: :func:`_sizes` of the torch model loaded from ``folder``.
        threads: Intra-op threads of each session.

    Raises:
        ValueError: The ONNX files are missing or were exported from another model.
    """

    def __init__(
        self, folder: str | Path, sizes: dict[str, int], threads: int = 1, int8: bool = False
    ) -> None:
        self.encoder, self.decoder = open_sessions(Path(folder), sizes, threads=threads, int8=int8)
        self.sizes = sizes

    @classmethod
    def for_model(
        cls, model: CaptionModel, folder: str | Path, threads: int = 1, int8: bool = False
    ) -> CaptionOnnx:
        """Sessions for ``model``'s artifact folder, checked against the model's sizes."""
        return cls(folder, _sizes(model), threads, int8)

    def encode(self, pixels: Tensor | None = None, *, features: Tensor | None = None) -> Tensor:
        """:meth:`CaptionModel.encode` on ONNX Runtime (pixels only): (B, 3, H, W) -> (B, P, D)."""
        if pixels is None or features is not None:
            raise ValueError("the ONNX encoder takes pixels")
        (prefix,) = self.encoder.run(None, {"pixels": _numpy(pixels)})
        return torch.from_numpy(prefix)

    def step(
        self, inputs_embeds: Tensor, cache: Any | None = None, *, use_cache: bool = True
    ) -> tuple[Tensor, OnnxCache | None]:
        """:meth:`CaptionModel.step` on ONNX Runtime: (N, S, D) new positions -> (N, V) logits, cache."""
        if not use_cache:
            raise ValueError("the ONNX decoder always runs with its KV cache")
        embeds = _numpy(inputs_embeds)
        if cache is None:
            s = self.sizes
            empty = np.zeros(
                (s["n_layer"], embeds.shape[0], s["n_head"], 0, s["n_embd"] // s["n_head"]), np.float32
            )
            cache = OnnxCache(empty, empty)
        assert isinstance(cache, OnnxCache)
        logits, keys, values = self.decoder.run(
            None, {"inputs_embeds": embeds, "past_keys": cache.keys, "past_values": cache.values}
        )
        return torch.from_numpy(logits), OnnxCache(keys, values)

    def attach(self, model: CaptionModel) -> CaptionModel:
        """Make ``model.generate`` run its network calls here (its decoding loop stays as it is).

        Returns:
            The same model object.
        """
        model.encode = self.encode  # type: ignore[method-assign]
        model.step = self.step  # type: ignore[method-assign]
        return model


def _numpy(tensor: Tensor) -> np.ndarray:
    return np.ascontiguousarray(tensor.detach().cpu().numpy(), dtype=np.float32)
