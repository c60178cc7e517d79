"""The caption model's training domain: which features describe it, and the domain answer per caption.

The feature is ``prefix.pooled``: the mean over the P prefix embeddings the image side computes, (B, P, D)
-> (B, D). Both runtimes compute the prefix for every image anyway (the torch runtime with
:meth:`CaptionModel.encode`, the ONNX one as the output of ``onnx/encoder.onnx``), so the domain check
costs no second encoder pass; training computes the same vector from its cached encoder features with
the mapping network (``training/caption/run.py``). The domain model itself is
:mod:`snap2caption.models.domain` (``domain.json`` + ``domain.npz`` in the artifact folder).

No torch here: the ONNX Runtime runtime uses it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import numpy as np

from snap2caption.models.caption.decoding import Caption
from snap2caption.models.domain import DomainModel, load_domain

# The feature space of a caption artifact's domain model (recorded in domain.json, checked on load).
DOMAIN_FEATURE = "prefix.pooled"


def pooled_prefix(prefix: np.ndarray) -> np.ndarray:
    """(B, P, D) prefix embeddings -> (B, D) float64 features of :data:`DOMAIN_FEATURE`."""
    if prefix.ndim != 3:
        raise ValueError(f"prefix must be (B, P, D), got {prefix.shape}")
    return np.asarray(prefix, dtype=np.float64).mean(axis=1)


def read_domain(folder: str | os.PathLike[str]) -> DomainModel | None:
    """The artifact's domain model, or ``None`` for an artifact saved without one.

    Raises:
        ArtifactError: Broken domain files, or a domain model of another feature space.
    """
    return load_domain(folder, feature=DOMAIN_FEATURE)


def with_domain(captions: Sequence[Caption], prefix: np.ndarray, domain: DomainModel | None) -> list[Caption]:
    """The captions with each image's domain answer (unchanged, ``in_domain`` None, without a domain model).

    Args:
        captions: One caption per image.
        prefix: (B, P, D) prefix embeddings of the same images, in order.
        domain: The artifact's domain model.
    """
    if domain is None:
        return list(captions)
    checks = domain.check(pooled_prefix(prefix))
    return [
        dataclasses.replace(c, in_domain=k.in_domain, domain_score=k.domain_score)
        for c, k in zip(captions, checks, strict=True)
    ]
