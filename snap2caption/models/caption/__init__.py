"""The caption model: image encoder -> mapping network -> prefix embeddings -> GPT-2 decoder.

One package holds all of it; serving, training, export, the evaluators and tests import it from here:

- :mod:`.config`: :class:`CaptionConfig`, the typed model config (no torch);
- :mod:`.model`: :class:`CaptionModel` (PyTorch) with its own decoding loop, and the training builders;
- :mod:`.decoding`: decoding settings, the :class:`Caption` record, the beam-search bookkeeping and the
  NumPy loop (no torch);
- :mod:`.tokenizer`: the byte-level BPE :class:`CaptionTokenizer` (no torch);
- :mod:`.files`: the artifact's files and ``config.json``, read without torch; :mod:`.artifact`: saving
  a model as an artifact and rebuilding it in PyTorch;
- :mod:`.export`: the ONNX export (encoder + KV-cached decoder step, int8 decoder);
- the runtimes: :mod:`.runtimes` (``torch``, and :func:`load`), :mod:`.ort` (``onnx``, ``onnx-int8``, no
  torch), :mod:`.static` (the static-cache decoder with CUDA graphs for the torch runtime on a GPU).

Every caller loads a model the same way::

    from snap2caption.models import caption

    captioner = caption.load("models:/captioner@production", runtime="auto")
    captions = captioner.generate(pixels)  # (B, 3, H, W) float32 -> list[Caption]

Importing this package imports neither torch nor ONNX Runtime.
"""

from __future__ import annotations

from snap2caption.models.caption.decoding import Caption, DecodingConfig
from snap2caption.models.caption.runtimes import Captioner, StaticOptions, TorchCaptioner, load

__all__ = ["Caption", "Captioner", "DecodingConfig", "StaticOptions", "TorchCaptioner", "load"]
