"""The synthetic "shapes" benchmark: scenes of known objects, five true captions each, COCO files.

No public dataset can be downloaded where this project is built and tested, so CI, the starter caption
model, the YOLO detector and the quality gates all train and evaluate on these scenes. They are made so
that a captioner has to look at the image to be right:

- 1 to 4 objects from 8 shape classes, 8 named colours and 3 sizes with distinct pixel ranges, placed by
  rejection sampling so boxes barely overlap (clean targets for a detector), randomly rotated where the
  class stays recognisable;
- muted backgrounds (solid, gradient, textured) that every object colour in the scene contrasts with;
- five varied, grammatical captions per image, all TRUE for the scene: counts, colours, sizes, absolute
  positions and pairwise relations that are only stated when the geometry leaves no doubt;
- deterministic: every image draws from its own RNG seeded by ``(seed, index)``, so the same
  ``(seed, N)`` gives byte-identical files however many processes render them.

It is a benchmark for the pipeline, never a stand-in for COCO quality.

Modules: ``scene`` (the vocabulary, :class:`SynthConfig` and random scenes), ``render`` (pixels),
``grammar`` (true captions of a scene) and ``dataset`` (the images and annotation files on disk, written
with the format writers of ``snap2caption.data.formats``, next to their readers).
"""

from __future__ import annotations

from snap2caption.data.synth.dataset import FORMATS, write_synth
from snap2caption.data.synth.grammar import (
    describe_scene,
    horizontal_band,
    position_phrase,
    relations,
    vertical_band,
    with_article,
)
from snap2caption.data.synth.render import render_scene
from snap2caption.data.synth.scene import (
    COLOURS,
    NUMBER_WORDS,
    PLURALS,
    SHAPES,
    SIZE_RANGES,
    SIZES,
    Background,
    Scene,
    SceneObject,
    SynthConfig,
    generate_scene,
)

__all__ = [
    "COLOURS",
    "FORMATS",
    "NUMBER_WORDS",
    "PLURALS",
    "SHAPES",
    "SIZES",
    "SIZE_RANGES",
    "Background",
    "Scene",
    "SceneObject",
    "SynthConfig",
    "describe_scene",
    "generate_scene",
    "horizontal_band",
    "position_phrase",
    "relations",
    "render_scene",
    "vertical_band",
    "with_article",
    "write_synth",
]
