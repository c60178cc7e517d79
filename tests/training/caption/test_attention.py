"""Attention supervision: phrases matched to the boxes they name, the cells those boxes cover, per-token
targets, the loss on the decoder's head, and a training run that uses it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from snap2caption.config import ConfigError
from snap2caption.imaging.transforms import Preprocess
from snap2caption.models.caption.config import CaptionConfig
from snap2caption.models.caption.model import CaptionModel
from snap2caption.models.caption.tokenizer import CaptionTokenizer
from tests.training.caption.conftest import synthetic_etl, tiny_run
from training.callbacks.base import Callback
from training.caption.attention import (
    cell_shares,
    phrase_boxes,
    phrase_targets,
    prefix_order,
    separator_ids,
    token_targets,
)
from training.caption.data import CaptionPairs, SplitData
from training.caption.run import train_caption

CONFIGS = Path(__file__).resolve().parents[3] / "training" / "configs" / "caption"
PREPROCESS = Preprocess(resize_short=256, crop=224, interpolation="bicubic", mean=(0, 0, 0), std=(1, 1, 1))


@pytest.fixture(scope="module")
def tok() -> CaptionTokenizer:
    lists = [
        "a red circle and two blue squares",
        "a small green star, a large red circle and a blue square",
        "two yellow triangles and a purple hexagon",
        "a red square, a blue circle and a green star",
    ]
    return CaptionTokenizer.train(lists * 5, vocab_size=400, min_frequency=1)


def test_each_phrase_names_the_boxes_of_its_shape_from_the_left() -> None:
    boxes = [
        ("circle", [150, 0, 10, 10]),
        ("square", [10, 0, 10, 10]),
        ("circle", [60, 0, 10, 10]),
        ("circle", [100, 0, 10, 10]),
    ]
    caption = "a small blue square, two red circles and a large green circle"
    assert phrase_boxes(caption, boxes) == [[1], [2, 3], [0]]
    assert phrase_boxes("an orange circle", [("circle", [0, 0, 5, 5])]) == [[0]]
    assert phrase_boxes("three red crosses", [("cross", [i * 20, 0, 5, 5]) for i in range(3)]) == [[0, 1, 2]]
    # Not matched, so not supervised: a shape no box has, too few boxes, a caption that is no list.
    assert phrase_boxes("a red star", boxes) is None
    assert phrase_boxes("four red circles", boxes) is None
    assert phrase_boxes("a circle left of a square", boxes) is None
    assert phrase_boxes("two shapes: a red circle and a blue square", boxes) is None
    assert phrase_boxes("there is a red circle", boxes) is None


def test_prefix_order_lists_the_phrases_down_the_column_major_prefix() -> None:
    # 256 x 256, 16-px border cropped, 32-px cells. Written by x alone: square (x 52), circle (x 60), two
    # stars (x 130, 200). The circle shares the square's column (1) but lies above it, so it comes first; the
    # stars stay one group, placed by their leftmost member (column 3).
    boxes = [
        ("star", [120, 100, 20, 20]),
        ("square", [42, 210, 20, 20]),
        ("circle", [50, 20, 20, 20]),
        ("star", [190, 10, 20, 20]),
    ]
    caption = "a blue square, a red circle and two green stars"
    text, named = prefix_order(caption, boxes, (256, 256), PREPROCESS, (7, 7))
    assert text == "a red circle, a blue square and two green stars"
    assert named == [[2], [1], [0, 3]]
    # The targets of the rewritten caption follow its phrases: the circle's cell first.
    targets = phrase_targets([text], [((256, 256), boxes)], PREPROCESS, (7, 7), 4, [named])
    assert targets[0, 0, 0 * 7 + 1] == 1 and float(targets[0, 1, 6 * 7 + 1]) == pytest.approx(0.7, abs=1e-3)
    # Already in prefix order: unchanged; not a list of boxes: None.
    assert prefix_order("a red circle", boxes, (256, 256), PREPROCESS, (7, 7)) == ("a red circle", [[2]])
    assert prefix_order("a circle left of a square", boxes, (256, 256), PREPROCESS, (7, 7)) is None
    assert prefix_order("a blue square AND a red circle", boxes, (256, 256), PREPROCESS, (7, 7)) is None


def test_a_box_covers_the_prefix_cells_it_falls_in_after_resize_and_crop() -> None:
    # 256 x 256: no resize, a 16-px border cropped away; 224 / 7 = 32-px cells.
    one_cell = cell_shares([[16 + 3 * 32, 16 + 2 * 32, 32, 32]], (256, 256), PREPROCESS, (7, 7))
    assert one_cell.shape == (49,) and one_cell[2 * 7 + 3] == pytest.approx(1.0)
    assert one_cell.sum() == pytest.approx(1.0)
    # Half in each of two cells of a row.
    two = cell_shares([[16 + 16, 16, 32, 32]], (256, 256), PREPROCESS, (7, 7))
    assert two[0] == pytest.approx(0.5) and two[1] == pytest.approx(0.5)
    # A 512 x 512 image is halved first: the same box in image pixels is twice as large.
    scaled = cell_shares([[2 * (16 + 3 * 32), 2 * (16 + 2 * 32), 64, 64]], (512, 512), PREPROCESS, (7, 7))
    np.testing.assert_allclose(scaled, one_cell, atol=1e-6)
    # A wide image loses its sides to the crop: a box in the left margin covers nothing.
    assert cell_shares([[0, 100, 20, 20]], (512, 256), PREPROCESS, (7, 7)).sum() == 0.0


def test_each_caption_position_gets_the_target_of_the_phrase_it_writes(tok: CaptionTokenizer) -> None:
    caption = "a red circle and two blue squares"
    boxes = [
        ("square", [16 + 5 * 32, 16, 32, 32]),
        ("circle", [16, 16, 32, 32]),
        ("square", [16 + 6 * 32, 16, 32, 32]),
    ]
    targets = phrase_targets(
        [caption], [((256, 256), boxes)], PREPROCESS, (7, 7), max_phrases=4
    )  # (1, 4, 49)
    assert targets.shape == (1, 4, 49)
    assert targets[0, 0, 0] == 1 and targets[0, 1, 5] == 0.5 and targets[0, 1, 6] == 0.5
    assert targets[0, 2:].sum() == 0  # no third phrase

    input_ids, _ = tok.batch_encode([caption], 32)  # <bos> a red circle and two blue squares <eos>
    per_token = token_targets(input_ids, targets, separator_ids(tok), tok.eos_id)  # (1, T, 49)
    words = [tok.decode([i]).strip() for i in input_ids[0].tolist()]
    looks_at = [int(row.argmax()) if row.sum() else None for row in per_token[0]]
    # Position t predicts token t + 1: the first phrase's tokens look at the circle's cell, the second's at
    # the squares' cells; the position before "and" (a separator) and the one before EOS look nowhere.
    and_at = words.index("and")
    assert looks_at[: and_at - 1] == [0] * (and_at - 1)
    assert looks_at[and_at - 1] is None
    assert all(cell in (5, 6) for cell in looks_at[and_at : len(words) - 2])
    assert looks_at[len(words) - 2 :] == [None, None]


def test_the_attention_loss_trains_the_head_toward_its_targets(tok: CaptionTokenizer) -> None:
    torch.manual_seed(0)
    model = CaptionModel(CaptionConfig.from_yaml(CONFIGS / "tiny.yaml", ["mapping.order=columns"]), tok)
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    input_ids, mask = tok.batch_encode(["a red circle", "two blue squares"], 16)
    targets = torch.zeros(2, input_ids.shape[1], 4)
    targets[:, :3, 2] = 1.0  # the first positions should look at cell 2 (bottom-left of the 2 x 2 grid)
    before = model.decoder.config._attn_implementation
    out = model(input_ids, mask, pixels=pixels, attention_targets=targets, attention_layer=1)
    assert model.decoder.config._attn_implementation == before  # eager only for the supervised pass
    assert out.attention_loss is not None and out.attention_loss.item() > 0
    plain = model(input_ids, mask, pixels=pixels)
    assert plain.attention_loss is None and torch.allclose(plain.loss, out.loss)
    nowhere = model(input_ids, mask, pixels=pixels, attention_targets=torch.zeros_like(targets))
    assert nowhere.attention_loss is not None and nowhere.attention_loss.item() == 0.0

    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = model(
            input_ids, mask, pixels=pixels, attention_targets=targets, attention_layer=1
        ).attention_loss
        assert loss is not None
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]  # the head learns to look where it is told


@pytest.fixture(scope="module")
def boxed_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same benchmark with its boxes in the manifests (``caption_data`` has captions only)."""
    return synthetic_etl(tmp_path_factory.mktemp("boxed_data"), boxes=True)


