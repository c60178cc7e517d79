"""The caption model's export for ONNX Runtime: the image side, traced, and the decoder step, built.

A caption artifact (:mod:`~snap2caption.models.caption.files`) gains, under ``onnx/``::

    encoder.onnx        pixels (B, 3, H, W) float32 -> prefix (B, P, D): image encoder + mapping network
    decoder.onnx        inputs_embeds (N, S, D), past_keys / past_values (L, N, H, T, D/H)
                        -> logits (N, V) of the last position, keys / values (L, N, H, T + S, D/H)
    decoder.int8.onnx   optional: the decoder with dynamically quantized MatMul / Gemm weights

Both carry ``metadata_props`` (format, sizes) that the ONNX Runtime runtime
(:class:`~snap2caption.models.caption.ort.OrtCaptioner`) checks against ``config.json``. The decoder is
GPT-2 with an explicit KV cache: the first step feeds the P + 1 prompt positions with an empty past (T = 0),
every later step one token and the past it got back. It is not traced: tracing Hugging Face's GPT-2 gave
about 1,200 nodes per step, most of them shape bookkeeping, and tied the export to transformers' cache
classes; :mod:`~snap2caption.models.caption.onnx_decoder` writes the same arithmetic as ~30 nodes per layer.

Training calls :func:`export_for_serving` on every artifact it saves, so a registered captioner can be
served by the ``onnx`` runtimes (no torch in the service) as it is; ``snap2caption export caption`` does the
same for an artifact that predates it.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from snap2caption.manifest import write_manifest
from snap2caption.models.caption.artifact import load_caption_model
from snap2caption.models.caption.files import DECODER_FILE, DECODER_INT8_FILE, ENCODER_FILE, ONNX_FORMAT
from snap2caption.models.caption.model import CaptionModel
from snap2caption.models.caption.onnx_decoder import export_decoder_step
from snap2caption.models.onnx_export import OPSET, quantize_dynamic_int8
from snap2caption.models.onnx_io import read_metadata, set_metadata

logger = logging.getLogger(__name__)


class _Encoder(nn.Module):
    """pixels (B, 3, H, W) -> prefix (B, P, D)."""

    def __init__(self, model: CaptionModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: Tensor) -> Tensor:
        return self.model.encode(pixels)


def _sizes(model: CaptionModel) -> dict[str, int]:
    """What the ONNX files record about the model, and the runtime checks against ``config.json``."""
    g = model.base_decoder.config
    return {
        "prefix_len": model.prefix_len,
        "n_layer": int(g.n_layer),
        "n_head": int(g.n_head),
        "n_embd": int(g.n_embd),
        "vocab_size": int(g.vocab_size),
        "crop": model.preprocess.crop,
    }


def export_onnx(model: CaptionModel, folder: str | Path, opset: int = OPSET) -> list[Path]:
    """Export ``model`` into ``folder/onnx/`` and re-hash the artifact's manifest.

    Args:
        model: The model, as loaded from (or saved to) ``folder``; LoRA must be merged.
        folder: The artifact folder.
        opset: ONNX opset.

    Returns:
        The two ONNX files.
    """
    if model.lora_active:
        raise ValueError("merge LoRA (model.merge_lora()) before exporting")
    folder = Path(folder)
    (folder / "onnx").mkdir(parents=True, exist_ok=True)
    model = model.eval()
    sizes = _sizes(model)
    encoder, decoder = folder / ENCODER_FILE, folder / DECODER_FILE
    # Both graphs are checked against torch for an empty and a filled past, one and many new positions,
    # greedy and beam search (tests/snap2caption/models/caption/test_export.py).
    # The transformer mapping's nn.TransformerEncoder takes a fused "fast path" in eval mode that the
    # exporter cannot translate (aten::_transformer_encoder_layer_fwd): trace the plain ops instead.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        _trace(model, encoder, decoder, opset)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    for path, part in ((encoder, "encoder"), (decoder, "decoder")):
        set_metadata(path, {"snap2caption.format": ONNX_FORMAT, "part": part, **sizes})
    write_manifest(folder)
    return [encoder, decoder]


def _trace(model: CaptionModel, encoder: Path, decoder: Path, opset: int) -> None:
    """Trace the encoder into ``encoder`` (TorchScript exporter); write the decoder step's graph into
    ``decoder`` (:mod:`~snap2caption.models.caption.onnx_decoder`, written node by node, not traced)."""
    pixels = torch.zeros(1, *model.preprocess.output_shape)
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            _Encoder(model).eval(), (pixels,), str(encoder), input_names=["pixels"], output_names=["prefix"],
            dynamic_axes={"pixels": {0: "batch"}, "prefix": {0: "batch"}},
            opset_version=opset, do_constant_folding=True, dynamo=False,
        )  # fmt: skip
    export_decoder_step(model.base_decoder, decoder, opset)


def export_for_serving(folder: str | Path, *, int8: bool = True) -> list[Path]:
    """Export the artifact in ``folder`` to ONNX in place (``onnx/``), optionally with the int8 decoder.

    The model is reloaded from the folder (LoRA already merged there), so the export is of exactly what
    was saved; the manifest is rewritten to cover the new files.

    Returns:
        The files written.
    """
    folder = Path(folder)
    model, _ = load_caption_model(folder, verify=True)
    written = export_onnx(model, folder)
    if int8:
        source = folder / DECODER_FILE
        written.append(
            quantize_dynamic_int8(source, folder / DECODER_INT8_FILE, metadata=read_metadata(source))
        )
    write_manifest(folder)
    logger.info("exported %s for serving: %s", folder, ", ".join(p.name for p in written))
    return written
