"""The captioner's model runner: decode -> preprocess -> micro-batch -> caption, over a hot-swappable model.

Pieces, request side first:

- :func:`prepare_image`: bytes -> the safe decoder -> shrunk to the training store's max side -> the
  model's own ``Preprocess``: the pixels the model saw in training. Runs on request threads.
- :class:`CaptionEngine`: owns the :class:`~snap2caption.serving.ModelStore` (the version
  ``models:/captioner@production`` names) and the :class:`~snap2caption.serving.MicroBatcher`; a batch
  reads the current model once, so it runs whole on one version.
- :class:`CaptionBackend`: what a runtime must offer. :class:`TorchBackend` runs
  :meth:`CaptionModel.generate` (greedy or beam search, KV cache); :class:`OnnxBackend` runs the same
  decoding loop with the encoder and each decoder step on ONNX Runtime. :func:`load_backend` picks one.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from anyio import CapacityLimiter

from services.captioner.config import Settings
from snap2caption.errors import BadRequest
from snap2caption.imaging import DecodeLimits, Preprocess, decode_image
from snap2caption.models.caption import Caption
from snap2caption.registry import ModelVersionInfo, Registry
from snap2caption.service import Readiness
from snap2caption.serving import Batched, ModelSource
from snap2caption.serving.inputs import prepare_images
from snap2caption.serving.lane import ModelLane

logger = logging.getLogger(__name__)

DEFAULT_IMAGE_MAX_SIDE = 512  # the ETL's resized image store, which training reads
IMAGE_MAX_SIDE_KEY = "image_max_side"  # in the artifact's config.json "extra", when training records it


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
        confidence: Geometric-mean probability of the generated tokens, in [0, 1].
        tokens: Number of caption tokens.
        model_version: The version that wrote it.
    """

    text: str
    confidence: float
    tokens: int
    model_version: int


class CaptionBackend(Protocol):
    """A caption model behind one runtime. Methods run on worker threads, never on the event loop.

    Attributes:
        backend: Runtime name (``torch``, ``onnx``).
        spec: Input spec, from the artifact.
        defaults: The model's default decoding options.
        max_new_tokens_limit: Most new tokens the model's positions allow.
    """

    backend: str
    spec: InputSpec
    defaults: DecodeOptions
    max_new_tokens_limit: int

    def caption(self, pixels: np.ndarray, options: DecodeOptions) -> list[Caption]:
        """(B, 3, H, W) float32 pixels -> one caption per image."""
        ...


class TorchBackend:
    """:class:`~snap2caption.models.caption.CaptionModel` in PyTorch, eval mode, KV-cached decoding."""

    backend = "torch"

    def __init__(self, folder: Path, image_max_side: int | None = None) -> None:
        from snap2caption.models.artifact import load_caption_model

        self.model, _ = load_caption_model(folder, verify=True)
        self.spec = InputSpec(_max_side(folder, image_max_side), self.model.preprocess)
        decoding = self.model.config.decoding
        self.defaults = DecodeOptions(decoding.max_new_tokens, decoding.num_beams)
        self.max_new_tokens_limit = self.model.config.decoder.n_positions - self.model.prefix_len - 1

    def caption(self, pixels: np.ndarray, options: DecodeOptions) -> list[Caption]:
        import torch

        with torch.inference_mode():
            return self.model.generate(
                torch.from_numpy(pixels),  # (B, 3, H, W)
                max_new_tokens=options.max_new_tokens,
                num_beams=options.num_beams,
            )


class OnnxBackend(TorchBackend):
    """The same model with its network on ONNX Runtime (``onnx/`` in the artifact): the image encoder and
    each decoder step run as ONNX sessions, the decoding loop stays :meth:`CaptionModel.generate`'s, so
    greedy / beam search behave exactly as on torch (see ``snap2caption.models.caption_onnx``)."""

    backend = "onnx"

    def __init__(self, folder: Path, image_max_side: int | None = None, threads: int = 1) -> None:
        from snap2caption.models.caption_onnx import CaptionOnnx

        super().__init__(folder, image_max_side)
        CaptionOnnx.for_model(self.model, folder, threads).attach(self.model)


def _max_side(folder: Path, override: int | None) -> int:
    """The settings' value, else the artifact's ``extra.image_max_side``, else 512."""
    if override is not None:
        return override
    from snap2caption.models.artifact import read_artifact_info

    value = read_artifact_info(folder).get("extra", {}).get(IMAGE_MAX_SIDE_KEY)
    return int(value) if value else DEFAULT_IMAGE_MAX_SIDE


