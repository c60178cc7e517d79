"""The tagger's default minimum tag score, calibrated on the labelled photos that ship offline.

A tag is a softmax probability over 1,000 ImageNet classes: on a photo of a cat, "cat" scores 0.39 and
"plastic bag" 0.0009. Returning every top-5 class shows the second kind as if it were the first. The
minimum score is derived from data rather than guessed:

1. **Calibration set.** The labelled scikit-image photos of :mod:`training.tagger.photos` (the only real
   photos with known classes available offline): each photo's top-:data:`TOP_K` tags (the services'
   default), a tag counted right when its class is one accepted for the photo. That is
   ``len(PHOTOS) * TOP_K`` tags: a very small set, which the numbers below must be read with.
2. **Threshold.** Sorted by score, the tags kept above a threshold must reach :data:`TARGET_PRECISION`;
   of the thresholds that do, the lowest (it keeps the most right tags) is taken, placed at the geometric
   mean of the last tag kept and the first one dropped, so that it does not sit on a measured score. When
   no threshold reaches it (no right tag, as for a classifier whose classes are not ImageNet's), the
   minimum stays 0 (every tag) and the reason is recorded.
3. **What it does not do.** On synthetic shapes scenes, where no ImageNet class is right, the tagger's best
   class often scores higher than right tags on real photos ("clock" 0.78 for a circle): a minimum score
   cannot tell those apart, so :func:`calibrate_min_score` measures how many scenes still get tags rather
   than tuning on them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from snap2caption.models.tagger.tags import Tag
from training.tagger.photos import PHOTOS

TARGET_PRECISION = 0.9
TOP_K = 5  # tags per image the detector service and the gateway return by default
N_SCENES = 50
SCENE_SEED = 1013  # not a seed the synthetic benchmark (0) or the tests' datasets use


@dataclass(frozen=True)
class MinScoreCalibration:
    """The calibrated minimum tag score and what it gives on the calibration data.

    Attributes:
        min_score: The minimum (0 when it could not be calibrated).
        calibrated: Whether the photos calibrated it.
        method: How, in words (what ``eval.json`` and the model card state).
        target_precision: The precision the kept tags had to reach.
        top_k: Tags per photo considered.
        photos: Labelled photos.
        candidate_tags: Their tags considered (``photos * top_k``).
        right_tags: How many of those were right.
        kept_tags: Tags scored at or above ``min_score``.
        kept_right: Right tags among them.
        precision: ``kept_right / kept_tags`` (None when nothing is kept).
        recall: ``kept_right / right_tags`` (None without right tags).
        photos_top1_right_kept: Photos whose top-1 tag is right and kept.
        scenes: Synthetic shapes scenes tagged (no ImageNet class is right on them).
        scenes_with_tags: Share of those with at least one tag at or above ``min_score``.
        scene_tags_mean: Mean tags kept per scene.
        scene_max_score: The highest tag score on a scene.
    """

    min_score: float
    calibrated: bool
    method: str
    target_precision: float
    top_k: int
    photos: int
    candidate_tags: int
    right_tags: int
    kept_tags: int
    kept_right: int
    precision: float | None
    recall: float | None
    photos_top1_right_kept: int
    scenes: int
    scenes_with_tags: float
    scene_tags_mean: float
    scene_max_score: float

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (for ``eval.json``)."""
        return dataclasses.asdict(self)


def pick_threshold(scored: Sequence[tuple[float, bool]], target_precision: float) -> float | None:
    """The lowest threshold whose kept tags reach ``target_precision`` (see the module docstring).

    Args:
        scored: ``(score, right)`` per tag.
        target_precision: Share of kept tags that must be right.

    Returns:
        The threshold (tags scored at or above it are kept), or None when none reaches the target.
    """
    ranked = sorted(scored, key=lambda s: s[0], reverse=True)
    hits, best = 0, 0
    for k, (_, right) in enumerate(ranked, 1):
        hits += right
        if hits / k >= target_precision:
            best = k  # keeping the top k tags meets the target
    if best == 0:
        return None
    kept = ranked[best - 1][0]
    dropped = ranked[best][0] if best < len(ranked) else 0.0
    return math.sqrt(kept * dropped) if dropped > 0 else kept


