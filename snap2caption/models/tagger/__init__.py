"""The image tagger: a real ImageNet classifier (EfficientNet-Lite0) whose classes become readable tags.

- :mod:`.config`: the artifact's files and :class:`TaggerConfig` (no torch);
- :mod:`.tags`: the :class:`Tag` record and logits -> tags; :mod:`.imagenet_names`: ImageNet's labels and
  the plain words a post would use for them;
- :mod:`.net`: :class:`TaggerNet`, the PyTorch network (``TaggerNet.pretrained()``: the offline tagger);
- :mod:`.artifact`: save the network as an artifact, rebuild it from one;
- :mod:`.export`: ``model.onnx``, its int8 variant, a TensorRT engine;
- :mod:`.runtime`: :func:`load` and :class:`Tagger`, the one interface on ONNX Runtime or PyTorch.

Every caller loads a tagger the same way::

    from snap2caption.models import tagger

    tags = tagger.load("models:/tagger@production", runtime="auto").tag(images, top_k=5)

Importing this package imports neither torch nor ONNX Runtime.
"""

from __future__ import annotations

from snap2caption.models.tagger.runtime import Tagger, load
from snap2caption.models.tagger.tags import Tag

__all__ = ["Tag", "Tagger", "load"]
