"""The object detector at run time: :func:`load` picks a runtime and returns a :class:`Detector`.

A :class:`Detector` is the artifact's :class:`~snap2caption.models.detector.config.DetectorConfig` and one
function, the network: (B, 3, S, S) letterboxed pixels -> (B, 4 + nc, anchors) raw output, run by

- ``onnx``: ONNX Runtime on ``model.onnx`` (``model.int8.onnx`` with ``int8``): no torch in the process;
- ``torch``: the Ultralytics network rebuilt from ``model.yaml`` + ``model.safetensors`` (no pickle);
- ``auto``: ``onnx`` when the artifact has ``model.onnx``, else ``torch``.

Pre- and post-processing (:mod:`~snap2caption.models.detector.boxes`) are the same code on both. The
detector service, the evaluator and the benchmarks all call it. This module imports neither torch nor
ONNX Runtime: each runtime imports its own stack when it is chosen.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from snap2caption.models.detector.boxes import Detection, Letterbox, letterbox, postprocess
from snap2caption.models.detector.config import (
    INT8_ONNX_FILE,
    ONNX_FILE,
    REQUIRED_FILES,
    DetectorConfig,
    config_from_metadata,
    read_config,
)
from snap2caption.models.runtime import RuntimeChoice, artifact_folder, resolve_runtime

if TYPE_CHECKING:
    import onnxruntime

    from snap2caption.models.providers import OrtProviders


class Detector:
    """A YOLO detector: ``detect(images) -> detections`` on ONNX Runtime or PyTorch.

    Args:
        config: Class names, input size, letterbox.
        runner: ``pixels (B, 3, S, S) float32 -> raw (B, 4 + nc, anchors) float32``.
        runtime: ``"onnx"`` or ``"torch"``, for status and reports.
        providers: ONNX Runtime's execution providers of the session (``{"model": [...]}``), best first;
            empty on torch.
    """

    def __init__(
        self,
        config: DetectorConfig,
        runner: Callable[[np.ndarray], np.ndarray],
        runtime: str,
        providers: dict[str, list[str]] | None = None,
    ) -> None:
        self.config = config
        self.runner = runner
        self.runtime = runtime
        self.providers = providers or {}

    @classmethod
    def from_onnx(
        cls,
        path: str | Path,
        config: DetectorConfig | None = None,
        *,
        threads: int = 1,
        session_options: onnxruntime.SessionOptions | None = None,
        providers: OrtProviders | None = None,
    ) -> Detector:
        """A detector on one ONNX file; ``config`` defaults to the file's own metadata; ``providers``:
        see :func:`~snap2caption.models.onnx_io.ort_session`."""
        from snap2caption.models.onnx_io import ort_session, session_metadata

        session = ort_session(path, threads=threads, options=session_options, providers=providers)
        metadata = session_metadata(session)
        if config is None:
            config = config_from_metadata(metadata)
        config.check_onnx_metadata(metadata)
        input_name = session.get_inputs()[0].name

        def run(pixels: np.ndarray) -> np.ndarray:
            return np.asarray(session.run(None, {input_name: pixels})[0])

        return cls(config, run, "onnx", {"model": session.get_providers()})

    @classmethod
    def from_torch(cls, model: Any, config: DetectorConfig) -> Detector:
        """A detector on an in-memory Ultralytics network (made ready with ``yolo.inference_model``)."""
        import torch

        def run(pixels: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                out = model(torch.from_numpy(pixels))
            return np.asarray((out[0] if isinstance(out, tuple | list) else out).float().numpy())

        return cls(config, run, "torch")

    @property
    def names(self) -> list[str]:
        """Class names."""
        return self.config.names

    @property
    def imgsz(self) -> int:
        """Network input side."""
        return self.config.imgsz

    def preprocess(self, images: Sequence[Image.Image]) -> tuple[np.ndarray, list[Letterbox]]:
        """Letterbox a batch: ``(B, 3, S, S)`` float32 and the per-image transforms."""
        arrays, metas = [], []
        for image in images:
            pixels, meta = letterbox(image, self.config.imgsz, self.config.pad_value)
            arrays.append(pixels)
            metas.append(meta)
        if not arrays:
            return np.zeros((0, 3, self.imgsz, self.imgsz), np.float32), []
        return np.stack(arrays), metas

    def raw(self, pixels: np.ndarray) -> np.ndarray:
        """Run the network on letterboxed pixels: (B, 3, S, S) -> (B, 4 + nc, anchors) float32."""
        return self.runner(np.ascontiguousarray(pixels, dtype=np.float32))

    def detect(
        self,
        images: Sequence[Image.Image],
        conf: float = 0.25,
        iou: float = 0.45,
        max_det: int = 100,
        batch_size: int = 16,
        multi_label: bool = False,
    ) -> list[list[Detection]]:
        """Detect objects in each image, in batches of at most ``batch_size``.

        Args:
            images: PIL images (converted to RGB when they are not).
            conf: Minimum class score.
            iou: NMS IoU threshold (class-aware).
            max_det: Most detections per image.
            batch_size: Images per network call.
            multi_label: Several classes per anchor (for mAP evaluation; see :func:`postprocess`).

        Returns:
            Per image, detections best first, boxes in that image's pixels.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        out: list[list[Detection]] = []
        for start in range(0, len(images), batch_size):
            pixels, metas = self.preprocess(images[start : start + batch_size])
            out.extend(postprocess(self.raw(pixels), metas, self.names, conf, iou, max_det, multi_label))
        return out


