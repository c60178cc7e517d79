"""Tags without torch: the tag record, the tagger's config, and logits -> tags.

Shared by the PyTorch tagger (``snap2caption.models.tagger``) and the ONNX Runtime one
(``snap2caption.models.tagger_onnx``), which the detector service runs without importing torch.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Tag:
    """One tag for one image.

    Attributes:
        label: the class label, e.g. ``"tabby, tabby cat"``.
        name: the plain word a post would use, e.g. ``"cat"``.
        score: softmax probability of ``label`` (the best class among those sharing ``name``).
        hashtag: e.g. ``"#cat"``.
        class_index: index of ``label`` in the classifier's output.
    """

    label: str
    name: str
    score: float
    hashtag: str
    class_index: int

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class TaggerConfig:
    """Everything besides the weights needed to rebuild a tagger; saved as ``config.json``.

    Attributes:
        backbone: encoder name for :func:`~snap2caption.models.backbones.build_encoder`.
        num_classes: classifier size; ``labels`` and ``names`` have this many entries.
        preprocess: ``Preprocess.to_dict()`` of the preprocessing the weights expect.
        labels: class labels in output order.
        names: readable word per class, in output order.
        format_version: bumped when the artifact layout changes.
    """

    backbone: str
    num_classes: int
    preprocess: dict[str, Any]
    labels: list[str]
    names: list[str]
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.format_version != FORMAT_VERSION:
            raise ValueError(f"tagger format_version {self.format_version} is not {FORMAT_VERSION}")
        if not len(self.labels) == len(self.names) == self.num_classes:
            raise ValueError(
                f"tagger config: {len(self.labels)} labels and {len(self.names)} names "
                f"for {self.num_classes} classes"
            )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaggerConfig:
        """Build from a dict, refusing unknown keys (with the nearest known key as a hint)."""
        known = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in known:
                hint = difflib.get_close_matches(key, known, n=1)
                raise ValueError(
                    f"unknown tagger config key {key!r}" + (f"; did you mean {hint[0]!r}?" if hint else "")
                )
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        return dataclasses.asdict(self)


def tags_from_logits(
    logits: Any,
    labels: Sequence[str],
    names: Sequence[str],
    hashtags: Sequence[str],
    top_k: int = 5,
    min_score: float = 0.0,
) -> list[list[Tag]]:
    """Classifier logits -> tags; shared by the PyTorch and the ONNX Runtime tagger.

    ``logits`` are (N, num_classes), a NumPy array or a torch tensor; ``labels``, ``names`` and
    ``hashtags`` are per class, in output order. See ``Tagger.from_logits``.
    """
    num_classes = len(labels)
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if hasattr(logits, "detach"):  # a torch tensor, possibly on a GPU
        logits = logits.detach().float().cpu().numpy()
    scores = np.asarray(logits, dtype=np.float32)
    if scores.ndim != 2 or scores.shape[1] != num_classes:
        raise ValueError(f"logits must be (N, {num_classes}), got {tuple(scores.shape)}")
    exp = np.exp(scores - scores.max(axis=1, keepdims=True))
    softmax = exp / exp.sum(axis=1, keepdims=True)
    order = np.argsort(-softmax, axis=1, kind="stable")  # (N, C) best first; ties keep class order
    probs = np.take_along_axis(softmax, order, axis=1)
    results: list[list[Tag]] = []
    for row_probs, row_order in zip(probs.tolist(), order.tolist(), strict=True):
        tags: list[Tag] = []
        seen: set[str] = set()
        for score, index in zip(row_probs, row_order, strict=True):
            if score < min_score or len(tags) == top_k:
                break
            name = names[index]
            if name in seen:  # a better-scoring class already gave this name
                continue
            seen.add(name)
            tags.append(Tag(labels[index], name, score, hashtags[index], index))
        results.append(tags)
    return results
