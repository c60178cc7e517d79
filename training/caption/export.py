"""Caption artifacts for serving: the ONNX export (encoder + KV-cached decoder) and its int8 decoder.

Training calls :func:`export_for_serving` on every artifact it saves, so a registered captioner can be served
by the ``onnx`` backend (no torch in the service) as it is; ``snap2caption export caption`` does the same for
an artifact that predates it.
"""

from __future__ import annotations

import logging
from pathlib import Path

from snap2caption.models.artifact import load_caption_model, write_manifest
from snap2caption.models.caption_onnx import DECODER_FILE, export_caption_onnx
from snap2caption.models.caption_ort import DECODER_INT8_FILE
from snap2caption.models.onnx_io import read_metadata
from training.onnx_tools import quantize_dynamic_int8

log = logging.getLogger(__name__)


def export_for_serving(folder: str | Path, *, int8: bool = True) -> list[Path]:
    """Export the artifact in ``folder`` to ONNX in place (``onnx/``), optionally with the int8 decoder.

    The model is reloaded from the folder (LoRA already merged there), so the export is of exactly what
    was saved; the manifest is rewritten to cover the new files.

    Returns:
        The files written.
    """
    folder = Path(folder)
    model, _ = load_caption_model(folder, verify=True)
    written = export_caption_onnx(model, folder)
    if int8:
        source = folder / DECODER_FILE
        written.append(
            quantize_dynamic_int8(source, folder / DECODER_INT8_FILE, metadata=read_metadata(source))
        )
    write_manifest(folder)
    log.info("exported %s for serving: %s", folder, ", ".join(p.name for p in written))
    return written
