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
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from snap2caption.data.records import SourceBox, SourceDataset, SourceRecord
from snap2caption.data.writers import default_split, write_coco, write_flickr30k_csv, write_karpathy

logger = logging.getLogger(__name__)

RGB = tuple[int, int, int]
BackgroundKind = Literal["plain", "gradient", "textured"]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon", "diamond", "pentagon", "cross")
PLURALS: dict[str, str] = {shape: shape + ("es" if shape.endswith("s") else "s") for shape in SHAPES}

# Saturated, far apart in RGB and each a basic colour term, so the name is never in doubt.
COLOURS: dict[str, RGB] = {
    "red": (215, 35, 35),
    "green": (35, 160, 55),
    "blue": (35, 75, 225),
    "yellow": (240, 210, 25),
    "purple": (135, 45, 190),
    "orange": (245, 130, 25),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}

SIZES: tuple[str, ...] = ("small", "medium", "large")
# The longer side of an object's box as a fraction of the image side; gaps between the ranges keep the
# size words unambiguous (at 256 px: 28-41, 54-72 and 87-108 px).
SIZE_RANGES: dict[str, tuple[float, float]] = {
    "small": (0.11, 0.16),
    "medium": (0.21, 0.28),
    "large": (0.34, 0.42),
}
FORMATS: tuple[str, ...] = ("coco", "karpathy", "flickr30k")
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six")

# Rotation range in degrees, per class: symmetric shapes turn freely; a square or cross turned near 45
# degrees would read as a diamond or an "x", so those stay near upright.
_ROTATION_DEG: dict[str, float] = {
    "circle": 0.0,
    "square": 20.0,
    "triangle": 180.0,
    "star": 180.0,
    "hexagon": 180.0,
    "diamond": 12.0,
    "pentagon": 180.0,
    "cross": 20.0,
}
_MIN_CONTRAST = 100.0  # RGB distance between an object colour and every background colour in the scene
_COLOUR_JITTER = 10  # per channel, so a model learns colour ranges rather than eight exact values
_MARGIN = 0.02  # keep boxes this fraction of the side away from the image border
_SUPERSAMPLE = 4  # objects are drawn at 4x and box-filtered down: anti-aliased edges like a real image
_PLACEMENT_TRIES = 40

# Absolute positions use the box centre in fractions of the image; the gaps between bands are where no
# position is stated, because a reader could argue either way.
_LOW, _HIGH = 0.36, 0.64  # left/top below _LOW, right/bottom above _HIGH
_MID_LO, _MID_HI = 0.42, 0.58  # "middle" band
# A relation needs separated boxes along its axis (overlap at most this fraction of the smaller side),
# a centre offset of at least _REL_MIN_OFFSET of the image, and that axis to dominate the other one.
_REL_BOX_TOLERANCE = 0.1
_REL_MIN_OFFSET = 0.08
_REL_DOMINANCE = 0.6
_LARGEST_RATIO = 1.3  # "the largest shape" only when it is clearly larger than every other one


def _regular(vertices: int, start_deg: float, radius: float = 1.0) -> list[tuple[float, float]]:
    step = 2 * math.pi / vertices
    start = math.radians(start_deg)
    return [
        (radius * math.cos(start + i * step), radius * math.sin(start + i * step)) for i in range(vertices)
    ]


def _star() -> list[tuple[float, float]]:
    outer = _regular(5, -90.0)
    inner = _regular(5, -90.0 + 36.0, radius=0.42)
    return [point for pair in zip(outer, inner, strict=True) for point in pair]


def _cross(arm: float = 0.34) -> list[tuple[float, float]]:
    a = arm
    return [
        (-a, -1),
        (a, -1),
        (a, -a),
        (1, -a),
        (1, a),
        (a, a),
        (a, 1),
        (-a, 1),
        (-a, a),
        (-1, a),
        (-1, -a),
        (-a, -a),
    ]


