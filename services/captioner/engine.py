"""The captioner's model runner: decode -> preprocess -> micro-batch -> caption, over a hot-swappable model.

Pieces, request side first:

- :func:`prepare_image`: bytes -> the safe decoder -> shrunk to the training store's max side -> the
  model's own ``Preprocess``: the pixels the model saw in training. Runs on request threads.
- :class:`CaptionEngine`: owns the :class:`~snap2caption.serving.lane.ModelLane` (the version
  ``models:/captioner@production`` names, and its micro-batcher); a batch runs whole on one version.

The model itself is a :class:`~snap2caption.models.caption.Captioner` that ``caption.load`` returns for the
configured runtime (``torch``, ``onnx``, ``onnx-int8`` or ``auto``); this module only batches and answers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from anyio import CapacityLimiter

from services.captioner.config import Settings
from snap2caption.errors import BadRequest
from snap2caption.http import Readiness
from snap2caption.imaging import DecodeLimits, Preprocess, decode_image
from snap2caption.models import caption
from snap2caption.models.caption import Captioner, StaticOptions
from snap2caption.monitoring.drift import ModelDrift
from snap2caption.registry import ModelVersionInfo, Registry
from snap2caption.serving import Batched, LoadedModel, ModelSource
from snap2caption.serving.inputs import prepare_images
from snap2caption.serving.lane import ModelLane

logger = logging.getLogger(__name__)

DEFAULT_IMAGE_MAX_SIDE = 512  # the ETL's resized image store, which training reads


@dataclass(frozen=True)
class DecodeOptions:
    """Per-request decoding choices; requests batch together only when these match.

    Attributes:
        max_new_tokens: Most tokens generated, EOS included.
        num_beams: 1 = greedy, more = beam search.
    """

    max_new_tokens: int
    num_beams: int


@dataclass(frozen=True)
class InputSpec:
    """How a model wants its images: shrunk to ``max_side``, then ``preprocess`` (frozen, comparable)."""

    max_side: int
    preprocess: Preprocess


@dataclass(frozen=True)
class ImageItem:
    """One image on its way to the model.

    Attributes:
        data: The original bytes, kept so a model swapped in with another input spec can redo ``pixels``.
        spec: The spec ``pixels`` were made with.
        pixels: (3, H, W) float32 model input.
    """

    data: bytes
    spec: InputSpec
    pixels: np.ndarray


@dataclass(frozen=True)
class ImageCaption:
    """One image's caption.

    Attributes:
        text: The caption.
        confidence: The calibrated probability that the caption is right, when the artifact has a
            calibration (``calibration.json``); else the raw confidence.
        tokens: Number of caption tokens.
        model_version: The version that wrote it.
        runtime: The runtime that ran it (``torch``, ``onnx``, ``onnx-int8``).
        raw_confidence: Geometric-mean probability of the generated tokens, in [0, 1].
        in_domain: Whether the image is inside the model's training domain (None: no domain model).
        domain_score: The domain model's p-value (None: no domain model).
    """

    text: str
    confidence: float
    tokens: int
    model_version: int
    runtime: str = ""
    raw_confidence: float = 0.0
    in_domain: bool | None = None
    domain_score: float | None = None


def domain_status(captioner: Captioner | None) -> dict[str, Any]:
    """``/readyz``'s ``domain`` detail: whether the serving artifact has a domain model, its stated and
    measured false-rejection rates and the images it was fitted and calibrated on."""
    domain = getattr(captioner, "domain", None) if captioner is not None else None
    if domain is None:
        return {"present": False}
    info = domain.info()
    return {
        "present": True,
        "feature": info["feature"],
        "false_rejection_rate": info["false_rejection_rate"],
        "test_rejection_rate": info["extra"].get("test_rejection_rate"),
        "n_fit": info["n_fit"],
        "n_calibration": info["n_calibration"],
    }


def warm_up(captioner: Captioner) -> None:
    """One dummy batch (a mid-grey image) through the whole decode path, before the model serves."""
    captioner.generate(np.zeros((1, *captioner.preprocess.output_shape), np.float32))


def input_spec(captioner: Captioner, image_max_side: int | None) -> InputSpec:
    """How ``captioner`` wants its images: the settings' max side, else the artifact's, else 512."""
    if image_max_side is None:
        image_max_side = captioner.image_max_side or DEFAULT_IMAGE_MAX_SIDE
    return InputSpec(image_max_side, captioner.preprocess)


def prepare_image(data: bytes, spec: InputSpec, limits: DecodeLimits) -> np.ndarray:
    """Image bytes -> (3, H, W) float32 model input, as in training.

    Raises:
        PayloadTooLarge, UnsupportedFormat, ImageTooLarge, CorruptImage: From the safe decoder.
    """
    decoded = decode_image(data, limits, max_side=spec.max_side)
    return spec.preprocess(decoded.image)


@dataclass(frozen=True)
class CaptionRun:
    """The captions of one request and where its time went.

    Attributes:
        captions: One per image, in order.
        model_version: The version that wrote them (a request's images run in one batch).
        queue_s: Wait for the batch.
        inference_s: The model call.
        batch_size: Images in that model call, other requests' included.
        runtime: The runtime that ran the batch.
    """

    captions: list[ImageCaption]
    model_version: int
    queue_s: float
    inference_s: float
    batch_size: int
    runtime: str = ""


class CaptionEngine:
    """The captioner's model, batcher and input pipeline.

    Args:
        settings: Service settings.
        source_factory: Registry client factory; default a :class:`Registry` on ``settings.tracking_uri``.
    """

    def __init__(self, settings: Settings, source_factory: Callable[[], ModelSource] | None = None) -> None:
        self.settings = settings
        self.limits = DecodeLimits(max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels)
        self.lane: ModelLane[Captioner, InputSpec, ImageItem, ImageCaption] = ModelLane(
            settings.model_name,
            settings.model_alias,
            settings.runtime,
            loader=self._load,
            warmup=warm_up,
            spec=lambda captioner: input_spec(captioner, settings.image_max_side),
            redo=lambda item, spec: ImageItem(item.data, spec, prepare_image(item.data, spec, self.limits)),
            batch_fn=self._run_batch,
            settings=settings,
            source_factory=source_factory or (lambda: Registry(settings.tracking_uri)),
        )
        self._decode_limiter = CapacityLimiter(settings.decode_threads)
        # Input drift (image statistics) and output drift (caption confidence) against the reference the
        # serving artifact carries; off for artifacts without one.
        self.drift = ModelDrift.from_settings("captioner", settings)

    def _load(self, folder: Path, info: ModelVersionInfo) -> Captioner:
        s = self.settings
        captioner = caption.load(
            folder,
            s.runtime,
            threads=s.threads,
            providers=s.ort_providers(),
            static=StaticOptions(
                device=s.device,
                enabled=s.static_decoder,
                dtype=s.static_dtype,
                cuda_graphs=s.cuda_graphs,
                max_batch=s.max_batch_size,
                max_beams=s.max_beams,
                max_new_tokens=s.max_new_tokens,
            ),
        )
        self.drift.loaded(info.version, folder)
        return captioner

    # ------------------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the batcher and the model watcher (the first load runs in the background)."""
        self.lane.start()

    async def close(self, timeout_s: float) -> None:
        """Stop watching the registry, finish queued work (up to ``timeout_s``), stop the batcher."""
        await self.lane.close(timeout_s)

    def readiness(self) -> Readiness:
        """Ready when a model is loaded and the batcher runs; the model's status either way."""
        checks = self.lane.status()
        problem = self.lane.problem(checks)
        current = self.lane.store.current
        checks["drift"] = self.drift.status(current.version if current else None)
        checks["domain"] = domain_status(current.model if current else None)
        if current is not None:
            checks["calibrated"] = current.model.calibration is not None
        return Readiness(ready=problem is None, checks=checks, reason=problem or "")

    # ------------------------------------------------------------------------------ requests

    def options(self, max_new_tokens: int | None, num_beams: int | None) -> DecodeOptions:
        """The request's decoding options, defaults from the serving model, checked against the limits.

        Raises:
            NotReady: No model loaded yet.
            BadRequest: A value over the service's or the model's limit.
        """
        captioner = self.lane.store.get().model
        limit = min(self.settings.max_new_tokens, captioner.max_new_tokens_limit)
        beams = self.settings.max_beams
        if max_new_tokens is None:
            max_new_tokens = min(captioner.decoding.max_new_tokens, limit)
        if num_beams is None:
            num_beams = min(captioner.decoding.num_beams, beams)
        options = DecodeOptions(max_new_tokens, num_beams)
        if not 1 <= options.max_new_tokens <= limit:
            raise BadRequest(f"max_new_tokens must be between 1 and {limit}, got {options.max_new_tokens}")
        if not 1 <= options.num_beams <= beams:
            raise BadRequest(f"num_beams must be between 1 and {beams}, got {options.num_beams}")
        return options

    async def prepare(self, images: Sequence[bytes]) -> list[ImageItem]:
        """Decode and preprocess images on worker threads (at most ``decode_threads`` at once), in order.

        Raises:
            ImageError: The first refused image's error, its message prefixed with its position when
                the request has several.
        """
        loaded, spec = self.lane.current()
        pixels = await prepare_images(
            images, lambda data: self._prepare(data, spec, loaded.version), self._decode_limiter
        )
        return [ImageItem(data, spec, p) for data, p in zip(images, pixels, strict=True)]

    def _prepare(self, data: bytes, spec: InputSpec, version: int) -> np.ndarray:
        """:func:`prepare_image`, feeding the drift monitor the decoded image (request threads)."""
        decoded = decode_image(data, self.limits, max_side=spec.max_side)
        self.drift.observe_image(version, data, decoded, self.limits, spec.max_side)
        return spec.preprocess(decoded.image)

    async def caption(
        self, items: Sequence[ImageItem], options: DecodeOptions, deadline: float
    ) -> CaptionRun:
        """Caption prepared images through the batcher.

        Raises:
            Overloaded: The queue is full (503). Timeout: ``deadline`` passed (504).
        """
        batched: Batched[ImageCaption] = await self.lane.batcher.submit(items, key=options, deadline=deadline)
        version = batched.outputs[0].model_version
        return CaptionRun(
            batched.outputs,
            version,
            batched.queue_s,
            batched.inference_s,
            max(batched.batch_sizes),
            batched.outputs[0].runtime,
        )

    def _run_batch(
        self, loaded: LoadedModel[Captioner], items: list[ImageItem], options: Hashable
    ) -> list[ImageCaption]:
        """One model call (on the batcher's thread), every item prepared for ``loaded``'s spec."""
        assert isinstance(options, DecodeOptions)
        captioner = loaded.model
        pixels = np.stack([item.pixels for item in items])  # (B, 3, H, W)
        # Checked against the model current when the request came; a model swapped in since may allow fewer.
        max_new_tokens = min(options.max_new_tokens, captioner.max_new_tokens_limit)
        captions = captioner.generate(pixels, max_new_tokens=max_new_tokens, num_beams=options.num_beams)
        out = [
            ImageCaption(
                c.text,
                c.probability,
                c.n_tokens,
                loaded.version,
                captioner.runtime,
                c.raw_probability,
                c.in_domain,
                c.domain_score,
            )
            for c in captions
        ]
        for result in out:  # output drift: the reference holds the test split's raw confidences
            self.drift.observe(loaded.version, {"caption_confidence": result.raw_confidence})
        return out
