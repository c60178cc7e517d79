"""How a caption artifact runs: :func:`load` picks a runtime and returns a :class:`Captioner`.

- ``torch``: :class:`TorchCaptioner`, :meth:`CaptionModel.generate` in PyTorch (KV-cached greedy or beam
  search), optionally on the static-cache decoder with CUDA graphs (:class:`StaticOptions`);
- ``onnx`` / ``onnx-int8``: :class:`~snap2caption.models.caption.ort.OrtCaptioner`, the artifact's ONNX
  export on ONNX Runtime, decoded by the NumPy twin of the torch loop, with no torch in the process
  (``onnx-int8``: the dynamically quantized decoder);
- ``auto``: ``onnx`` when the artifact carries the export, else ``torch``.

The captioner service, the evaluators and batch jobs all call the same :class:`Captioner`. This module
imports neither torch nor ONNX Runtime: each runtime imports its own stack when it is chosen.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from snap2caption.imaging.transforms import Preprocess
from snap2caption.models.caption.calibration import Calibration, calibrate, read_calibration
from snap2caption.models.caption.decoding import Caption, DecodingConfig
from snap2caption.models.caption.domain import read_domain, with_domain
from snap2caption.models.caption.files import REQUIRED_FILES, has_onnx
from snap2caption.models.caption.views import caption_views, flip_pixels
from snap2caption.models.runtime import artifact_folder

if TYPE_CHECKING:
    from snap2caption.models.caption.model import CaptionModel
    from snap2caption.models.domain import DomainModel
    from snap2caption.models.providers import OrtProviders

RUNTIMES = ("auto", "torch", "onnx", "onnx-int8")


class Captioner(Protocol):
    """A caption model behind one runtime: pixels in, one caption per image out.

    Attributes:
        runtime: ``torch``, ``onnx`` or ``onnx-int8``.
        preprocess: PIL image -> (3, H, W) float32 pixels, exactly as in training.
        decoding: The model's decoding defaults.
        max_new_tokens_limit: Most new tokens the model's positions (or its static cache) allow.
        image_max_side: Longest side of the images training read, when the artifact records it.
        providers: ONNX Runtime's execution providers of each session (``encoder``, ``decoder``), best
            first; empty on torch.
        calibration: The artifact's confidence calibration (``calibration.json``), applied to every
            caption's ``calibrated``; None for an artifact without one.
        domain: The artifact's training domain (``domain.json``), or None for an artifact without one;
            with it, every caption carries ``in_domain`` and ``domain_score``.
    """

    runtime: str
    providers: dict[str, list[str]]
    preprocess: Preprocess
    decoding: DecodingConfig
    image_max_side: int | None
    domain: DomainModel | None
    calibration: Calibration | None

    @property
    def max_new_tokens_limit(self) -> int: ...

    def generate(
        self, pixels: np.ndarray, *, max_new_tokens: int | None = None, num_beams: int | None = None
    ) -> list[Caption]:
        """Caption (B, 3, H, W) float32 preprocessed images; arguments left None take :attr:`decoding`'s.
        Each caption's ``calibrated`` is set when the artifact has a calibration.

        Each caption carries the image's domain answer when the artifact has a domain model.

        Raises:
            ValueError: Settings out of range, or longer than :attr:`max_new_tokens_limit`.
        """
        ...


@dataclass(frozen=True)
class StaticOptions:
    """The torch runtime's device, and its static-cache decoder (CUDA graphs on CUDA).

    Attributes:
        device: Torch device (``cpu``, ``cuda``, ``cuda:1``).
        enabled: Decode on :class:`~snap2caption.models.caption.static.StaticDecoder`.
        dtype: Its weights' and cache's dtype: ``bfloat16`` or ``float32``.
        cuda_graphs: Capture its one-token step per padded batch size on CUDA.
        max_batch: Most images per call.
        max_beams: Most beams per image (the cache holds ``max_batch * max_beams`` rows).
        max_new_tokens: Most new tokens per call (the cache holds P + 1 + this many positions).
    """

    device: str = "cpu"
    enabled: bool = False
    dtype: str = "bfloat16"
    cuda_graphs: bool = True
    max_batch: int = 16
    max_beams: int = 4
    max_new_tokens: int = 32


class TorchCaptioner:
    """A :class:`Captioner` on a :class:`~snap2caption.models.caption.model.CaptionModel` in PyTorch.

    Args:
        model: The model, in eval mode on its device.
        image_max_side: What the artifact records, if anything.
        calibration: The artifact's confidence calibration, if any.
        domain: The artifact's domain model, if any.
        static: Attach the static-cache decoder (``static.enabled``); the model's decoder is then cast to
            ``static.dtype`` in place.
    """

    runtime = "torch"

    def __init__(
        self,
        model: CaptionModel,
        image_max_side: int | None = None,
        static: StaticOptions | None = None,
        calibration: Calibration | None = None,
        domain: DomainModel | None = None,
    ) -> None:
        self.model = model
        self.providers: dict[str, list[str]] = {}  # no ONNX Runtime session
        self.device = next(model.parameters()).device
        self.preprocess = model.preprocess
        self.decoding = model.config.decoding
        self.image_max_side = image_max_side
        self.domain = domain
        self.calibration = calibration
        self.max_new_tokens_limit = model.config.decoder.n_positions - model.prefix_len - 1
        if static is not None and static.enabled:
            import torch

            from snap2caption.models.caption.static import StaticDecoder

            # The cache holds P + 1 + max_new_tokens positions for max_batch x max_beams rows.
            self.max_new_tokens_limit = min(self.max_new_tokens_limit, static.max_new_tokens)
            StaticDecoder.attach(
                model,
                max_batch=static.max_batch * static.max_beams,
                max_new_tokens=self.max_new_tokens_limit,
                dtype=torch.bfloat16 if static.dtype == "bfloat16" else torch.float32,
                cuda_graphs=static.cuda_graphs,
            )

    def generate(
        self, pixels: np.ndarray, *, max_new_tokens: int | None = None, num_beams: int | None = None
    ) -> list[Caption]:
        import torch

        settings = self.decoding
        with torch.inference_mode():
            # The prefix is computed once: the decoder's prompt and the domain check's feature.
            prefix = self.model.encode(torch.from_numpy(pixels).to(self.device))  # (B, P, D)
            captions = self.model.generate(prefix=prefix, max_new_tokens=max_new_tokens, num_beams=num_beams)

            def decode_view(view: int, rows: list[int]) -> list[Caption]:
                mirrored = torch.from_numpy(flip_pixels(pixels[rows], view)).to(self.device)
                return self.model.generate(mirrored, max_new_tokens=max_new_tokens, num_beams=num_beams)

            captions = caption_views(captions, decode_view, settings.views, settings.views_below)
            captions = calibrate(captions, self.calibration)
            if self.domain is None:
                return captions
            return with_domain(captions, prefix.float().cpu().numpy(), self.domain)


def load(
    source: str | Path,
    runtime: str = "auto",
    *,
    threads: int = 1,
    static: StaticOptions | None = None,
    providers: OrtProviders | None = None,
    verify: bool = True,
    tracking_uri: str | None = None,
    cache_dir: str | Path | None = None,
) -> Captioner:
    """Load a caption artifact into the runtime ``runtime``.

    Args:
        source: An artifact folder, or ``models:/NAME@ALIAS`` / ``models:/NAME/VERSION`` (downloaded and
            verified through the registry).
        runtime: ``torch``, ``onnx`` or ``onnx-int8`` (the artifact must carry the ONNX export), or
            ``auto`` (``onnx`` when it does, else ``torch``).
        threads: Intra-op threads of the ONNX Runtime sessions; torch's pools are process-wide
            (``snap2caption.serving.configure_torch_threads``).
        static: The torch runtime's device and static decoder (default: CPU, plain decoding).
        providers: The ONNX runtimes' execution providers (default: ``SNAP2CAPTION_ORT_PROVIDERS``,
            ``auto``: TensorRT, CUDA, CPU among those installed).
        verify: Check every file against ``MANIFEST.json`` first.
        tracking_uri: MLflow tracking URI for registry references.
        cache_dir: Download cache for registry references.

    Raises:
        ValueError: An unknown runtime, or an artifact without what the runtime needs.
        ArtifactError: Files that do not match the manifest, not a caption artifact, a broken domain
            model (``domain.json``; an artifact without one loads with ``domain`` None), or a malformed
            ``calibration.json``.
        ProviderUnavailable: An execution provider asked for by name that this machine cannot run.
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown caption runtime {runtime!r} ({', '.join(RUNTIMES)})")
    folder = artifact_folder(
        source, REQUIRED_FILES, verify=verify, tracking_uri=tracking_uri, cache_dir=cache_dir
    )
    if runtime == "auto":
        runtime = "onnx" if has_onnx(folder) else "torch"
    if runtime == "torch":
        from snap2caption.models.caption.artifact import load_caption_model
        from snap2caption.models.caption.files import image_max_side, read_artifact_info

        device = static.device if static else "cpu"
        model, _ = load_caption_model(folder, verify=False, device=device)
        info = read_artifact_info(folder)
        return TorchCaptioner(
            model, image_max_side(info), static, read_calibration(folder), domain=read_domain(folder)
        )
    from snap2caption.models.caption.ort import OrtCaptioner

    return OrtCaptioner(folder, threads=threads, int8=runtime == "onnx-int8", providers=providers)