# Outlines around the origin in image axes (y down); only their proportions matter, the scale is set
# by the size. A diamond is a rhombus taller than wide so that it never looks like a turned square.
_UNIT_POLYGONS: dict[str, np.ndarray] = {
    "circle": np.array(_regular(64, 0.0)),
    "square": np.array([(-1.0, -1.0), (1.0, -1.0), (1.0, 1.0), (-1.0, 1.0)]),
    "triangle": np.array(_regular(3, -90.0)),
    "star": np.array(_star()),
    "hexagon": np.array(_regular(6, 0.0)),
    "diamond": np.array([(0.0, -1.0), (0.62, 0.0), (0.0, 1.0), (-0.62, 0.0)]),
    "pentagon": np.array(_regular(5, -90.0)),
    "cross": np.array(_cross()),
}


@dataclass(frozen=True)
class SynthConfig:
    """What to generate. Every field is saved beside the dataset in ``synth_config.json``.

    Attributes:
        images: Number of images.
        seed: Base seed (>= 0); image ``i`` draws from an RNG seeded by ``(seed, i)``.
        image_size: Side of the square images in pixels.
        min_objects: Fewest objects per scene (always met).
        max_objects: Most objects per scene (at most 6); fewer when a crowded scene has no room left.
        captions_per_image: Captions per image, all distinct.
        jpeg_quality: JPEG quality of the written images.
        max_overlap: Largest allowed box intersection over the smaller box's area between two objects
            (0.02 keeps IoU well under 0.05).
        workers: Processes for rendering; None uses every core. Output does not depend on it.
    """

    images: int = 2000
    seed: int = 0
    image_size: int = 256
    min_objects: int = 1
    max_objects: int = 4
    captions_per_image: int = 5
    jpeg_quality: int = 90
    max_overlap: float = 0.02
    workers: int | None = None

    def __post_init__(self) -> None:
        if self.images < 0:
            raise ValueError(f"images must be >= 0, got {self.images}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.image_size < 64:
            raise ValueError(f"image_size must be >= 64, got {self.image_size}")
        if not 1 <= self.min_objects <= self.max_objects <= len(NUMBER_WORDS) - 1:
            raise ValueError(
                f"need 1 <= min_objects <= max_objects <= {len(NUMBER_WORDS) - 1}, "
                f"got {self.min_objects}..{self.max_objects}"
            )
        if not 1 <= self.captions_per_image <= 8:
            raise ValueError(f"captions_per_image must be in 1..8, got {self.captions_per_image}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in 1..100, got {self.jpeg_quality}")
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")


@dataclass(frozen=True)
class Background:
    """A muted backdrop: a linear blend from ``start`` to ``end`` along ``angle``, plus optional texture.

    Attributes:
        kind: ``"plain"`` (one colour), ``"gradient"`` or ``"textured"`` (noise and soft blotches).
        start: Colour at one end of the gradient (the only colour when plain).
        end: Colour at the other end.
        angle: Direction of the gradient in radians.
        noise: Standard deviation of per-pixel grey noise.
        blotch: Standard deviation of the low-frequency texture.
    """

    kind: BackgroundKind
    start: RGB
    end: RGB
    angle: float = 0.0
    noise: float = 0.0
    blotch: float = 0.0


@dataclass(frozen=True)
class SceneObject:
    """One object as drawn.

    Attributes:
        shape: Class name, one of ``SHAPES``.
        colour: Colour name, one of ``COLOURS``.
        size: Size word, one of ``SIZES``.
        bbox: Tight box ``(x, y, w, h)`` in pixels, COCO style.
        polygon: Outline vertices ``((x, y), ...)`` in pixels; ``bbox`` is its bounding box.
        fill: The jittered RGB it is painted with (close to ``COLOURS[colour]``).
    """

    shape: str
    colour: str
    size: str
    bbox: tuple[float, float, float, float]
    polygon: tuple[tuple[float, float], ...]
    fill: RGB

    @property
    def centre(self) -> tuple[float, float]:
        """Centre of the box ``(cx, cy)`` in pixels."""
        x, y, w, h = self.bbox
        return x + w / 2, y + h / 2

    @property
    def extent(self) -> float:
        """Longer side of the box in pixels: what the size word describes."""
        return max(self.bbox[2], self.bbox[3])


@dataclass(frozen=True)
class Scene:
    """Everything needed to render and describe one image."""

    width: int
    height: int
    background: Background
    objects: tuple[SceneObject, ...]


# ---------------------------------------------------------------------------------------------- scenes


def generate_scene(rng: np.random.Generator, cfg: SynthConfig) -> Scene:
    """Draw a random scene: background, then objects placed by rejection sampling.

    An object that finds no free spot at its size is tried smaller, then dropped; if fewer than
    ``min_objects`` fit, the layout is drawn again (the first object always fits, so the default never
    retries).

    Args:
        rng: The image's own generator.
        cfg: Sizes and object counts.

    Returns:
        The scene, objects in placement order.
    """
    size = cfg.image_size
    background, allowed = _sample_background(rng)
    count = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    while True:
        objects: list[SceneObject] = []
        for _ in range(count):
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            colour = allowed[int(rng.integers(len(allowed)))]
            size_index = int(rng.integers(len(SIZES)))
            rotation = math.radians(float(rng.uniform(-_ROTATION_DEG[shape], _ROTATION_DEG[shape])))
            placed = _place(shape, size_index, rotation, size, objects, rng, cfg.max_overlap)
            if placed is None:
                continue
            size_word, bbox, polygon = placed
            nominal = np.array(COLOURS[colour])
            fill = np.clip(nominal + rng.integers(-_COLOUR_JITTER, _COLOUR_JITTER + 1, 3), 0, 255)
            objects.append(
                SceneObject(
                    shape=shape,
                    colour=colour,
                    size=size_word,
                    bbox=bbox,
                    polygon=polygon,
                    fill=(int(fill[0]), int(fill[1]), int(fill[2])),
                )
            )
        if len(objects) >= cfg.min_objects:
            return Scene(width=size, height=size, background=background, objects=tuple(objects))


def _sample_background(rng: np.random.Generator) -> tuple[Background, list[str]]:
    """A muted background and the colour names that contrast with all of it (at least five)."""
    while True:
        start = _muted_colour(rng, rng.uniform(100, 170))
        kind: BackgroundKind = ("plain", "gradient", "textured")[int(rng.integers(3))]
        end, noise, blotch = start, 0.0, 0.0
        if kind == "gradient" or (kind == "textured" and rng.random() < 0.5):
            lightness = float(np.clip(np.mean(start) + rng.uniform(-40, 40), 95, 175))
            end = _muted_colour(rng, lightness)
        if kind == "textured":
            noise, blotch = float(rng.uniform(3, 7)), float(rng.uniform(4, 9))
        background = Background(
            kind=kind,
            start=start,
            end=end,
            angle=float(rng.uniform(0, 2 * math.pi)),
            noise=noise,
            blotch=blotch,
        )
        allowed = [name for name, rgb in COLOURS.items() if _contrast(rgb, background) >= _MIN_CONTRAST]
        if len(allowed) >= 5:
            return background, allowed


def _muted_colour(rng: np.random.Generator, lightness: float) -> RGB:
    # A grey with a faint tint: reads as "background", never as one of the eight object colours.
    rgb = np.clip(lightness + rng.integers(-18, 19, 3), 0, 255)
    return int(rgb[0]), int(rgb[1]), int(rgb[2])


def _contrast(rgb: RGB, background: Background) -> float:
    """RGB distance from a colour to the nearest colour on the background's gradient."""
    point, a, b = (np.asarray(c, dtype=float) for c in (rgb, background.start, background.end))
    span = b - a
    denominator = float(span @ span)
    t = 0.0 if denominator == 0 else float(np.clip((point - a) @ span / denominator, 0, 1))
    return float(np.linalg.norm(point - (a + t * span)))


def _place(
    shape: str,
    size_index: int,
    rotation: float,
    image_size: int,
    placed: Sequence[SceneObject],
    rng: np.random.Generator,
    max_overlap: float,
) -> tuple[str, tuple[float, float, float, float], tuple[tuple[float, float], ...]] | None:
    """Find a free spot for one object, shrinking it a size at a time; None when even small fails."""
    cos, sin = math.cos(rotation), math.sin(rotation)
    unit = _UNIT_POLYGONS[shape] @ np.array([[cos, sin], [-sin, cos]])  # (K, 2) rotated outline
    low, high = unit.min(axis=0), unit.max(axis=0)
    unit_extent = float(max(high - low))
    margin = _MARGIN * image_size
    for size_word in reversed(SIZES[: size_index + 1]):
        lo, hi = SIZE_RANGES[size_word]
        for _ in range(_PLACEMENT_TRIES):
            scale = float(rng.uniform(lo, hi)) * image_size / unit_extent
            w, h = (high - low) * scale
            x = float(rng.uniform(margin, image_size - margin - w))
            y = float(rng.uniform(margin, image_size - margin - h))
            bbox = (round(x, 2), round(y, 2), round(float(w), 2), round(float(h), 2))
            if all(_overlap(bbox, other.bbox) <= max_overlap for other in placed):
                vertices = (unit - low) * scale + (x, y)
                polygon = tuple((round(float(px), 2), round(float(py), 2)) for px, py in vertices)
                return size_word, bbox, polygon
    return None


def _overlap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    """Intersection area over the smaller box's area (stricter than IoU)."""
    ix = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    iy = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    if ix <= 0 or iy <= 0:
        return 0.0
    return ix * iy / min(a[2] * a[3], b[2] * b[3])


# ------------------------------------------------------------------------------------------- rendering


def render_scene(scene: Scene, rng: np.random.Generator) -> Image.Image:
    """Paint a scene: background (texture drawn from ``rng``), then anti-aliased objects.

    Args:
        scene: What to draw.
        rng: Supplies the background texture only; geometry and colours come from the scene.

    Returns:
        An RGB image of ``scene.width`` x ``scene.height``.
    """
    width, height = scene.width, scene.height
    canvas = _render_background(scene.background, width, height, rng)  # (H, W, 3) float
    for obj in scene.objects:
        # Each object's coverage is drawn at _SUPERSAMPLE x over its own box only and box-filtered down,
        # so edges blend into the background like a photographed object (anti-aliasing at low cost).
        x0, y0, w, h = obj.bbox
        left, top = max(0, math.floor(x0)), max(0, math.floor(y0))
        right, bottom = min(width, math.ceil(x0 + w)), min(height, math.ceil(y0 + h))
        mask = Image.new("L", ((right - left) * _SUPERSAMPLE, (bottom - top) * _SUPERSAMPLE), 0)
        outline = [((x - left) * _SUPERSAMPLE, (y - top) * _SUPERSAMPLE) for x, y in obj.polygon]
        ImageDraw.Draw(mask).polygon(outline, fill=255)
        alpha = np.asarray(mask.reduce(_SUPERSAMPLE), dtype=np.float32)[..., None] / 255.0  # (h, w, 1)
        region = canvas[top:bottom, left:right]
        canvas[top:bottom, left:right] = region + (np.asarray(obj.fill, dtype=np.float32) - region) * alpha
    return Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8), "RGB")


