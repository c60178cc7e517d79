"""Painting a scene: a gradient or textured background, then anti-aliased objects."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from snap2caption.data.synth.scene import Background, Scene

_SUPERSAMPLE = 4  # objects are drawn at 4x and box-filtered down: anti-aliased edges like a real image


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
