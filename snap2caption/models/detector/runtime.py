"""The object detector at run time: :func:`load` picks a runtime and returns a :class:`Detector`.

A :class:`Detector` is the artifact's :class:`~snap2caption.models.detector.config.DetectorConfig` and one
function, the network: (B, 3, S, S) letterboxed pixels -> (B, 4 + nc, anchors) raw output and, from the
same pass, the detector's own image features (``FEATURE_NAME``: pooled early backbone layers, (B, C)), run by

- ``onnx``: ONNX Runtime on ``model.onnx`` (``model.int8.onnx`` with ``int8``): no torch in the process;
- ``torch``: the Ultralytics network rebuilt from ``model.yaml`` + ``model.safetensors`` (no pickle);
- ``auto``: ``onnx`` when the artifact has ``model.onnx``, else ``torch``.

With the features comes the artifact's training domain (``domain.json`` + ``domain.npz``, written by
training; :mod:`snap2caption.models.domain`): :meth:`Detector.analyze` says per image whether it is inside
what the detector learned. Artifacts exported before the features existed have one output and no domain:
they still load, with ``domain`` None.

Pre- and post-processing (:mod:`~snap2caption.models.detector.boxes`) are the same code on both. The
detector service, the evaluator and the benchmarks all call it. This module imports neither torch nor
ONNX Runtime: each runtime imports its own stack when it is chosen.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from snap2caption.errors import ArtifactError
from snap2caption.models.detector.boxes import Detection, Letterbox, letterbox, postprocess
from snap2caption.models.detector.config import (
    FEATURE_NAME,
    FEATURES_OUTPUT_NAME,
    INT8_DOMAIN_DIR,
    INT8_ONNX_FILE,
    ONNX_FILE,
    OUTPUT_NAME,
    REQUIRED_FILES,
    DetectorConfig,
    config_from_metadata,
    read_config,
)
from snap2caption.models.domain import DomainCheck, DomainModel, load_domain
from snap2caption.models.runtime import RuntimeChoice, artifact_folder, resolve_runtime

if TYPE_CHECKING:
    import onnxruntime

    from snap2caption.models.providers import OrtProviders

logger = logging.getLogger(__name__)

# pixels (B, 3, S, S) float32 -> (raw (B, 4 + nc, anchors), features (B, C) or None) float32
Runner = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]]


@dataclass(frozen=True)
class ImageAnalysis:
    """One image's answer from :meth:`Detector.analyze`.

    Attributes:
        objects: Detections, best first, boxes in the image's pixels (all of them, in domain or not).
        features: The detector's own features of the image (``FEATURE_NAME``), ``(C,)``; None for an
            artifact exported without them.
        domain: Whether the image is inside the detector's training domain; None without a domain model.
    """

    objects: list[Detection]
    features: np.ndarray | None
    domain: DomainCheck | None


class Detector:
    """A YOLO detector: ``detect(images) -> detections`` on ONNX Runtime or PyTorch.

    Args:
        config: Class names, input size, letterbox.
        runner: ``pixels (B, 3, S, S) float32 -> (raw (B, 4 + nc, anchors), features (B, C) or None)``.
        runtime: ``"onnx"`` or ``"torch"``, for status and reports.
        domain: The artifact's training domain in ``FEATURE_NAME`` space, or None (older artifacts).
        providers: ONNX Runtime's execution providers of the session (``{"model": [...]}``), best first;
            empty on torch.

    Raises:
        ArtifactError: A domain model for another feature space.
    """

    def __init__(
        self,
        config: DetectorConfig,
        runner: Runner,
        runtime: str,
        domain: DomainModel | None = None,
        providers: dict[str, list[str]] | None = None,
    ) -> None:
        if domain is not None and domain.feature != FEATURE_NAME:
            raise ArtifactError(
                f"the detector's domain model is in {domain.feature!r} space, not {FEATURE_NAME!r}"
            )
        self.config = config
        self.runner = runner
        self.runtime = runtime
        self.domain = domain
        self.providers = providers or {}

    @classmethod
    def from_onnx(
        cls,
        path: str | Path,
        config: DetectorConfig | None = None,
        *,
        threads: int = 1,
        session_options: onnxruntime.SessionOptions | None = None,
        domain: DomainModel | None = None,
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
        outputs = [o.name for o in session.get_outputs()]
        # Files exported before the features output have ``output0`` alone (or one unnamed output).
        names = [OUTPUT_NAME, FEATURES_OUTPUT_NAME] if FEATURES_OUTPUT_NAME in outputs else outputs[:1]

        def run(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
            got = session.run(names, {input_name: pixels})
            return np.asarray(got[0]), (np.asarray(got[1]) if len(got) > 1 else None)

        return cls(config, run, "onnx", domain, {"model": session.get_providers()})

    @classmethod
    def from_torch(cls, model: Any, config: DetectorConfig, domain: DomainModel | None = None) -> Detector:
        """A detector on an in-memory Ultralytics network (made ready with ``yolo.inference_model``, and
        ``yolo.with_features`` for features)."""
        import torch

        def run(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
            with torch.inference_mode():
                out = model(torch.from_numpy(pixels))
            if isinstance(out, tuple | list) and len(out) == 2 and out[1].ndim == 2:  # (raw, features)
                return np.asarray(out[0].float().numpy()), np.asarray(out[1].float().numpy())
            return np.asarray((out[0] if isinstance(out, tuple | list) else out).float().numpy()), None

        return cls(config, run, "torch", domain)

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

    @property
    def has_features(self) -> bool:
        """Whether the network gives its features (artifacts exported before them do not); one pass on a
        blank input."""
        return self.forward(np.zeros((1, 3, self.imgsz, self.imgsz), np.float32))[1] is not None

    def forward(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """One network pass on letterboxed pixels (B, 3, S, S): raw (B, 4 + nc, anchors) float32 and the
        features (B, C) float32 (None for an artifact exported without them)."""
        return self.runner(np.ascontiguousarray(pixels, dtype=np.float32))

    def raw(self, pixels: np.ndarray) -> np.ndarray:
        """Run the network on letterboxed pixels: (B, 3, S, S) -> (B, 4 + nc, anchors) float32."""
        return self.forward(pixels)[0]

    def check_domain(self, features: np.ndarray | None) -> list[DomainCheck] | None:
        """The domain answer for each row of ``features`` (B, C); None without a domain model or features."""
        if self.domain is None or features is None:
            return None
        return self.domain.check(features)

    def analyze(
        self,
        images: Sequence[Image.Image],
        conf: float = 0.25,
        iou: float = 0.45,
        max_det: int = 100,
        batch_size: int = 16,
        multi_label: bool = False,
    ) -> list[ImageAnalysis]:
        """Detections, features and the domain answer of each image, from one network pass per batch.

        Arguments as :meth:`detect`. Out-of-domain images keep their detections here; what to do with them
        is the caller's (the detector service withholds them).
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        out: list[ImageAnalysis] = []
        for start in range(0, len(images), batch_size):
            pixels, metas = self.preprocess(images[start : start + batch_size])
            raw, features = self.forward(pixels)
            found = postprocess(raw, metas, self.names, conf, iou, max_det, multi_label)
            checks = self.check_domain(features)
            for k, objects in enumerate(found):
                out.append(
                    ImageAnalysis(
                        objects,
                        None if features is None else features[k],
                        None if checks is None else checks[k],
                    )
                )
        return out

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
        return [a.objects for a in self.analyze(images, conf, iou, max_det, batch_size, multi_label)]


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

    The artifact's domain model (``domain.json`` + ``domain.npz``; with ``int8``, the int8 model's own
    under ``int8/`` when the export wrote one) comes with it as ``Detector.domain``; an artifact without
    one loads with ``domain`` None.

    Raises:
        ArtifactIntegrityError: ``verify`` and the files do not match the manifest.
        ArtifactError: A domain model that cannot be read, for another feature space, or beside an ONNX
            file without the features output.
        FileNotFoundError: A needed file is missing.
        ValueError: A bad config, ONNX metadata that does not match it, weights that do not fit, or
            ``int8`` on ``torch``.
        ProviderUnavailable: An execution provider asked for by name that this machine cannot run.
    """
    folder = artifact_folder(
        source, REQUIRED_FILES, verify=verify, tracking_uri=tracking_uri, cache_dir=cache_dir
    )
    config = read_config(folder)
    domain = load_domain(folder, feature=FEATURE_NAME)
    if int8 and (folder / INT8_DOMAIN_DIR).is_dir():
        domain = load_domain(folder / INT8_DOMAIN_DIR, feature=FEATURE_NAME)
    elif int8 and domain is not None:
        logger.warning(
            "%s: no domain model for the int8 model's features (%s/); checking with the float model's, "
            "whose false-rejection rate does not hold for int8 (re-export with --int8 to fit one)",
            folder,
            INT8_DOMAIN_DIR,
        )
    if resolve_runtime(runtime, folder, ONNX_FILE, int8=int8) == "onnx":
        onnx_file = folder / (INT8_ONNX_FILE if int8 else ONNX_FILE)
        detector = Detector.from_onnx(
            onnx_file,
            config,
            threads=threads,
            session_options=session_options,
            domain=domain,
            providers=providers,
        )
    else:
        from snap2caption.models.detector.artifact import load_torch_model

        detector = Detector.from_torch(load_torch_model(folder), config, domain)
    if domain is not None and not detector.has_features:
        raise ArtifactError(
            f"{folder}: has a domain model but {detector.runtime} gives no features; re-export it "
            "(`snap2caption export detector`)"
        )
    return detector
