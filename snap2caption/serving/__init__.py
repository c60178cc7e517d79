"""Serving machinery shared by the model services (captioner, detector).

- :mod:`~snap2caption.serving.batcher`: dynamic micro-batching with a bounded queue (503 ``overloaded``),
  per-request deadlines (504 ``timeout``), metrics and a graceful drain; the model runs in a worker
  thread, never on the event loop.
- :mod:`~snap2caption.serving.model_store`: the model an alias names (``models:/captioner@production``),
  downloaded and verified through the registry, warmed up, and hot-swapped when the alias moves.
- :mod:`~snap2caption.serving.lane`: one served model, its store and its batcher together; a batch runs
  whole on one model, and inputs prepared for a model swapped out since are prepared again.
- :mod:`~snap2caption.serving.threads`: torch's thread pools (one intra-op thread by default).
- :mod:`~snap2caption.serving.inputs`: the image uploads every model route takes (raw body or multipart
  ``file``/``files``), decoding off the event loop, request deadlines.
- :mod:`~snap2caption.serving.settings`: the settings every model service shares (registry, threads,
  batching, input caps); :mod:`~snap2caption.serving.schemas`: the wire schemas they share.
"""

from __future__ import annotations

from snap2caption.serving.batcher import Batched, MicroBatcher
from snap2caption.serving.model_store import LoadedModel, ModelSource, ModelStore
from snap2caption.serving.threads import configure_torch_threads

__all__ = [
    "Batched",
    "LoadedModel",
    "MicroBatcher",
    "ModelSource",
    "ModelStore",
    "configure_torch_threads",
]
