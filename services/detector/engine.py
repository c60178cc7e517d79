"""The detector service's model runners: objects (YOLO) and tags (ImageNet classifier), each micro-batched
over its own hot-swappable model.

Pieces, request side first:

- :meth:`DetectorEngine.prepare_detect` / :meth:`~DetectorEngine.prepare_tags`: bytes -> the safe decoder
  (upright RGB at full resolution, EXIF orientation applied) -> the model's own preprocessing (the
  detector's letterbox, the tagger's resize + crop + normalise). Runs on request threads.
- :class:`~snap2caption.serving.lane.ModelLane`: one served model, its
  :class:`~snap2caption.serving.ModelStore` (the version ``models:/<name>@<alias>`` names, hot-swapped
  when the alias moves) and its :class:`~snap2caption.serving.MicroBatcher`.
  The service has two: ``detector`` and ``tagger``.
- The batch functions: one network call per batch on the model current at its start; then each image's
  post-processing with its own request's options (NMS thresholds, ``top_k``), so requests that ask for
  different options still share a network call. Boxes come back in the pixels of the decoded image:
  the original image after EXIF orientation.
- :func:`load_detector` / :func:`load_tagger`: an artifact folder on ONNX Runtime or PyTorch; ``auto``
  picks ONNX Runtime when the artifact has ``model.onnx``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from anyio import CapacityLimiter

from services.detector.config import BackendChoice, Settings
from snap2caption.errors import BadRequest
from snap2caption.imaging import DecodeLimits, Preprocess, decode_image
from snap2caption.models.detector import ONNX_FILE as DETECTOR_ONNX_FILE
from snap2caption.models.detector import Backend, Detection, Detector, Letterbox, letterbox, postprocess
from snap2caption.models.tagger_onnx import ONNX_FILE as TAGGER_ONNX_FILE
from snap2caption.models.tagger_onnx import TaggerOnnx
from snap2caption.models.tags import Tag
from snap2caption.monitoring.drift import ModelDrift
from snap2caption.registry import ModelVersionInfo, Registry
from snap2caption.service import Readiness
from snap2caption.serving import Batched, ModelSource
from snap2caption.serving.inputs import prepare_images
from snap2caption.serving.lane import ModelLane

# ---------------------------------------------------------------------------------------------- runtimes


def resolve_backend(choice: BackendChoice, folder: Path, onnx_file: str) -> Backend:
    """``onnx`` or ``torch``: the choice itself, or for ``auto`` ONNX when the artifact has ``onnx_file``."""
    if choice != "auto":
        return choice
    return "onnx" if (folder / onnx_file).is_file() else "torch"


def load_detector(folder: Path, choice: BackendChoice, *, int8: bool, threads: int) -> Detector:
    """A verified detector artifact on ONNX Runtime or PyTorch (the Ultralytics network from YAML +
    safetensors; torch's threads are set process-wide at startup).

    Raises:
        ValueError, FileNotFoundError: An artifact without what the runtime needs.
    """
    backend = resolve_backend(choice, folder, DETECTOR_ONNX_FILE)
    return Detector.load(folder, backend, int8=int8, threads=threads)


class TaggerRunner:
    """The tagger behind one runtime, split where the service needs it: preprocessing (request threads),
    the network (the batch), tags from logits (per image, with the request's options).

    Args:
        backend: ``onnx`` or ``torch``.
        preprocess: The artifact's preprocessing (PIL image -> (3, H, W) float32).
        forward: ``(B, 3, H, W)`` float32 pixels -> ``(B, num_classes)`` float32 logits.
        to_tags: ``to_tags(logits, top_k=, min_score=)``, the tagger's own ``from_logits``.
    """

    def __init__(
        self,
        backend: str,
        preprocess: Preprocess,
        forward: Callable[[np.ndarray], np.ndarray],
        to_tags: Callable[..., list[list[Tag]]],
    ) -> None:
        self.backend = backend
        self.preprocess = preprocess
        self.forward = forward
        self.to_tags = to_tags


def load_tagger(folder: Path, choice: BackendChoice, *, int8: bool, threads: int) -> TaggerRunner:
    """A verified tagger artifact on ONNX Runtime (``TaggerOnnx``) or PyTorch (``Tagger``).

    Raises:
        ValueError, FileNotFoundError: An artifact without what the runtime needs.
    """
    backend = resolve_backend(choice, folder, TAGGER_ONNX_FILE)
    if backend == "onnx":
        onnx_tagger = TaggerOnnx.load(folder, int8=int8, threads=threads)
        session = onnx_tagger.session
        input_name = session.get_inputs()[0].name

        def run_onnx(pixels: np.ndarray) -> np.ndarray:
            return np.asarray(session.run(None, {input_name: pixels})[0], dtype=np.float32)

        return TaggerRunner("onnx", onnx_tagger.preprocess, run_onnx, onnx_tagger.from_logits)
    if int8:
        raise ValueError("int8 is an ONNX variant; use the onnx backend")
    # torch only on this path: the ONNX one runs without it in the process (~480 MB less memory).
    import torch

    from snap2caption.models.tagger import Tagger

    tagger = Tagger.load(folder)

    def run_torch(pixels: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return tagger.net(torch.from_numpy(pixels).to(tagger.device)).float().cpu().numpy()

    return TaggerRunner("torch", tagger.preprocess, run_torch, tagger.from_logits)


def warm_up_detector(detector: Detector) -> None:
    """One grey input through the network, before the model serves."""
    detector.raw(np.zeros((1, 3, detector.imgsz, detector.imgsz), np.float32))


def warm_up_tagger(tagger: TaggerRunner) -> None:
    """One blank input through the network, before the model serves."""
    tagger.forward(np.zeros((1, *tagger.preprocess.output_shape), np.float32))


# ------------------------------------------------------------------------------------------------ items


@dataclass(frozen=True)
class DetectOptions:
    """Per-request detection options; applied per image, so they never split a batch.

    Attributes:
        conf: Minimum class score.
        iou: NMS IoU threshold (class-aware).
        max_det: Most objects per image.
    """

    conf: float
    iou: float
    max_det: int


@dataclass(frozen=True)
class TagOptions:
    """Per-request tagging options; applied per image.

    Attributes:
        top_k: Most tags per image (distinct names).
        min_score: Minimum tag probability.
    """

    top_k: int
    min_score: float


@dataclass(frozen=True)
class LetterboxSpec:
    """How a detector wants its input: letterboxed to ``imgsz`` with ``pad_value`` grey."""

    imgsz: int
    pad_value: int

    @classmethod
    def of(cls, detector: Detector) -> LetterboxSpec:
        return cls(detector.imgsz, detector.config.pad_value)


@dataclass(frozen=True)
class DetectItem:
    """One image on its way to the detector.

    Attributes:
        data: The original bytes, kept so a model swapped in with another input size can redo ``pixels``.
        spec: The letterbox ``pixels`` were made with.
        pixels: (3, S, S) float32 network input.
        box: The letterbox transform; its ``width``/``height`` are the decoded (upright) image's.
        options: The request's options.
    """

    data: bytes
    spec: LetterboxSpec
    pixels: np.ndarray
    box: Letterbox
    options: DetectOptions


@dataclass(frozen=True)
class TagItem:
    """One image on its way to the tagger (as :class:`DetectItem`, with the tagger's preprocessing)."""

    data: bytes
    spec: Preprocess
    pixels: np.ndarray
    width: int
    height: int
    options: TagOptions


@dataclass(frozen=True)
class ObjectsResult:
    """One image's objects.

    Attributes:
        objects: Best first; boxes in pixels of the image after EXIF orientation.
        width: That image's width.
        height: Its height.
        version: The detector version that found them.
        backend: Its runtime.
    """

    objects: list[Detection]
    width: int
    height: int
    version: int
    backend: str


@dataclass(frozen=True)
class TagsResult:
    """One image's tags (best first), with the same provenance as :class:`ObjectsResult`."""

    tags: list[Tag]
    width: int
    height: int
    version: int
    backend: str


# ------------------------------------------------------------------------------------------------- lanes


def shared_source(factory: Callable[[], ModelSource]) -> Callable[[], ModelSource]:
    """A factory that builds one client on first use and hands the same one to every caller."""
    lock = threading.Lock()
    built: list[ModelSource] = []

    def get() -> ModelSource:
        with lock:
            if not built:
                built.append(factory())
            return built[0]

    return get


# ------------------------------------------------------------------------------------------------ engine


class DetectorEngine:
    """The detector service's two models, their batchers and the input pipeline.

    Args:
        settings: Service settings.
        source_factory: Registry client factory; default one :class:`Registry` on ``settings.tracking_uri``,
            shared by both models.
    """

    def __init__(self, settings: Settings, source_factory: Callable[[], ModelSource] | None = None) -> None:
        self.settings = settings
        self.limits = DecodeLimits(max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels)
        source = shared_source(source_factory or (lambda: Registry(settings.tracking_uri)))
        self.detector: ModelLane[Detector, DetectItem, ObjectsResult] = ModelLane(
            settings.detector_model,
            settings.detector_alias,
            settings.detector_backend,
            loader=self._load_detector,
            warmup=warm_up_detector,
            batch_fn=self._detect_batch,
            settings=settings,
            source_factory=source,
        )
        self.tagger: ModelLane[TaggerRunner, TagItem, TagsResult] = ModelLane(
            settings.tagger_model,
            settings.tagger_alias,
            settings.tagger_backend,
            loader=lambda folder, _: load_tagger(
                folder, settings.tagger_backend, int8=settings.tagger_int8, threads=settings.threads
            ),
            warmup=warm_up_tagger,
            batch_fn=self._tag_batch,
            settings=settings,
            source_factory=source,
        )
        self._decode_limiter = CapacityLimiter(settings.decode_threads)
        # Input drift of the images sent to /v1/detect against the detector artifact's reference (the
        # detector's training images); the tagger's artifact comes from ImageNet weights and has none.
        self.drift = ModelDrift.from_settings("detector", settings)

    def _load_detector(self, folder: Path, info: ModelVersionInfo) -> Detector:
        s = self.settings
        detector = load_detector(folder, s.detector_backend, int8=s.detector_int8, threads=s.threads)
        self.drift.loaded(info.version, folder)
        return detector

    # ------------------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start both models' batchers and watchers."""
        self.detector.start()
        self.tagger.start()

    async def close(self, timeout_s: float) -> None:
        """Drain both models (each gets up to ``timeout_s``)."""
        await self.detector.close(timeout_s)
        await self.tagger.close(timeout_s)

    def readiness(self) -> Readiness:
        """Ready when both models are loaded and both batchers run; per-model detail either way."""
        detector, tagger = self.detector.status(), self.tagger.status()
        problems = [
            p for p in (self.detector.problem(detector), self.tagger.problem(tagger)) if p is not None
        ]
        current = self.detector.store.current
        detector["drift"] = self.drift.status(current.version if current else None)
        checks = {"detector": detector, "tagger": tagger}
        return Readiness(ready=not problems, checks=checks, reason="; ".join(problems))

    # ------------------------------------------------------------------------------ options

    def detect_options(self, conf: float | None, iou: float | None, max_det: int | None) -> DetectOptions:
        """The request's detection options, defaults from the settings, checked against the limits.

        Raises:
            NotReady: The detector is not loaded yet (503 before the body is read).
            BadRequest: ``max_det`` over the service's limit.
        """
        self.detector.store.get()
        s = self.settings
        options = DetectOptions(
            s.conf if conf is None else conf,
            s.iou if iou is None else iou,
            s.max_det if max_det is None else max_det,
        )
        if not 1 <= options.max_det <= s.max_det_limit:
            raise BadRequest(f"max_det must be between 1 and {s.max_det_limit}, got {options.max_det}")
        return options

    def tag_options(self, top_k: int | None, min_score: float | None) -> TagOptions:
        """The request's tagging options, defaults from the settings, checked against the limits.

        Raises:
            NotReady: The tagger is not loaded yet (503 before the body is read).
            BadRequest: ``top_k`` over the service's limit.
        """
        self.tagger.store.get()
        s = self.settings
        options = TagOptions(
            s.top_k if top_k is None else top_k, s.min_score if min_score is None else min_score
        )
        if not 1 <= options.top_k <= s.top_k_limit:
            raise BadRequest(f"top_k must be between 1 and {s.top_k_limit}, got {options.top_k}")
        return options

    # ------------------------------------------------------------------------------ detect

    def _letterboxed(
        self, data: bytes, spec: LetterboxSpec, options: DetectOptions, version: int | None = None
    ) -> DetectItem:
        decoded = decode_image(data, self.limits)  # upright RGB, full size: boxes map back to it
        if version is not None:  # first preparation of a request's image (not a redo after a swap)
            self.drift.observe_image(version, data, decoded, self.limits)
        pixels, box = letterbox(decoded.image, spec.imgsz, spec.pad_value)
        return DetectItem(data, spec, pixels, box, options)

    async def prepare_detect(self, images: Sequence[bytes], options: DetectOptions) -> list[DetectItem]:
        """Decode and letterbox images on worker threads (at most ``decode_threads`` at once), in order.

        Raises:
            ImageError: The first refused image's error (``image <i>: ...`` when there are several).
        """
        loaded = self.detector.store.get()
        spec = LetterboxSpec.of(loaded.model)
        return await prepare_images(
            images, lambda data: self._letterboxed(data, spec, options, loaded.version), self._decode_limiter
        )

    async def detect(self, items: Sequence[DetectItem], deadline: float) -> Batched[ObjectsResult]:
        """Detect objects in prepared images through the detector's batcher.

        Raises:
            Overloaded: The queue is full (503). Timeout: ``deadline`` passed (504).
        """
        return await self.detector.batcher.submit(items, deadline=deadline)

    def _detect_batch(self, items: list[DetectItem], key: Hashable) -> list[ObjectsResult]:
        """One network call (on the batcher's thread) on the detector current at its start."""
        loaded = self.detector.store.get()
        detector = loaded.model
        spec = LetterboxSpec.of(detector)
        items = [i if i.spec == spec else self._letterboxed(i.data, spec, i.options) for i in items]
        raw = detector.raw(np.stack([item.pixels for item in items]))  # (B, 4 + nc, anchors)
        results = []
        for k, item in enumerate(items):
            o = item.options
            [objects] = postprocess(raw[k : k + 1], [item.box], detector.names, o.conf, o.iou, o.max_det)
            results.append(
                ObjectsResult(objects, item.box.width, item.box.height, loaded.version, detector.backend)
            )
        return results

    # ------------------------------------------------------------------------------ tags

    def _preprocessed(self, data: bytes, spec: Preprocess, options: TagOptions) -> TagItem:
        image = decode_image(data, self.limits).image
        return TagItem(data, spec, spec(image), image.width, image.height, options)

    async def prepare_tags(self, images: Sequence[bytes], options: TagOptions) -> list[TagItem]:
        """Decode and preprocess images for the tagger on worker threads, in order.

        Raises:
            ImageError: The first refused image's error (``image <i>: ...`` when there are several).
        """
        spec = self.tagger.store.get().model.preprocess
        return await prepare_images(
            images, lambda data: self._preprocessed(data, spec, options), self._decode_limiter
        )

    async def tag(self, items: Sequence[TagItem], deadline: float) -> Batched[TagsResult]:
        """Tag prepared images through the tagger's batcher.

        Raises:
            Overloaded: The queue is full (503). Timeout: ``deadline`` passed (504).
        """
        return await self.tagger.batcher.submit(items, deadline=deadline)

    def _tag_batch(self, items: list[TagItem], key: Hashable) -> list[TagsResult]:
        """One network call (on the batcher's thread) on the tagger current at its start."""
        loaded = self.tagger.store.get()
        tagger = loaded.model
        spec = tagger.preprocess
        items = [i if i.spec == spec else self._preprocessed(i.data, spec, i.options) for i in items]
        logits = tagger.forward(np.stack([item.pixels for item in items]))  # (B, num_classes)
        results = []
        for k, item in enumerate(items):
            o = item.options
            [tags] = tagger.to_tags(logits[k : k + 1], top_k=o.top_k, min_score=o.min_score)
            results.append(TagsResult(tags, item.width, item.height, loaded.version, tagger.backend))
        return results
