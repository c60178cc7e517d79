"""The tagger at run time: :func:`load` picks a runtime and returns a :class:`Tagger`.

A :class:`Tagger` is the artifact's classes (labels, readable names, hashtags), its preprocessing and one
function, ``forward``: (B, 3, H, W) float32 pixels -> (B, num_classes) float32 logits, run by

- ``onnx``: ONNX Runtime on ``model.onnx`` (``model.int8.onnx`` with ``int8``): no torch, no timm;
- ``torch``: the :class:`~snap2caption.models.tagger.net.TaggerNet` rebuilt from ``model.safetensors``;
- ``auto``: ``onnx`` when the artifact has ``model.onnx``, else ``torch``.

Everything else (preprocessing, logits -> tags) is the same code on both. The detector service, the
packaging job's measurements and the benchmarks all call it. This module imports neither torch nor ONNX
Runtime: each runtime imports its own stack when it is chosen.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from snap2caption.imaging.transforms import Preprocess
from snap2caption.models.runtime import RuntimeChoice, artifact_folder, resolve_runtime
from snap2caption.models.tagger.config import (
    INT8_ONNX_FILE,
    ONNX_FILE,
    ONNX_FORMAT,
    REQUIRED_FILES,
    TaggerConfig,
    read_config,
)
from snap2caption.models.tagger.imagenet_names import hashtag
from snap2caption.models.tagger.tags import Tag, tags_from_logits

if TYPE_CHECKING:
    import onnxruntime
    import torch

    from snap2caption.models.providers import OrtProviders
    from snap2caption.models.tagger.net import TaggerNet


class Tagger:
    """Tags images with classifier classes, their readable names and hashtags, on one runtime.

    ``min_score`` is the artifact's calibrated default minimum tag probability (``config.json``), which the
    services apply unless a request asks for another; :meth:`tag` and :meth:`from_logits` take theirs
    explicitly.

    Args:
        config: The artifact's classes and preprocessing.
        forward: ``(B, 3, H, W)`` float32 pixels -> ``(B, num_classes)`` float32 logits.
        runtime: ``onnx`` or ``torch``, for status and reports.
        providers: ONNX Runtime's execution providers of the session (``{"model": [...]}``), best first;
            empty on torch.
    """

    def __init__(
        self,
        config: TaggerConfig,
        forward: Callable[[np.ndarray], np.ndarray],
        runtime: str,
        providers: dict[str, list[str]] | None = None,
    ) -> None:
        self.config = config
        self.forward = forward
        self.runtime = runtime
        self.providers = providers or {}
        self.min_score = config.min_score
        self.labels = list(config.labels)
        self.names = list(config.names)
        self.hashtags = [hashtag(name) for name in self.names]
        self.preprocess = Preprocess.from_dict(config.preprocess)

    @classmethod
    def from_net(
        cls, net: TaggerNet, device: str | torch.device = "cpu", config: TaggerConfig | None = None
    ) -> Tagger:
        """The ``torch`` runtime on an in-memory network (moved to ``device``, eval mode); ``config``: the
        artifact's, when the network was loaded from one (default: the network's own, ``min_score`` 0)."""
        import torch

        net = net.to(device).eval()

        def run(pixels: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return net(torch.from_numpy(pixels).to(device)).float().cpu().numpy()

        return cls(config or net.config(), run, "torch")

    @classmethod
    def from_onnx(
        cls,
        path: str | Path,
        config: TaggerConfig,
        *,
        threads: int = 1,
        session_options: onnxruntime.SessionOptions | None = None,
        providers: OrtProviders | None = None,
    ) -> Tagger:
        """The ``onnx`` runtime on one ONNX file, whose metadata must match ``config``; ``providers``: see
        :func:`~snap2caption.models.onnx_io.ort_session`.

        Raises:
            ValueError: Not a tagger ONNX file, or one exported with other classes or preprocessing.
            ProviderUnavailable: An execution provider asked for by name that this machine cannot run.
        """
        from snap2caption.models.onnx_io import ort_session, session_metadata

        session = ort_session(path, threads=threads, options=session_options, providers=providers)
        metadata = session_metadata(session)
        if metadata.get("snap2caption.format") != ONNX_FORMAT:
            raise ValueError(f"ONNX file is not a {ONNX_FORMAT} (metadata {sorted(metadata)})")
        expected = json.loads(json.dumps(config.preprocess))  # tuples -> lists, as stored
        if (
            json.loads(metadata["num_classes"]) != config.num_classes
            or json.loads(metadata["preprocess"]) != expected
        ):
            raise ValueError("ONNX metadata (classes, preprocessing) does not match config.json")
        input_name = session.get_inputs()[0].name

        def run(pixels: np.ndarray) -> np.ndarray:
            return np.asarray(session.run(None, {input_name: pixels})[0], dtype=np.float32)

        return cls(config, run, "onnx", {"model": session.get_providers()})

    @property
    def num_classes(self) -> int:
        """Number of classes the classifier scores."""
        return self.config.num_classes

    def logits(self, images: Sequence[Image.Image], batch_size: int = 32) -> np.ndarray:
        """Preprocess and classify ``images``, ``batch_size`` at a time: (N, num_classes) float32 logits."""
        out = [np.zeros((0, self.num_classes), np.float32)]
        for start in range(0, len(images), batch_size):
            pixels = self.preprocess.batch(list(images[start : start + batch_size]))  # (b, 3, H, W) float32
            out.append(self.forward(np.ascontiguousarray(pixels)))  # (b, num_classes)
        return np.concatenate(out)

    def tag(
        self, images: Sequence[Image.Image], top_k: int = 5, min_score: float = 0.0, batch_size: int = 32
    ) -> list[list[Tag]]:
        """Tag each image: up to ``top_k`` tags with distinct names, best first (see :meth:`from_logits`)."""
        return self.from_logits(self.logits(images, batch_size=batch_size), top_k=top_k, min_score=min_score)

    def from_logits(self, logits: Any, top_k: int = 5, min_score: float = 0.0) -> list[list[Tag]]:
        """Turn classifier logits (from this tagger, the shared encoder, or any runtime) into tags.

        Classes that share a readable name are merged: "tabby" 0.5 and "tiger cat" 0.3 give one tag "cat"
        with score 0.5 (the max, not the sum, so a score is always one class's probability) and the label
        and index of the best class.

        Args:
            logits: (N, num_classes) raw scores, a NumPy array or a torch tensor; softmax is applied here.
            top_k: Most tags per image, after merging.
            min_score: Drop tags whose probability is below this.

        Returns:
            For each image, tags sorted by score, best first.
        """
        return tags_from_logits(
            logits, self.labels, self.names, self.hashtags, top_k=top_k, min_score=min_score
        )


def load(
    source: str | Path,
    runtime: RuntimeChoice = "auto",
    *,
    int8: bool = False,
    threads: int = 1,
    device: str = "cpu",
    session_options: onnxruntime.SessionOptions | None = None,
    providers: OrtProviders | None = None,
    verify: bool = True,
    tracking_uri: str | None = None,
    cache_dir: str | Path | None = None,
) -> Tagger:
    """Load a tagger artifact into the runtime ``runtime``.

    Args:
        source: An artifact folder, or ``models:/NAME@ALIAS`` / ``models:/NAME/VERSION``.
        runtime: ``onnx``, ``torch``, or ``auto`` (``onnx`` when the artifact has ``model.onnx``).
        int8: Run ``model.int8.onnx`` (``onnx`` only).
        threads: ONNX Runtime intra-op threads (torch uses the process's own setting).
        device: Torch device of the ``torch`` runtime.
        session_options: ONNX Runtime options to use as they are (a service's own).
        providers: ONNX Runtime execution providers (default: ``SNAP2CAPTION_ORT_PROVIDERS``, ``auto``).
        verify: Check every file against ``MANIFEST.json`` first.
        tracking_uri: MLflow tracking URI for registry references.
        cache_dir: Download cache for registry references.

    Raises:
        ArtifactIntegrityError: ``verify`` and the files do not match the manifest.
        FileNotFoundError: A needed file is missing.
        ValueError: An invalid config, an ONNX file that does not match it, or ``int8`` on ``torch``.
        ProviderUnavailable: An execution provider asked for by name that this machine cannot run.
    """
    folder = artifact_folder(
        source, REQUIRED_FILES, verify=verify, tracking_uri=tracking_uri, cache_dir=cache_dir
    )
    if resolve_runtime(runtime, folder, ONNX_FILE, int8=int8) == "onnx":
        onnx_file = folder / (INT8_ONNX_FILE if int8 else ONNX_FILE)
        return Tagger.from_onnx(
            onnx_file,
            read_config(folder),
            threads=threads,
            session_options=session_options,
            providers=providers,
        )
    from snap2caption.models.tagger.artifact import load_net

    return Tagger.from_net(load_net(folder), device, read_config(folder))
