"""The object detector: Ultralytics YOLO, trained offline, served on ONNX Runtime or PyTorch.

- :mod:`.config`: the artifact's files and :class:`DetectorConfig` (no torch);
- :mod:`.boxes`: :class:`Detection`, the letterbox and NMS post-processing (NumPy);
- :mod:`.yolo`: Ultralytics, offline and without pickle: build a network from YAML, move weights;
- :mod:`.artifact`: write a trained network as an artifact, rebuild it from one;
- :mod:`.export`: ``model.onnx``, its int8 variant, a TensorRT engine;
- :mod:`.runtime`: :func:`load` and :class:`Detector`, the one interface on ONNX Runtime or PyTorch.

Every caller loads a detector the same way::

    from snap2caption.models import detector

    objects = detector.load("models:/detector@production", runtime="auto").detect(images)

Importing this package imports neither torch nor ONNX Runtime.
"""

from __future__ import annotations

from snap2caption.models.detector.boxes import Detection
from snap2caption.models.detector.runtime import Detector, load

__all__ = ["Detection", "Detector", "load"]
