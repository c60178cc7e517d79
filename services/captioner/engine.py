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
from snap2caption.models.decoding import Caption
from snap2caption.monitoring.drift import ModelDrift
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
        runtime: The runtime that ran it (``torch``, ``onnx``, ``onnx-int8``).
    """

    text: str
    confidence: float
    tokens: int
    model_version: int
    runtime: str = ""


class CaptionBackend(Protocol):
    """A caption model behind one runtime. Methods run on worker threads, never on the event loop.

    Attributes:
        backend: Runtime name (``torch``, ``onnx``, ``onnx-int8``).
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


@dataclass(frozen=True)
class StaticOptions:
    """How the torch backend runs: device, and the static-cache decoder (CUDA graphs on CUDA)."""

    device: str = "cpu"
    enabled: bool = False
    dtype: str = "bfloat16"
    cuda_graphs: bool = True
    max_batch: int = 16
    max_beams: int = 4
    max_new_tokens: int = 32


class TorchBackend:
    """:class:`~snap2caption.models.caption.CaptionModel` in PyTorch, eval mode, KV-cached decoding."""

    backend = "torch"

    def __init__(
        self, folder: Path, image_max_side: int | None = None, static: StaticOptions | None = None
    ) -> None:
        from snap2caption.models.artifact import load_caption_model

        self.device = static.device if static else "cpu"
        self.model, _ = load_caption_model(folder, verify=True, device=self.device)
        self.spec = InputSpec(_max_side(folder, image_max_side), self.model.preprocess)
        decoding = self.model.config.decoding
        self.defaults = DecodeOptions(decoding.max_new_tokens, decoding.num_beams)
        self.max_new_tokens_limit = self.model.config.decoder.n_positions - self.model.prefix_len - 1
        if static is not None and static.enabled:
            import torch

            from snap2caption.models.caption_static import StaticDecoder

            # The cache holds P + 1 + max_new_tokens positions for max_batch x max_beams rows.
            self.max_new_tokens_limit = min(self.max_new_tokens_limit, static.max_new_tokens)
            StaticDecoder.attach(
                self.model,
                max_batch=static.max_batch * static.max_beams,
                max_new_tokens=self.max_new_tokens_limit,
                dtype=torch.bfloat16 if static.dtype == "bfloat16" else torch.float32,
                cuda_graphs=static.cuda_graphs,
            )

    def caption(self, pixels: np.ndarray, options: DecodeOptions) -> list[Caption]:
        import torch

        with torch.inference_mode():
            return self.model.generate(
                torch.from_numpy(pixels).to(self.device),  # (B, 3, H, W)
                max_new_tokens=options.max_new_tokens,
                num_beams=options.num_beams,
            )


class OnnxBackend:
    """The artifact's ONNX export on ONNX Runtime, decoded by the NumPy twin of the torch loop
    (``snap2caption.models.caption_ort``): no torch or transformers in the process. ``int8`` picks the
    dynamically quantized decoder (``snap2caption export caption --int8``)."""

    def __init__(
        self, folder: Path, image_max_side: int | None = None, threads: int = 1, int8: bool = False
    ) -> None:
        from snap2caption.models.caption_ort import CaptionOrt
        from snap2caption.registry import verify_manifest

        verify_manifest(folder)  # as load_caption_model(verify=True) does for torch
        self.backend = "onnx-int8" if int8 else "onnx"
        self.runtime = CaptionOrt(folder, threads=threads, int8=int8)
        self.spec = InputSpec(_max_side(folder, image_max_side), self.runtime.preprocess)
        decoding = self.runtime.decoding
        self.defaults = DecodeOptions(decoding.max_new_tokens, decoding.num_beams)
        self.max_new_tokens_limit = self.runtime.max_new_tokens_limit

    def caption(self, pixels: np.ndarray, options: DecodeOptions) -> list[Caption]:
        return self.runtime.generate(
            pixels, max_new_tokens=options.max_new_tokens, num_beams=options.num_beams
        )


def _max_side(folder: Path, override: int | None) -> int:
    """The settings' value, else the artifact's ``extra.image_max_side``, else 512."""
    if override is not None:
        return override
    import json  # not models.artifact: it imports torch, which the ONNX backend runs without

    info = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    value = info.get("extra", {}).get(IMAGE_MAX_SIDE_KEY)
    return int(value) if value else DEFAULT_IMAGE_MAX_SIDE


def load_backend(
    kind: str,
    folder: Path,
    *,
    image_max_side: int | None,
    threads: int,
    static: StaticOptions | None = None,
) -> CaptionBackend:
    """Load a verified artifact folder into the runtime ``kind``.

    Args:
        kind: ``torch``, ``onnx`` or ``onnx-int8`` (the artifact must carry the ONNX export), or ``auto``
            (``onnx`` when it does, else ``torch``).
        folder: The downloaded, verified artifact.
        image_max_side: Overrides the artifact's max side.
        threads: Intra-op threads of ONNX Runtime sessions; torch's pools are process-wide and set
            once at startup (``snap2caption.serving.configure_torch_threads``).

    Raises:
        ValueError: An unknown runtime, or an artifact without what the runtime needs.
    """
    if kind == "auto":
        kind = "onnx" if (folder / "onnx" / "decoder.onnx").is_file() else "torch"
    if kind == "torch":
        return TorchBackend(folder, image_max_side, static)
    if kind in ("onnx", "onnx-int8"):
        return OnnxBackend(folder, image_max_side, threads, int8=kind == "onnx-int8")
    raise ValueError(f"unknown caption backend {kind!r} (torch, onnx, onnx-int8)")


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
        # Input drift (image statistics) and output drift (caption confidence) against the reference the
        # serving artifact carries; off for artifacts without one.
        self.drift = ModelDrift.from_settings("captioner", settings)

    def _load(self, folder: Path, info: ModelVersionInfo) -> CaptionBackend:
        backend = load_backend(
            self.settings.backend,
            folder,
            image_max_side=self.settings.image_max_side,
            threads=self.settings.threads,
            static=StaticOptions(
                device=self.settings.device,
                enabled=self.settings.static_decoder,
                dtype=self.settings.static_dtype,
                cuda_graphs=self.settings.cuda_graphs,
                max_batch=self.settings.max_batch_size,
                max_beams=self.settings.max_beams,
                max_new_tokens=self.settings.max_new_tokens,
            ),
        )
        self.drift.loaded(info.version, folder)
        return backend

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
        loaded = self.lane.store.get()
        spec = loaded.model.spec
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
        out = [
            ImageCaption(c.text, math.exp(c.confidence), c.n_tokens, loaded.version, backend.backend)
            for c in captions
        ]
        for caption in out:  # output drift: the reference holds the test split's confidences
            self.drift.observe(loaded.version, {"caption_confidence": caption.confidence})
        return out