def test_a_run_with_attention_supervision_trains_on_the_boxes(boxed_data: Path, tmp_path: Path) -> None:
    seen: list[dict[str, Any]] = []

    class Probe(Callback):
        def on_step_end(self, trainer: Any, logs: dict[str, float]) -> None:
            seen.append(dict(logs))

    config = tiny_run(
        boxed_data,
        tmp_path,
        "run.mlflow=false",
        "run.register=false",
        "max_steps=3",
        "captions_per_image=1",
        "attention_supervision=0.5",
        "attention_layer=1",
    )
    result = train_caption(config, progress=False, extra_callbacks=[Probe()])
    assert result.state.step == 3 and all(np.isfinite(s["loss"]) for s in seen)
    # The synthetic benchmark's first caption is a list of phrases: every training pair got targets.
    pairs = CaptionPairs(SplitData.load(boxed_data, "train"), 1, preprocess=PREPROCESS)
    assert pairs.add_attention_targets(PREPROCESS, (2, 2)) == len(pairs)
    # Its other captions ("a red circle at the top left", ...) are not all lists; some are not supervised.
    every = CaptionPairs(SplitData.load(boxed_data, "train"), 0, preprocess=PREPROCESS)
    supervised = every.add_attention_targets(PREPROCESS, (2, 2))
    assert 0 < supervised < len(every)
    # In prefix order the lists are rewritten (the same phrases), the other captions kept as written.
    written = [c for _, c in every.pairs]
    assert every.add_attention_targets(PREPROCESS, (2, 2), prefix_order=True) == supervised
    for before, (_, after) in zip(written, every.pairs, strict=True):
        assert sorted(re.split(r", | and ", after)) == sorted(re.split(r", | and ", before))


