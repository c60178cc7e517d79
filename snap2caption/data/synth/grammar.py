"""The caption grammar: five varied captions per scene, each TRUE for it.

Counts, colours, sizes, absolute positions and pairwise relations are stated only when the geometry
leaves no doubt; templates are drawn at random so that structure and wording vary.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from snap2caption.data.synth.scene import NUMBER_WORDS, PLURALS, Scene, SceneObject

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