def synthetic_scenes(n: int = N_SCENES, seed: int = SCENE_SEED) -> list[Image.Image]:
    """``n`` synthetic shapes scenes (the captioner's benchmark), rendered in memory."""
    from snap2caption.data.synth import SynthConfig, generate_scene, render_scene

    cfg = SynthConfig(images=n, seed=seed)
    scenes = []
    for index in range(n):
        rng = np.random.default_rng([seed, index])  # as the benchmark seeds its images
        scenes.append(render_scene(generate_scene(rng, cfg), rng))
    return scenes


def calibrate_min_score(
    tag: Callable[..., list[list[Tag]]],
    *,
    target_precision: float = TARGET_PRECISION,
    top_k: int = TOP_K,
    scenes: int = N_SCENES,
) -> MinScoreCalibration:
    """Calibrate the minimum tag score of a tagging function (``Tagger.tag``) on the labelled photos, and
    measure it on synthetic scenes.

    Args:
        tag: ``tag(images, top_k=..., min_score=0.0)`` -> tags per image, best first.
        target_precision: Share of kept tags on the labelled photos that must be right.
        top_k: Tags per image considered.
        scenes: Synthetic scenes to measure on (0: none).
    """
    results = tag([p.image() for p in PHOTOS], top_k=top_k, min_score=0.0)
    scored = [
        (t.score, t.class_index in photo.accepted)
        for photo, tags in zip(PHOTOS, results, strict=True)
        for t in tags
    ]
    threshold = pick_threshold(scored, target_precision)
    min_score = threshold if threshold is not None else 0.0
    if threshold is None:
        method = (
            f"not calibrated: no threshold keeps tags with precision >= {target_precision:g} on the "
            f"{len(PHOTOS)} labelled photos (no right tag among their top {top_k}); every tag is returned"
        )
    else:
        method = (
            f"the lowest score threshold at which the top-{top_k} tags of the {len(PHOTOS)} labelled "
            f"scikit-image photos ({', '.join(p.name for p in PHOTOS)}) kept above it are right at least "
            f"{target_precision:.0%} of the time (right: a class accepted for the photo, "
            "training/tagger/photos.py), placed halfway (geometric mean) between the last tag kept and the "
            f"first dropped; {len(scored)} tags in all, so a coarse estimate"
        )
    kept = [right for score, right in scored if score >= min_score]
    right_tags = sum(right for _, right in scored)
    top1_kept = sum(
        bool(tags) and tags[0].class_index in photo.accepted and tags[0].score >= min_score
        for photo, tags in zip(PHOTOS, results, strict=True)
    )
    scene_tags = tag(synthetic_scenes(scenes), top_k=top_k, min_score=0.0) if scenes else []
    kept_per_scene = [sum(t.score >= min_score for t in tags) for tags in scene_tags]
    return MinScoreCalibration(
        min_score=min_score,
        calibrated=threshold is not None,
        method=method,
        target_precision=target_precision,
        top_k=top_k,
        photos=len(PHOTOS),
        candidate_tags=len(scored),
        right_tags=right_tags,
        kept_tags=len(kept),
        kept_right=sum(kept),
        precision=sum(kept) / len(kept) if kept else None,
        recall=sum(kept) / right_tags if right_tags else None,
        photos_top1_right_kept=top1_kept,
        scenes=len(scene_tags),
        scenes_with_tags=float(np.mean([n > 0 for n in kept_per_scene])) if scene_tags else 0.0,
        scene_tags_mean=float(np.mean(kept_per_scene)) if scene_tags else 0.0,
        scene_max_score=max((t.score for tags in scene_tags for t in tags), default=0.0),
    )
