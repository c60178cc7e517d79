"""The detector service's model runners: objects (YOLO) and tags (ImageNet classifier), each micro-batched
over its own hot-swappable model.

Pieces, request side first:

- :meth:`DetectorEngine.prepare`: bytes -> the safe decoder (upright RGB at full resolution, EXIF
  orientation applied), once per image, -> the preprocessing of each model the request asks for (the
  detector's letterbox, the tagger's resize + crop + normalise), from that one decoded image. Runs on
  request threads. ``/v1/analyze`` asks for both, ``/v1/detect`` and ``/v1/tags`` for one.
- :class:`~snap2caption.serving.lane.ModelLane`: one served model, its
  :class:`~snap2caption.serving.ModelStore` (the version ``models:/<name>@<alias>`` names, hot-swapped
  when the alias moves) and its :class:`~snap2caption.serving.MicroBatcher`. The service has two:
  ``detector`` and ``tagger``.
- The batch functions: one network call per batch; then each image's post-processing with its own
  request's options (NMS thresholds, ``top_k``), so requests that ask for different options still share a
  network call. Boxes come back in the pixels of the decoded image: the original image after EXIF
  orientation.
- The detector's domain: the same network call gives the detector's own features of each image, checked
  against the artifact's training domain (``domain.json``; :mod:`snap2caption.models.domain`). An image
  outside it gets no objects (they are withheld and counted) unless the request asks for them with
  ``include_out_of_domain``; an artifact without a domain model answers ``in_domain`` None and withholds
  nothing. Tags are not checked: the tagger is an ImageNet model, made for real photos.

The models themselves are what ``detector.load`` and ``tagger.load`` return for the configured runtime
(``onnx``, ``torch`` or ``auto``); this module only batches and answers.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from anyio import CapacityLimiter
from PIL import Image

from services.detector.config import Settings
from snap2caption.errors import BadRequest
from snap2caption.http import Readiness
from snap2caption.imaging import DecodeLimits, Preprocess, decode_image
from snap2caption.models import detector as detector_model
from snap2caption.models import tagger as tagger_model
from snap2caption.models.detector import Detection, Detector
from snap2caption.models.detector.boxes import Letterbox, letterbox, postprocess
from snap2caption.models.tagger import Tag, Tagger
from snap2caption.monitoring.drift import ModelDrift
from snap2caption.registry import ModelVersionInfo, Registry
from snap2caption.serving import Batched, LoadedModel, ModelSource
from snap2caption.serving.inputs import prepare_images
from snap2caption.serving.lane import ModelLane


def warm_up_detector(detector: Detector) -> None:
    """One grey input through the network, before the model serves."""
    detector.raw(np.zeros((1, 3, detector.imgsz, detector.imgsz), np.float32))


def domain_status(detector: Detector | None) -> dict[str, Any] | None:
    """``/readyz``'s word on the serving detector's training domain: None when it has no domain model (an
    older artifact: every image is answered ``in_domain`` None and nothing is withheld)."""
    if detector is None or detector.domain is None:
        return None
    info = detector.domain.info()
    keys = ("feature", "false_rejection_rate", "threshold", "n_fit", "n_calibration")
    return {key: info[key] for key in keys}


def warm_up_tagger(tagger: Tagger) -> None:
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
        include_out_of_domain: Return the objects of an image outside the detector's training domain too
            (flagged ``in_domain`` False) instead of withholding them.
    """

    conf: float
    iou: float
    max_det: int
    include_out_of_domain: bool = False


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
class PreparedImages:
    """A request's images, prepared for the models it asks for (None for a model it does not)."""

    objects: list[DetectItem] | None
    tags: list[TagItem] | None


@dataclass(frozen=True)
class ObjectsResult:
    """One image's objects.

    Attributes:
        objects: Best first; boxes in pixels of the image after EXIF orientation. Empty for an image outside
            the detector's domain unless the request included those.
        width: That image's width.
        height: Its height.
        version: The detector version that found them.
        runtime: Its runtime.
        in_domain: Whether the image is inside the detector's training domain (None: no domain model).
        domain_score: Its conformal p-value (None: no domain model).
        withheld: Objects found but not returned because the image is outside the domain.
    """

    objects: list[Detection]
    width: int
    height: int
    version: int
    runtime: str
    in_domain: bool | None = None
    domain_score: float | None = None
    withheld: int = 0