def test_a_manifest_without_boxes_supervises_nothing_and_says_so(
    caption_data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = tiny_run(
        caption_data,
        tmp_path,
        "run.mlflow=false",
        "run.register=false",
        "max_steps=1",
        "attention_supervision=0.5",
    )
    with caplog.at_level("WARNING", logger="training.caption.run"):
        train_caption(config, progress=False)
    assert "no training pair has phrases matched to boxes" in caplog.text


def test_attention_supervision_needs_cells_and_a_layer_the_decoder_has(
    caption_data: Path, tmp_path: Path
) -> None:
    base = (
        "run.mlflow=false",
        "run.register=false",
        "max_steps=1",
        "attention_supervision=0.5",
    )
    transformer = tiny_run(
        caption_data,
        tmp_path / "t",
        *base,
        "model.mapping.type=transformer",
        "model.mapping.grid=4",
        "model.mapping.num_heads=2",
    )
    with pytest.raises(ConfigError, match=r"needs model\.mapping\.type=mlp"):
        train_caption(transformer, progress=False)
    deep = tiny_run(caption_data, tmp_path / "d", *base, "attention_layer=2")  # tiny has 2 layers
    with pytest.raises(ConfigError, match="attention_layer must be below"):
        train_caption(deep, progress=False)
    with pytest.raises(ConfigError, match="attention_supervision must be >= 0"):
        tiny_run(caption_data, tmp_path, "attention_supervision=-1")