def _render_background(
    background: Background, width: int, height: int, rng: np.random.Generator
) -> np.ndarray:
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    along = xs * math.cos(background.angle) + ys * math.sin(background.angle)
    t = (along - along.min()) / max(float(along.max() - along.min()), 1e-6)  # (H, W) in [0, 1]
    start = np.asarray(background.start, dtype=np.float32)
    end = np.asarray(background.end, dtype=np.float32)
    canvas = start + (end - start) * t[..., None]  # (H, W, 3)
    if background.kind == "textured":
        grain = rng.normal(0.0, background.noise, (height, width, 1)).astype(np.float32)
        # Soft blotches: coarse noise upsampled smoothly, like paper or a wall.
        coarse = rng.normal(0.0, 1.0, (height // 16 + 2, width // 16 + 2)).astype(np.float32)
        blotches = Image.fromarray(coarse, "F").resize((width, height), Image.Resampling.BICUBIC)
        canvas = canvas + grain + background.blotch * np.asarray(blotches, dtype=np.float32)[..., None]
    return canvas


# ------------------------------------------------------------------------------------------- captions


def horizontal_band(scene: Scene, obj: SceneObject) -> str | None:
    """``"left"``, ``"right"``, ``"middle"`` or None (between bands, so not stated)."""
    return _band(obj.centre[0] / scene.width, ("left", "right"))


def vertical_band(scene: Scene, obj: SceneObject) -> str | None:
    """``"top"``, ``"bottom"``, ``"middle"`` or None (between bands, so not stated)."""
    return _band(obj.centre[1] / scene.height, ("top", "bottom"))


def _band(fraction: float, names: tuple[str, str]) -> str | None:
    if fraction < _LOW:
        return names[0]
    if fraction > _HIGH:
        return names[1]
    if _MID_LO <= fraction <= _MID_HI:
        return "middle"
    return None


def position_phrase(scene: Scene, obj: SceneObject) -> str | None:
    """The most specific absolute position that is clearly true, e.g. ``"in the top left corner"``.

    Args:
        scene: For the image size.
        obj: The object.

    Returns:
        A phrase, or None when the object sits between bands and any phrase would be arguable.
    """
    horizontal, vertical = horizontal_band(scene, obj), vertical_band(scene, obj)
    if horizontal in ("left", "right") and vertical in ("top", "bottom"):
        return f"in the {vertical} {horizontal} corner"
    if horizontal in ("left", "right"):
        return f"on the {horizontal}"
    if vertical in ("top", "bottom"):
        return f"at the {vertical}"
    if horizontal == vertical == "middle":
        return "in the middle"
    return None


def relations(scene: Scene, a: SceneObject, b: SceneObject) -> list[str]:
    """Every relation of ``a`` to ``b`` that is clearly true: ``"to the left of"``, ``"above"``, ...

    A relation needs the two boxes to be apart along its axis (overlapping by at most a tenth of the
    smaller side), the centres to differ by at least 8% of the image along it, and that offset to be at
    least 0.6 times the offset along the other axis, so a diagonal pair gets both and a stacked pair
    never gets "to the left of".

    Args:
        scene: For the image size.
        a: The subject.
        b: The reference object.

    Returns:
        The phrases, possibly empty.
    """
    (ax, ay), (bx, by) = a.centre, b.centre
    dx, dy = bx - ax, by - ay  # > 0: b is right of / below a
    out: list[str] = []
    tol_x = _REL_BOX_TOLERANCE * min(a.bbox[2], b.bbox[2])
    tol_y = _REL_BOX_TOLERANCE * min(a.bbox[3], b.bbox[3])
    if abs(dx) >= _REL_MIN_OFFSET * scene.width and abs(dx) >= _REL_DOMINANCE * abs(dy):
        if dx > 0 and a.bbox[0] + a.bbox[2] <= b.bbox[0] + tol_x:
            out.append("to the left of")
        elif dx < 0 and b.bbox[0] + b.bbox[2] <= a.bbox[0] + tol_x:
            out.append("to the right of")
    if abs(dy) >= _REL_MIN_OFFSET * scene.height and abs(dy) >= _REL_DOMINANCE * abs(dx):
        if dy > 0 and a.bbox[1] + a.bbox[3] <= b.bbox[1] + tol_y:
            out.append("above")
        elif dy < 0 and b.bbox[1] + b.bbox[3] <= a.bbox[1] + tol_y:
            out.append("below")
    return out


def with_article(phrase: str) -> str:
    """``"a red circle"``, ``"an orange star"``: the article follows the first sound of the phrase."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _describe(obj: SceneObject, *, size: bool = True, colour: bool = True) -> str:
    words = ([obj.size] if size else []) + ([obj.colour] if colour else []) + [obj.shape]
    return " ".join(words)


def _join(items: Sequence[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def _left_to_right(scene: Scene) -> list[SceneObject]:
    return sorted(scene.objects, key=lambda o: (o.centre[0], o.centre[1]))


def _groups(scene: Scene, key: Callable[[SceneObject], tuple[str, ...]]) -> list[list[SceneObject]]:
    """Objects grouped by ``key``, groups ordered by their leftmost member."""
    groups: dict[tuple[str, ...], list[SceneObject]] = {}
    for obj in _left_to_right(scene):
        groups.setdefault(key(obj), []).append(obj)
    return list(groups.values())


def _colour_shape_groups(scene: Scene, *, sizes: bool) -> list[str]:
    """``["two red circles", "a large blue square"]``; a group's size is named only if all share it."""
    phrases = []
    for group in _groups(scene, lambda o: (o.colour, o.shape)):
        first = group[0]
        if len(group) == 1:
            phrases.append(with_article(_describe(first, size=sizes)))
            continue
        same_size = sizes and all(o.size == first.size for o in group)
        words = [NUMBER_WORDS[len(group)]] + ([first.size] if same_size else [])
        phrases.append(" ".join([*words, first.colour, PLURALS[first.shape]]))
    return phrases


def _referring_expression(scene: Scene, obj: SceneObject) -> str | None:
    """The shortest description that picks out ``obj`` alone (for "the ..."), or None."""
    for fields in (("shape",), ("colour", "shape"), ("size", "shape"), ("size", "colour", "shape")):
        matches = [o for o in scene.objects if all(getattr(o, f) == getattr(obj, f) for f in fields)]
        if len(matches) == 1:
            return " ".join(getattr(obj, f) for f in fields)
    return None


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _coin(rng: np.random.Generator) -> bool:
    return bool(rng.random() < 0.5)


def _caption_list(scene: Scene, rng: np.random.Generator) -> str:
    return _join(_colour_shape_groups(scene, sizes=_coin(rng)))


def _caption_count(scene: Scene, rng: np.random.Generator) -> str:
    if len(scene.objects) == 1:
        return "a single " + _describe(scene.objects[0], size=_coin(rng))
    noun = _pick(rng, ("shapes", "objects"))
    return f"{NUMBER_WORDS[len(scene.objects)]} {noun}: " + _join(
        _colour_shape_groups(scene, sizes=_coin(rng))
    )


def _caption_there(scene: Scene, rng: np.random.Generator) -> str:
    groups = _colour_shape_groups(scene, sizes=_coin(rng))
    if len(groups) < len(scene.objects) or _coin(rng):
        verb = "is" if groups[0].startswith(("a ", "an ")) else "are"
        return f"there {verb} " + _join(groups)
    sizes = _coin(rng)
    parts = []
    for obj in _left_to_right(scene):
        where = position_phrase(scene, obj)
        parts.append(with_article(_describe(obj, size=sizes)) + (f" {where}" if where else ""))
    return "there is " + _join(parts)


def _caption_positions(scene: Scene, rng: np.random.Generator) -> str | None:
    sizes = _coin(rng)
    parts = []
    for obj in _left_to_right(scene):
        where = position_phrase(scene, obj)
        if where:
            parts.append(f"{with_article(_describe(obj, size=sizes))} {where}")
    return _join(parts) if parts else None


def _related_pairs(scene: Scene) -> list[tuple[SceneObject, str, SceneObject]]:
    return [
        (a, rel, b)
        for a in scene.objects
        for b in scene.objects
        if a is not b
        for rel in relations(scene, a, b)
    ]


def _caption_relation(scene: Scene, rng: np.random.Generator) -> str | None:
    pairs = _related_pairs(scene)
    if not pairs:
        return None
    a, rel, b = pairs[int(rng.integers(len(pairs)))]
    sizes = _coin(rng)
    return f"{with_article(_describe(a, size=sizes))} {rel} {with_article(_describe(b, size=sizes))}"


def _caption_relation_the(scene: Scene, rng: np.random.Generator) -> str | None:
    pairs = []
    for a, rel, b in _related_pairs(scene):
        ref_a, ref_b = _referring_expression(scene, a), _referring_expression(scene, b)
        if ref_a and ref_b:
            pairs.append(f"the {ref_a} is {rel} the {ref_b}")
    return _pick(rng, pairs) if pairs else None


def _caption_shapes(scene: Scene, rng: np.random.Generator) -> str:
    parts = []
    for group in _groups(scene, lambda o: (o.shape,)):
        shape = group[0].shape
        parts.append(
            with_article(shape) if len(group) == 1 else f"{NUMBER_WORDS[len(group)]} {PLURALS[shape]}"
        )
    return f"{_pick(rng, ('an image with', 'a picture of'))} {_join(parts)}"


def _caption_colour_split(scene: Scene, rng: np.random.Generator) -> str | None:
    """``"two circles, one red and one blue"``: one shape, several colours, counted."""
    for group in _groups(scene, lambda o: (o.shape,)):
        subscene = Scene(scene.width, scene.height, scene.background, tuple(group))
        by_colour = _groups(subscene, lambda o: (o.colour,))
        if len(by_colour) > 1:
            shares = [f"{NUMBER_WORDS[len(g)]} {g[0].colour}" for g in by_colour]
            return f"{NUMBER_WORDS[len(group)]} {PLURALS[group[0].shape]}, {_join(shares)}"
    return None


def _caption_background(scene: Scene, rng: np.random.Generator) -> str:
    return f"{_join(_colour_shape_groups(scene, sizes=_coin(rng)))} on a {scene.background.kind} background"


def _caption_extreme(scene: Scene, rng: np.random.Generator) -> str | None:
    """``"the largest shape is a red circle"`` when one object clearly out-sizes (or undersizes) the rest."""
    if len(scene.objects) < 2:
        return None
    ranked = sorted(scene.objects, key=lambda o: o.extent)
    options = []
    if ranked[-1].extent >= _LARGEST_RATIO * ranked[-2].extent and ranked[-1].size != ranked[-2].size:
        options.append(f"the largest shape is {with_article(_describe(ranked[-1], size=False))}")
    if ranked[1].extent >= _LARGEST_RATIO * ranked[0].extent and ranked[1].size != ranked[0].size:
        options.append(f"the smallest shape is {with_article(_describe(ranked[0], size=False))}")
    return _pick(rng, options) if options else None


_TEMPLATES: tuple[Callable[[Scene, np.random.Generator], str | None], ...] = (
    _caption_count,
    _caption_there,
    _caption_positions,
    _caption_relation,
    _caption_relation_the,
    _caption_shapes,
    _caption_colour_split,
    _caption_background,
    _caption_extreme,
)


def describe_scene(scene: Scene, rng: np.random.Generator, n: int = 5) -> list[str]:
    """Write ``n`` distinct, true captions for a scene.

    The first caption always names every object with its colour (and size, when ``rng`` says so); the
    others are drawn at random from the templates that apply (counts, "there is", positions, relations,
    shape counts, colour splits, background, largest/smallest), so structure and wording vary.

    Args:
        scene: The scene to describe.
        rng: Chooses templates and wording.
        n: How many captions (1..8).

    Returns:
        ``n`` lowercase captions without final punctuation.

    Raises:
        ValueError: If fewer than ``n`` distinct true captions exist for the scene.
    """
    first = _join(_colour_shape_groups(scene, sizes=True))
    candidates = [caption for template in _TEMPLATES if (caption := template(scene, rng))]
    candidates += [_caption_list(scene, rng)]
    order = rng.permutation(len(candidates))
    # Fallbacks only matter for a one-object scene with no stated position; they stay true and distinct.
    fallbacks = [f"{prefix} {first}" for prefix in ("a picture of", "an image of", "a drawing of")]
    captions = [first]
    for caption in [candidates[int(i)] for i in order] + fallbacks:
        if len(captions) == n:
            break
        if caption not in captions:
            captions.append(caption)
    if len(captions) < n:
        raise ValueError(f"only {len(captions)} distinct captions for this scene, {n} requested")
    return captions


# ---------------------------------------------------------------------------------------------- output


@dataclass(frozen=True)
class _Built:
    record: SourceRecord
    polygons: list[list[float]]


def _build_image(index: int, cfg: SynthConfig, images_dir: str) -> _Built:
    """Generate, render, describe and save image ``index``; runs in a worker process."""
    # Seeding from the pair (not seed + index) keeps streams of nearby seeds independent.
    rng = np.random.default_rng([cfg.seed, index])
    scene = generate_scene(rng, cfg)
    image = render_scene(scene, rng)
    captions = describe_scene(scene, rng, cfg.captions_per_image)
    image_id = str(index + 1)  # COCO ids are positive
    file_name = f"{index + 1:012d}.jpg"
    image.save(os.path.join(images_dir, file_name), "JPEG", quality=cfg.jpeg_quality)
    record = SourceRecord(
        image_id=image_id,
        file_name=file_name,
        captions=captions,
        boxes=[SourceBox(category=o.shape, bbox=o.bbox) for o in scene.objects],
        split=default_split(image_id),
        width=scene.width,
        height=scene.height,
    )
    polygons = [[coordinate for point in o.polygon for coordinate in point] for o in scene.objects]
    return _Built(record=record, polygons=polygons)


def write_synth(
    out_dir: str | os.PathLike[str],
    cfg: SynthConfig,
    formats: Sequence[str] = ("coco",),
    progress: bool = True,
) -> SourceDataset:
    """Generate the dataset and write it in the real formats.

    Layout: ``images/<12-digit id>.jpg``; ``annotations/captions.json`` and ``annotations/instances.json``
    (COCO, polygons included) for ``"coco"``; ``annotations/dataset_synth.json`` (Karpathy, COCO flavour,
    ~80/10/10 splits by :func:`~snap2caption.data.writers.default_split`) for ``"karpathy"``;
    ``annotations/results.csv`` for ``"flickr30k"``; and ``synth_config.json`` with the config.

    Args:
        out_dir: Output folder (created).
        cfg: What to generate.
        formats: Any of ``"coco"``, ``"karpathy"``, ``"flickr30k"``.
        progress: Show a tqdm bar on stderr.

    Returns:
        The records as a reader of these files would produce them (plus their splits), categories in
        ``SHAPES`` order.

    Raises:
        ValueError: On an unknown format.
    """
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise ValueError(f"unknown formats {unknown}; choose from {list(FORMATS)}")
    started = time.perf_counter()
    out = Path(out_dir)
    images_dir, annotations_dir = out / "images", out / "annotations"
    images_dir.mkdir(parents=True, exist_ok=True)
    annotations_dir.mkdir(parents=True, exist_ok=True)

    if cfg.workers is None:
        # A pool costs more than it saves on a handful of images (tests, fixtures).
        workers = (os.cpu_count() or 1) if cfg.images >= 64 else 1
    else:
        workers = max(1, min(cfg.workers, cfg.images))
    chunksize = max(1, min(16, cfg.images // (4 * workers)))
    build = partial(_build_image, cfg=cfg, images_dir=str(images_dir))
    built: list[_Built] = []
    with tqdm(total=cfg.images, disable=not progress, unit="img", desc="synth") as bar:
        if workers == 1:
            for index in range(cfg.images):
                built.append(build(index))
                bar.update()
        else:
            with multiprocessing.get_context().Pool(workers) as pool:
                for item in pool.imap(build, range(cfg.images), chunksize=chunksize):
                    built.append(item)
                    bar.update()

    records = [b.record for b in built]
    stale = {p.name for p in images_dir.glob("*.jpg")} - {r.file_name for r in records}
    if stale:
        logger.warning(
            "%d images in %s are not part of this dataset (left from an earlier run)", len(stale), images_dir
        )

    info = {
        "description": (
            f"Snap2Caption synthetic shapes benchmark (seed={cfg.seed}, images={cfg.images}, "
            f"image_size={cfg.image_size}); not a natural-image dataset"
        ),
        "url": "",
        "version": "1.0",
        "year": 2024,
        "contributor": "Snap2Caption",
        "date_created": "2024/01/01",
    }
    licence = {"url": "https://creativecommons.org/publicdomain/zero/1.0/", "id": 1, "name": "CC0 1.0"}
    if "coco" in formats:
        write_coco(
            records,
            SHAPES,
            annotations_dir / "captions.json",
            annotations_dir / "instances.json",
            segmentations={b.record.image_id: b.polygons for b in built},
            info=info,
            license=licence,
        )
    if "karpathy" in formats:
        write_karpathy(records, annotations_dir / "dataset_synth.json", "coco", filepath="images")
    if "flickr30k" in formats:
        write_flickr30k_csv(records, annotations_dir / "results.csv")
    # workers is left out: it changes how fast, never what, so the file stays identical across machines.
    saved = {**asdict(cfg), "workers": None, "formats": sorted(formats)}
    (out / "synth_config.json").write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")

    logger.debug(
        "synth: %d images, %d captions, %d boxes in %.1f s -> %s",
        len(records),
        sum(len(r.captions) for r in records),
        sum(len(r.boxes) for r in records),
        time.perf_counter() - started,
        out,
    )
    return SourceDataset(source="synth", records=records, categories=list(SHAPES))
