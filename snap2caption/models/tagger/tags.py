"""Tags without torch: the tag record and classifier logits -> tags, whatever runtime made the logits."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


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


def tags_from_logits(
    logits: Any,
    labels: Sequence[str],
    names: Sequence[str],
    hashtags: Sequence[str],
    top_k: int = 5,
    min_score: float = 0.0,
) -> list[list[Tag]]:
    """Classifier logits -> tags (see :meth:`~snap2caption.models.tagger.runtime.Tagger.from_logits`).

    ``logits`` are (N, num_classes), a NumPy array or a torch tensor; ``labels``, ``names`` and
    ``hashtags`` are per class, in output order.
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