@dataclass(frozen=True)
class TagsResult:
    """One image's tags (best first), with the same provenance as :class:`ObjectsResult`."""

    tags: list[Tag]
    width: int
    height: int
    version: int
    runtime: str


def detect_item(image: Image.Image, data: bytes, spec: LetterboxSpec, options: DetectOptions) -> DetectItem:
    """The detector's input for one decoded (upright, full-size) image: boxes map back to it."""
    pixels, box = letterbox(image, spec.imgsz, spec.pad_value)
    return DetectItem(data, spec, pixels, box, options)


def tag_item(image: Image.Image, data: bytes, spec: Preprocess, options: TagOptions) -> TagItem:
    """The tagger's input for one decoded image."""
    return TagItem(data, spec, spec(image), image.width, image.height, options)


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
        self.detector: ModelLane[Detector, LetterboxSpec, DetectItem, ObjectsResult] = ModelLane(
            settings.detector_model,
            settings.detector_alias,
            settings.detector_runtime,
            loader=self._load_detector,
            warmup=warm_up_detector,
            spec=LetterboxSpec.of,
            redo=lambda item, spec: detect_item(self._decode(item.data), item.data, spec, item.options),
            batch_fn=self._detect_batch,
            settings=settings,
            source_factory=source,
        )
        self.tagger: ModelLane[Tagger, Preprocess, TagItem, TagsResult] = ModelLane(
            settings.tagger_model,
            settings.tagger_alias,
            settings.tagger_runtime,
            loader=lambda folder, _: tagger_model.load(
                folder,
                settings.tagger_runtime,
                int8=settings.tagger_int8,
                threads=settings.threads,
                providers=settings.ort_providers(),
            ),
            warmup=warm_up_tagger,
            spec=lambda tagger: tagger.preprocess,
            redo=lambda item, spec: tag_item(self._decode(item.data), item.data, spec, item.options),
            batch_fn=self._tag_batch,
            settings=settings,
            source_factory=source,
        )
        self._decode_limiter = CapacityLimiter(settings.decode_threads)
        # Input drift of the images sent to the detector against the detector artifact's reference (the
        # detector's training images); the tagger's artifact comes from ImageNet weights and has none.
        self.drift = ModelDrift.from_settings("detector", settings)

    def _load_detector(self, folder: Path, info: ModelVersionInfo) -> Detector:
        s = self.settings
        detector = detector_model.load(
            folder, s.detector_runtime, int8=s.detector_int8, threads=s.threads, providers=s.ort_providers()
        )
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
        detector["domain"] = domain_status(current.model if current else None)
        checks = {"detector": detector, "tagger": tagger}
        return Readiness(ready=not problems, checks=checks, reason="; ".join(problems))

    # ------------------------------------------------------------------------------ options

    def detect_options(
        self,
        conf: float | None,
        iou: float | None,
        max_det: int | None,
        include_out_of_domain: bool = False,
    ) -> DetectOptions:
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
            include_out_of_domain,
        )
        if not 1 <= options.max_det <= s.max_det_limit:
            raise BadRequest(f"max_det must be between 1 and {s.max_det_limit}, got {options.max_det}")
        return options

    def tag_options(self, top_k: int | None, min_score: float | None) -> TagOptions:
        """The request's tagging options, defaults from the settings, checked against the limits.

        The default ``min_score`` is the setting's, else the serving tagger's calibrated one.

        Raises:
            NotReady: The tagger is not loaded yet (503 before the body is read).
            BadRequest: ``top_k`` over the service's limit.
        """
        tagger = self.tagger.store.get().model
        s = self.settings
        if min_score is None:
            min_score = tagger.min_score if s.min_score is None else s.min_score
        options = TagOptions(s.top_k if top_k is None else top_k, min_score)
        if not 1 <= options.top_k <= s.top_k_limit:
            raise BadRequest(f"top_k must be between 1 and {s.top_k_limit}, got {options.top_k}")
        return options

    # ------------------------------------------------------------------------------ inputs

    def _decode(self, data: bytes) -> Image.Image:
        """The upright RGB image at full size (boxes map back to it)."""
        return decode_image(data, self.limits).image

    async def prepare(
        self,
        images: Sequence[bytes],
        *,
        objects: DetectOptions | None = None,
        tags: TagOptions | None = None,
    ) -> PreparedImages:
        """Decode each image once and make from it the input of each model asked for, on worker threads
        (at most ``decode_threads`` at once), in order.

        Args:
            images: The request's image bytes.
            objects: The detection options, when the request asks for objects.
            tags: The tagging options, when it asks for tags.

        Raises:
            NotReady: A model asked for is not loaded yet.
            ImageError: The first refused image's error (``image <i>: ...`` when there are several).
        """
        detector = self.detector.current() if objects is not None else None
        tagger_spec = self.tagger.current()[1] if tags is not None else None

        def prepare_one(data: bytes) -> tuple[DetectItem | None, TagItem | None]:
            decoded = decode_image(data, self.limits)
            detect = tag = None
            if detector is not None and objects is not None:
                loaded, spec = detector
                self.drift.observe_image(loaded.version, data, decoded, self.limits)
                detect = detect_item(decoded.image, data, spec, objects)
            if tagger_spec is not None and tags is not None:
                tag = tag_item(decoded.image, data, tagger_spec, tags)
            return detect, tag

        pairs = await prepare_images(images, prepare_one, self._decode_limiter)
        return PreparedImages(
            [d for d, _ in pairs if d is not None] if objects is not None else None,
            [t for _, t in pairs if t is not None] if tags is not None else None,
        )

    # ------------------------------------------------------------------------------ models

    async def analyze(
        self, prepared: PreparedImages, deadline: float
    ) -> tuple[Batched[ObjectsResult] | None, Batched[TagsResult] | None]:
        """Run the models a request asked for on its prepared images, both at once, each through its batcher.

        Returns:
            The detector's and the tagger's outputs (None for a model not asked for).

        Raises:
            Overloaded: A queue is full (503). Timeout: ``deadline`` passed (504). The other model's
                items are then withdrawn: the request fails whole.
        """
        runs: list[asyncio.Future[Batched[ObjectsResult]] | asyncio.Future[Batched[TagsResult]]] = []
        objects = tags = None
        if prepared.objects is not None:
            objects = asyncio.ensure_future(self.detector.batcher.submit(prepared.objects, deadline=deadline))
            runs.append(objects)
        if prepared.tags is not None:
            tags = asyncio.ensure_future(self.tagger.batcher.submit(prepared.tags, deadline=deadline))
            runs.append(tags)
        try:
            await asyncio.gather(*runs)
        except BaseException:
            for run in runs:
                run.cancel()
            raise
        return (objects.result() if objects else None), (tags.result() if tags else None)

    def _detect_batch(
        self, loaded: LoadedModel[Detector], items: list[DetectItem], key: Hashable
    ) -> list[ObjectsResult]:
        """One network call (on the batcher's thread), every item letterboxed for ``loaded``: boxes and the
        detector's features, checked against its domain; an out-of-domain image's objects are withheld
        unless its request includes them."""
        detector = loaded.model
        # (B, 4 + nc, anchors), (B, C) or None
        raw, features = detector.forward(np.stack([item.pixels for item in items]))
        checks = detector.check_domain(features)
        results = []
        for k, item in enumerate(items):
            o = item.options
            [objects] = postprocess(raw[k : k + 1], [item.box], detector.names, o.conf, o.iou, o.max_det)
            check = checks[k] if checks is not None else None
            withheld = 0
            if check is not None and not check.in_domain and not o.include_out_of_domain:
                withheld, objects = len(objects), []
            results.append(
                ObjectsResult(
                    objects,
                    item.box.width,
                    item.box.height,
                    loaded.version,
                    detector.runtime,
                    in_domain=None if check is None else check.in_domain,
                    domain_score=None if check is None else check.domain_score,
                    withheld=withheld,
                )
            )
        return results

    def _tag_batch(
        self, loaded: LoadedModel[Tagger], items: list[TagItem], key: Hashable
    ) -> list[TagsResult]:
        """One network call (on the batcher's thread), every item preprocessed for ``loaded``."""
        tagger = loaded.model
        logits = tagger.forward(np.stack([item.pixels for item in items]))  # (B, num_classes)
        results = []
        for k, item in enumerate(items):
            o = item.options
            [tags] = tagger.from_logits(logits[k : k + 1], top_k=o.top_k, min_score=o.min_score)
            results.append(TagsResult(tags, item.width, item.height, loaded.version, tagger.runtime))
        return results
