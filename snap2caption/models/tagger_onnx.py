"""The ImageNet tagger on ONNX Runtime, with the preprocessing and tags of ``snap2caption.models.tagger``.

A tagger artifact folder holds what ``Tagger.save`` writes (``model.safetensors``, ``config.json``) plus::

    model.onnx       pixels (B, 3, 224, 224) float32 -> logits (B, 1000); metadata_props carry the format,
                     backbone, class count, preprocessing and labels
    model.int8.onnx  optional int8 variant (``snap2caption export tagger --int8``)
    README.md        model card (what ``test_top1`` measures)
    eval.json        the labelled-photo evaluation
    MANIFEST.json    sha256 of every other file

``TaggerOnnx.load(folder)`` needs neither timm nor the PyTorch weights: the preprocessing runs in
numpy/PIL (``Preprocess``) and the logits become tags through the tagger's own ``tags_from_logits``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from snap2caption.imaging.transforms import Preprocess
from snap2caption.models.imagenet_names import hashtag
from snap2caption.models.tags import CONFIG_FILE, Tag, TaggerConfig, tags_from_logits

if TYPE_CHECKING:
    import onnxruntime

FORMAT = "snap2caption.tagger"
ONNX_FILE = "model.onnx"
INT8_ONNX_FILE = "model.int8.onnx"
INPUT_NAME = "pixels"
OUTPUT_NAME = "logits"


def onnx_metadata(config: TaggerConfig) -> dict[str, Any]:
    """``metadata_props`` of a tagger ONNX file (JSON values), so the file describes itself."""
    size = config.preprocess["crop"]
    return {
        "snap2caption.format": FORMAT,
        "task": "classify",
        "backbone": config.backbone,
        "num_classes": config.num_classes,
        "input": {"name": INPUT_NAME, "shape": ["batch", 3, size, size], "layout": "NCHW RGB"},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", config.num_classes], "kind": "logits"},
        "preprocess": config.preprocess,
        "labels": config.labels,
        "names": config.names,
    }


class TaggerOnnx:
    """Tags images with an ONNX Runtime session; the API of ``Tagger`` (``logits``, ``tag``, ``from_logits``).

    Args:
        session: A session on a tagger ONNX file.
        config: The artifact's ``TaggerConfig``.
    """

    def __init__(self, session: onnxruntime.InferenceSession, config: TaggerConfig) -> None:
        from snap2caption.models.onnx_io import session_metadata

        metadata = session_metadata(session)
        if metadata.get("snap2caption.format") != FORMAT:
            raise ValueError(f"ONNX file is not a {FORMAT} (metadata {sorted(metadata)})")
        expected = json.loads(json.dumps(config.preprocess))  # tuples -> lists, as stored
        if (
            json.loads(metadata["num_classes"]) != config.num_classes
            or json.loads(metadata["preprocess"]) != expected
        ):
            raise ValueError("ONNX metadata (classes, preprocessing) does not match config.json")
        self.session = session
        self.config = config
        self.labels = list(config.labels)
        self.names = list(config.names)
        self.hashtags = [hashtag(name) for name in self.names]
        self.preprocess = Preprocess.from_dict(config.preprocess)
        self._input = session.get_inputs()[0].name

    @classmethod
    def load(
        cls,
        directory: str | Path,
        *,
        int8: bool = False,
        threads: int = 1,
        session_options: onnxruntime.SessionOptions | None = None,
        verify: bool = True,
    ) -> TaggerOnnx:
        """Load ``model.onnx`` (or ``model.int8.onnx``) and ``config.json`` from an artifact folder.

        Args:
            directory: The folder.
            int8: Run the int8 variant.
            threads: ONNX Runtime intra-op threads (ignored when ``session_options`` is given).
            session_options: ONNX Runtime options to use as they are.
            verify: Check every file against ``MANIFEST.json`` first.
        """
        from snap2caption.models.onnx_io import cpu_session

        folder = Path(directory)
        if verify:
            from snap2caption.registry import verify_manifest

            verify_manifest(folder)
        config = TaggerConfig.from_dict(json.loads((folder / CONFIG_FILE).read_text()))
        session = cpu_session(
            folder / (INT8_ONNX_FILE if int8 else ONNX_FILE), threads=threads, options=session_options
        )
        return cls(session, config)

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return self.config.num_classes

    def logits(self, images: Sequence[Image.Image], batch_size: int = 32) -> np.ndarray:
        """Preprocess and classify in batches: (N, num_classes) float32 logits."""
        out = [np.zeros((0, self.num_classes), np.float32)]
        for start in range(0, len(images), batch_size):
            pixels = self.preprocess.batch(list(images[start : start + batch_size]))  # (b, 3, H, W)
            out.append(np.asarray(self.session.run(None, {self._input: pixels})[0], dtype=np.float32))
        return np.concatenate(out)

    def tag(
        self, images: Sequence[Image.Image], top_k: int = 5, min_score: float = 0.0, batch_size: int = 32
    ) -> list[list[Tag]]:
        """Tag each image: up to ``top_k`` tags with distinct names, best first (as ``Tagger.tag``)."""
        return self.from_logits(self.logits(images, batch_size=batch_size), top_k=top_k, min_score=min_score)

    def from_logits(self, logits: np.ndarray, top_k: int = 5, min_score: float = 0.0) -> list[list[Tag]]:
        """Logits -> tags, exactly as ``Tagger.from_logits``."""
        return tags_from_logits(
            logits, self.labels, self.names, self.hashtags, top_k=top_k, min_score=min_score
        )
