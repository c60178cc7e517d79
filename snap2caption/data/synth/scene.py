"""Random scenes of the shapes benchmark: the vocabulary (classes, colours, sizes), the config, and
placement by rejection sampling on a muted background every object contrasts with."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

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
_PLACEMENT_TRIES = 40


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
        images: Number of images (the default is the benchmark's, as ``params.yaml`` generates it).
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

    images: int = 6000
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