def load_backend(kind: str, folder: Path, *, image_max_side: int | None, threads: int) -> CaptionBackend:
    """Load a verified artifact folder into the runtime ``kind``.

    Args:
        kind: ``torch``, or ``onnx`` (the artifact must carry the ONNX export).
        folder: The downloaded, verified artifact.
        image_max_side: Overrides the artifact's max side.
        threads: Intra-op threads of ONNX Runtime sessions; torch's pools are process-wide and set
            once at startup (``snap2caption.serving.configure_torch_threads``).

    Raises:
        ValueError: An unknown runtime, or an artifact without what the runtime needs.
    """
    if kind == "torch":
        return TorchBackend(folder, image_max_side)
    if kind == "onnx":
        return OnnxBackend(folder, image_max_side, threads)
    raise ValueError(f"unknown caption backend {kind!r} (torch, onnx)")


def warm_up(backend: CaptionBackend) -> None:
    """One dummy batch (a mid-grey image) through the whole decode path, before the model serves."""
    shape = backend.spec.preprocess.output_shape
    backend.caption(np.zeros((1, *shape), np.float32), backend.defaults)


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
    """

    captions: list[ImageCaption]
    model_version: int
    queue_s: float
    inference_s: float
    batch_size: int


class CaptionEngine:
    """The captioner's model, batcher and input pipeline.

    Args:
        settings: Service settings.
        source_factory: Registry client factory; default a :class:`Registry` on ``settings.tracking_uri``.
    """

    def __init__(self, settings: Settings, source_factory: Callable[[], ModelSource] | None = None) -> None:
        self.settings = settings
        self.limits = DecodeLimits(max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels)
        self.lane: ModelLane[CaptionBackend, ImageItem, ImageCaption] = ModelLane(
            settings.model_name,
            settings.model_alias,
            settings.backend,
            loader=self._load,
            warmup=warm_up,
            batch_fn=self._run_batch,
            settings=settings,
            source_factory=source_factory or (lambda: Registry(settings.tracking_uri)),
        )
        self._decode_limiter = CapacityLimiter(settings.decode_threads)

    def _load(self, folder: Path, info: ModelVersionInfo) -> CaptionBackend:
        return load_backend(
            self.settings.backend,
            folder,
            image_max_side=self.settings.image_max_side,
            threads=self.settings.threads,
        )

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
        return Readiness(ready=problem is None, checks=checks, reason=problem or "")

    # ------------------------------------------------------------------------------ requests

    def options(self, max_new_tokens: int | None, num_beams: int | None) -> DecodeOptions:
        """The request's decoding options, defaults from the serving model, checked against the limits.

        Raises:
            NotReady: No model loaded yet.
            BadRequest: A value over the service's or the model's limit.
        """
        backend = self.lane.store.get().model
        limit = min(self.settings.max_new_tokens, backend.max_new_tokens_limit)
        beams = self.settings.max_beams
        if max_new_tokens is None:
            max_new_tokens = min(backend.defaults.max_new_tokens, limit)
        if num_beams is None:
            num_beams = min(backend.defaults.num_beams, beams)
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
        spec = self.lane.store.get().model.spec
        pixels = await prepare_images(
            images, lambda data: prepare_image(data, spec, self.limits), self._decode_limiter
        )
        return [ImageItem(data, spec, p) for data, p in zip(images, pixels, strict=True)]

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
            batched.outputs, version, batched.queue_s, batched.inference_s, max(batched.batch_sizes)
        )

    def _run_batch(self, items: list[ImageItem], options: object) -> list[ImageCaption]:
        """One model call (on the batcher's thread): every item on the model current at its start."""
        assert isinstance(options, DecodeOptions)
        loaded = self.lane.store.get()
        backend = loaded.model
        spec = backend.spec
        pixels = np.stack(
            [
                item.pixels if item.spec == spec else prepare_image(item.data, spec, self.limits)
                for item in items
            ]
        )  # (B, 3, H, W)
        # Checked against the model current when the request came; a model swapped in since may allow fewer.
        options = DecodeOptions(min(options.max_new_tokens, backend.max_new_tokens_limit), options.num_beams)
        captions = backend.caption(pixels, options)
        return [ImageCaption(c.text, math.exp(c.confidence), c.n_tokens, loaded.version) for c in captions]