def load(
    source: str | Path,
    runtime: RuntimeChoice = "auto",
    *,
    int8: bool = False,
    threads: int = 1,
    session_options: onnxruntime.SessionOptions | None = None,
    providers: OrtProviders | None = None,
    verify: bool = True,
    tracking_uri: str | None = None,
    cache_dir: str | Path | None = None,
) -> Detector:
    """Load a detector artifact into the runtime ``runtime``.

    Args:
        source: An artifact folder, or ``models:/NAME@ALIAS`` / ``models:/NAME/VERSION``.
        runtime: ``onnx`` (ONNX Runtime), ``torch`` (the Ultralytics network; needs the ``train``
            extra), or ``auto`` (``onnx`` when the artifact has ``model.onnx``).
        int8: Run ``model.int8.onnx`` instead of ``model.onnx`` (``onnx`` only).
        threads: ONNX Runtime intra-op threads (torch uses the process's own setting).
        session_options: ONNX Runtime options to use as they are (a service's own).
        providers: ONNX Runtime execution providers (default: ``SNAP2CAPTION_ORT_PROVIDERS``, ``auto``).
        verify: Check every file against ``MANIFEST.json`` first.
        tracking_uri: MLflow tracking URI for registry references.
        cache_dir: Download cache for registry references.

    Raises:
        ArtifactIntegrityError: ``verify`` and the files do not match the manifest.
        FileNotFoundError: A needed file is missing.
        ValueError: A bad config, ONNX metadata that does not match it, weights that do not fit, or
            ``int8`` on ``torch``.
        ProviderUnavailable: An execution provider asked for by name that this machine cannot run.
    """
    folder = artifact_folder(
        source, REQUIRED_FILES, verify=verify, tracking_uri=tracking_uri, cache_dir=cache_dir
    )
    config = read_config(folder)
    if resolve_runtime(runtime, folder, ONNX_FILE, int8=int8) == "onnx":
        onnx_file = folder / (INT8_ONNX_FILE if int8 else ONNX_FILE)
        return Detector.from_onnx(
            onnx_file, config, threads=threads, session_options=session_options, providers=providers
        )
    from snap2caption.models.detector.artifact import load_torch_model

    return Detector.from_torch(load_torch_model(folder), config)
