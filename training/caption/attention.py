"""Attention supervision: while a caption names an object, one decoder head is taught to look at its box.

The starter's wrong captions mostly lose count in scenes of 3-4 objects: they name one object twice and
leave another out. The ETL keeps every image's boxes, and the synthetic benchmark's first caption is a list
of phrases ("a small red circle, two blue squares and a large green star"), one per (colour, shape) group,
groups ordered by their leftmost member. So each phrase can be matched to the boxes it names, and while the
decoder writes a phrase's tokens, one attention head of one layer (``train.attention_layer``, head 0) is
trained toward the prefix cells those boxes cover (a cross-entropy between the cells' share of the boxes'
area and the head's attention over the prefix, weighted by ``train.attention_supervision``).

A caption whose phrases cannot all be matched to boxes by category name (any caption of real datasets
that is not such a list, or that names a category no box has) is simply not supervised: its targets are
zero and its tokens train on the language-model loss alone. Nothing of this reaches inference: the exported
model is the same network.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from snap2caption.data.synth.scene import NUMBER_WORDS
from snap2caption.imaging.transforms import Preprocess
from snap2caption.models.caption.tokenizer import CaptionTokenizer

# A caption's phrases: the benchmark's list joins them with ", " and a final " and ".
_PHRASE_BREAK = re.compile(r", | and ")
_COUNTS = {"a": 1, "an": 1} | {word: n for n, word in enumerate(NUMBER_WORDS) if n}

Box = tuple[str, Sequence[float]]  # (category, COCO [x, y, w, h] in image pixels)
MAX_PHRASES = 8  # phrases of a caption that get targets (the benchmark's scenes have at most 6 objects)


def phrase_boxes(caption: str, boxes: Sequence[Box]) -> list[list[int]] | None:
    """The boxes each phrase of a caption names, or None when any phrase names none.

    A phrase names ``n`` boxes of a category when it opens with a count (``"a ... circle"``: 1, ``"two
    ... circles"``: 2) and ends with the category or its plural, and names no other category (``"a circle
    left of a square"`` is a relation, not a list item); they are taken from the left (by box centre) among
    boxes not yet named, as the benchmark orders its groups.

    >>> phrase_boxes("a red circle and two blue stars",
    ...              [("star", [50, 0, 10, 10]), ("circle", [0, 0, 10, 10]), ("star", [90, 0, 10, 10])])
    [[1], [0, 2]]
    """
    order = sorted(range(len(boxes)), key=lambda i: (_centre(boxes[i][1]), i))
    categories = {category for category, _ in boxes}
    used: set[int] = set()
    named = []
    for phrase in _PHRASE_BREAK.split(caption.lower().strip()):
        words = phrase.split()
        if not words or words[0] not in _COUNTS or ":" in phrase:
            return None
        if any(_names(w, category) for w in words[:-1] for category in categories):
            return None
        count = _COUNTS[words[0]]
        picked = [i for i in order if i not in used and _names(words[-1], boxes[i][0])][:count]
        if len(picked) != count:
            return None
        used.update(picked)
        named.append(picked)
    return named


def prefix_order(
    caption: str,
    boxes: Sequence[Box],
    image_size: tuple[int, int],
    preprocess: Preprocess,
    grid: tuple[int, int],
) -> tuple[str, list[list[int]]] | None:
    """The caption's phrases in the order the column-major prefix visits their boxes, with the boxes each
    names; None when its phrases do not all name boxes (:func:`phrase_boxes`).

    A group is placed by its leftmost box's centre: its prefix cell's column, then row (the order the
    prefix tokens run), then its x. The benchmark orders its groups by x alone, so two objects whose centres
    share a column come in an order the grid cannot show; in this order each next phrase is the next
    object down the prefix. The phrases are joined as the benchmark joins them (", " and a final " and ").

    >>> boxes = [("circle", [10, 60, 5, 5]), ("star", [12, 0, 5, 5])]  # one column; the star on top
    >>> prefix_order("a red circle and a blue star", boxes, (70, 70), Preprocess(70, 70, "bilinear",
    ...              (0, 0, 0), (1, 1, 1)), (7, 7))
    ('a blue star and a red circle', [[1], [0]])
    """
    named = phrase_boxes(caption, boxes)
    if named is None:
        return None
    scale, left, top = _crop_transform(image_size, preprocess)
    gh, gw = grid

    def place(group: list[int]) -> tuple[int, int, float]:
        x, y, w, h = boxes[group[0]][1]
        cx, cy = (float(x) + float(w) / 2) * scale - left, (float(y) + float(h) / 2) * scale - top
        column = min(max(int(cx * gw // preprocess.crop), 0), gw - 1)
        row = min(max(int(cy * gh // preprocess.crop), 0), gh - 1)
        return column, row, cx

    phrases = [p.strip() for p in _PHRASE_BREAK.split(caption.strip())]
    if len(phrases) != len(named):  # split apart from the matching's lower case (" AND "): leave it
        return None
    order = sorted(range(len(named)), key=lambda k: (place(named[k]), k))
    texts = [phrases[k] for k in order]
    text = texts[0] if len(texts) == 1 else ", ".join(texts[:-1]) + " and " + texts[-1]
    return text, [named[k] for k in order]


def _crop_transform(image_size: tuple[int, int], preprocess: Preprocess) -> tuple[float, float, float]:
    """(scale, left, top): an image pixel ``(x, y)`` lies at ``(x * scale - left, y * scale - top)`` in the
    model's input, as :class:`Preprocess` resizes the short side and centre-crops."""
    width, height = image_size
    scale = preprocess.resize_short / min(width, height)
    return scale, (round(width * scale) - preprocess.crop) / 2, (round(height * scale) - preprocess.crop) / 2


def _centre(bbox: Sequence[float]) -> float:
    return float(bbox[0]) + float(bbox[2]) / 2


def _names(word: str, category: str) -> bool:
    category = category.lower()
    return word in (category, category + "s", category + "es")


def cell_shares(
    bboxes: Sequence[Sequence[float]],
    image_size: tuple[int, int],
    preprocess: Preprocess,
    grid: tuple[int, int],
) -> np.ndarray:
    """(gh * gw,) each row-major prefix cell's share of the boxes' area inside the model's input.

    The boxes are mapped as :class:`Preprocess` maps the image (short side resized, centre-cropped); the
    crop is cut into ``grid`` cells. All zeros when no box area falls inside the crop.
    """
    scale, left, top = _crop_transform(image_size, preprocess)
    gh, gw = grid
    cell_h, cell_w = preprocess.crop / gh, preprocess.crop / gw
    shares = np.zeros((gh, gw), np.float64)
    for x, y, w, h in bboxes:
        x0, y0 = x * scale - left, y * scale - top
        x1, y1 = x0 + w * scale, y0 + h * scale
        xs = np.clip(
            np.minimum(x1, (np.arange(gw) + 1) * cell_w) - np.maximum(x0, np.arange(gw) * cell_w), 0, None
        )
        ys = np.clip(
            np.minimum(y1, (np.arange(gh) + 1) * cell_h) - np.maximum(y0, np.arange(gh) * cell_h), 0, None
        )
        shares += np.outer(ys, xs)
    total = shares.sum()
    return (shares / total if total > 0 else shares).reshape(-1).astype(np.float32)


def read_boxes(
    data_dir: str | Path, split: str, image_ids: Sequence[str]
) -> list[tuple[tuple[int, int], list[Box]]]:
    """Each image's (width, height) and boxes from the ETL manifest, in ``image_ids`` order."""
    import pyarrow.parquet as pq

    from training.caption.data import manifest_path

    table = pq.read_table(manifest_path(data_dir, split), columns=["image_id", "width", "height", "boxes"])
    rows = {r["image_id"]: r for r in table.to_pylist()}
    return [
        (
            (int(rows[i]["width"]), int(rows[i]["height"])),
            [(b["category"], b["bbox"]) for b in rows[i]["boxes"] or []],
        )
        for i in image_ids
    ]


def phrase_targets(
    captions: Sequence[str],
    images: Sequence[tuple[tuple[int, int], list[Box]]],
    preprocess: Preprocess,
    grid: tuple[int, int],
    max_phrases: int,
    matches: Sequence[list[list[int]] | None] | None = None,
) -> Tensor:
    """(N, max_phrases, gh * gw) float16 attention targets of N (caption, image) pairs: phrase ``k``'s
    cell shares (:func:`cell_shares`), zeros for phrases past the caption's last or captions whose phrases
    do not all name boxes (:func:`phrase_boxes`, or the boxes ``matches`` gives each caption's phrases)."""
    out = np.zeros((len(captions), max_phrases, grid[0] * grid[1]), np.float32)
    for n, (caption, (size, boxes)) in enumerate(zip(captions, images, strict=True)):
        named = phrase_boxes(caption, boxes) if matches is None else matches[n]
        for k, picked in enumerate((named or [])[:max_phrases]):
            out[n, k] = cell_shares([boxes[i][1] for i in picked], size, preprocess, grid)
    return torch.from_numpy(out).half()


def separator_ids(tokenizer: CaptionTokenizer) -> set[int]:
    """The token ids that end a phrase: the comma and " and" as the tokenizer writes them after a word.

    Raises:
        ValueError: The tokenizer splits one of them into several tokens.
    """
    word = tokenizer.encode("a")
    ids = set()
    for text in (",", " and"):
        encoded = tokenizer.encode("a" + text)
        if encoded[: len(word)] != word or len(encoded) != len(word) + 1:
            raise ValueError(f"the tokenizer writes {text!r} as several tokens: phrases cannot be told apart")
        ids.add(encoded[-1])
    return ids


def token_targets(input_ids: Tensor, targets: Tensor, separators: set[int], eos_id: int) -> Tensor:
    """(B, T, P) the attention target of each caption position: position ``t`` predicts token ``t + 1``,
    which belongs to the phrase counted so far; separators, EOS, padding and phrases without a target get
    zeros (not supervised).

    Args:
        input_ids: (B, T) ``<bos> tokens <eos> <pad>..``.
        targets: (B, K, P) each pair's phrase targets (:func:`phrase_targets`).
        separators: Ids that end a phrase (:func:`separator_ids`).
        eos_id: The end-of-caption id.
    """
    batch, length = input_ids.shape
    max_phrases = targets.shape[1]
    phrase = torch.full((batch, length), -1, dtype=torch.long)
    for b, row in enumerate(input_ids.tolist()):
        k = 0
        for t, token in enumerate(row[1:], start=1):
            if token == eos_id:
                break
            if token in separators:
                k += 1
            elif k < max_phrases:
                phrase[b, t] = k
    predicted = phrase[:, 1:]  # (B, T-1) the phrase of the token each position predicts
    gathered = torch.gather(
        targets.float(), 1, predicted.clamp_min(0)[:, :, None].expand(-1, -1, targets.shape[2])
    )
    gathered = gathered * (predicted >= 0)[:, :, None]
    return torch.cat([gathered, gathered.new_zeros(batch, 1, targets.shape[2])], dim=1)  # (B, T, P)
