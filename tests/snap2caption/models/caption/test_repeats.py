"""Limited repeats: a token pair may occur twice in a caption only where the training captions repeat it;
and the mapping's cell coordinates."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
import torch

from snap2caption.models.caption.config import CaptionConfig
from snap2caption.models.caption.decoding import (
    DecodingConfig,
    SpecialTokens,
    banned_repeat_tokens,
    decoding_problems,
    mask_logits,
    repeated_bigrams,
)
from snap2caption.models.caption.model import CaptionModel, cell_coordinates, column_major
from snap2caption.models.caption.tokenizer import CaptionTokenizer
from tests.snap2caption.models.caption.conftest import TINY


def repeated_pairs(ids: list[int]) -> set[tuple[int, int]]:
    pairs = list(itertools.pairwise(ids))
    return {p for p in pairs if pairs.count(p) > 1}


def test_repeated_bigrams_are_the_pairs_one_target_holds_twice() -> None:
    targets = [[1, 2, 7, 1, 2], [3, 4, 9], [3, 4], [5, 6, 5, 6, 5]]
    # (3, 4) occurs in two targets but never twice in one: it is not repeatable
    assert repeated_bigrams(targets) == [[1, 2], [5, 6], [6, 5]]
    assert repeated_bigrams([]) == []


def test_the_next_token_may_not_repeat_a_pair_unless_it_is_repeatable() -> None:
    rows = [[5, 1, 2, 3, 1], [5, 1, 2, 3, 1], [], [4]]
    assert banned_repeat_tokens(rows, set()) == [[2], [2], [], []]
    assert banned_repeat_tokens([[5, 1, 2, 3, 1]], {(1, 2)}) == [[]]
    assert banned_repeat_tokens([[1, 2, 1, 3, 1]], set()) == [[2, 3]]


@pytest.mark.parametrize("framework", ["numpy", "torch"])
def test_mask_logits_forbids_exactly_the_banned_tokens(framework: str) -> None:
    special = SpecialTokens(bos=6, eos=7, pad=6)
    generated = np.array([[5, 1, 2, 3, 1], [5, 1, 2, 3, 1]])
    settings = DecodingConfig(limit_repeats=True, repeatable_bigrams=[])
    logits: np.ndarray | torch.Tensor = np.zeros((2, 8), np.float32)
    if framework == "torch":
        logits, generated = torch.from_numpy(logits), torch.from_numpy(generated)
    mask_logits(logits, generated, special, settings)
    forbidden = [set(np.flatnonzero(np.isinf(np.asarray(row))).tolist()) for row in logits]
    assert forbidden == [{2, 6}, {2, 6}]  # 6: BOS/pad; 2 would make (1, 2) occur twice
    for unlimited in (DecodingConfig(), DecodingConfig(limit_repeats=False, repeatable_bigrams=[])):
        free = np.zeros((2, 8), np.float32)  # nothing learned, or the limit switched off
        mask_logits(free, np.asarray(generated), special, unlimited)
        assert set(np.flatnonzero(np.isinf(free[0])).tolist()) == {6}


def test_repeatable_bigrams_are_checked() -> None:
    assert decoding_problems(DecodingConfig(repeatable_bigrams=[[1, 2]])) == []
    assert decoding_problems(DecodingConfig(repeatable_bigrams=None)) == []
    assert decoding_problems(DecodingConfig(repeatable_bigrams=[[1, 2, 3]]))
    assert decoding_problems(DecodingConfig(repeatable_bigrams=[[-1, 2]]))


@pytest.mark.parametrize("num_beams", [1, 3])
def test_a_decoder_that_loops_repeats_no_pair_under_the_limit(
    random_model: CaptionModel, pixels: torch.Tensor, num_beams: int
) -> None:
    plain = random_model.generate(pixels, num_beams=num_beams, max_new_tokens=20)
    assert any(repeated_pairs(c.token_ids) for c in plain)  # an untrained decoder loops
    limited = dataclasses.replace(random_model.config.decoding, limit_repeats=True, repeatable_bigrams=[])
    original = random_model.config.decoding
    random_model.config.decoding = limited
    try:
        captions = random_model.generate(pixels, num_beams=num_beams, max_new_tokens=20)
    finally:
        random_model.config.decoding = original
    assert not any(repeated_pairs(c.token_ids) for c in captions)
    allowed = [list(p) for c in plain for p in repeated_pairs(c.token_ids)]
    random_model.config.decoding = dataclasses.replace(limited, repeatable_bigrams=allowed)
    try:  # allowing every pair it repeated gives the plain captions back
        again = random_model.generate(pixels, num_beams=num_beams, max_new_tokens=20)
    finally:
        random_model.config.decoding = original
    assert [c.token_ids for c in again] == [c.token_ids for c in plain]


def test_cell_coordinates_are_row_major_centres_with_fourier_bands() -> None:
    coords = cell_coordinates((2, 3), 1)  # (P, 2 + 4)
    assert coords.shape == (6, 6)
    assert coords[:, 0].tolist() == pytest.approx([-2 / 3, 0, 2 / 3] * 2)  # x moves fastest
    assert coords[:, 1].tolist() == pytest.approx([-0.5] * 3 + [0.5] * 3)
    assert coords[:, 2:4] == pytest.approx(torch.sin(coords[:, :2] * torch.pi))
    assert coords[:, 4:6] == pytest.approx(torch.cos(coords[:, :2] * torch.pi))
    assert cell_coordinates((7, 7), 0).shape == (49, 0)


def test_coordinates_widen_the_mapping_input_only(tok: CaptionTokenizer, pixels: torch.Tensor) -> None:
    plain = CaptionModel(CaptionConfig.from_yaml(TINY), tok)
    placed = CaptionModel(CaptionConfig.from_yaml(TINY, ["mapping.coords=2"]), tok)
    first_plain, first_placed = plain.mapping.net[0], placed.mapping.net[0]
    assert first_placed.in_features == first_plain.in_features + 2 + 4 * 2
    assert placed.encode(pixels).shape == plain.encode(pixels).shape
    assert "mapping.coords" not in placed.state_dict()  # a constant, rebuilt from the config


def test_column_major_takes_the_cells_column_by_column_from_the_left() -> None:
    assert column_major((2, 3)).tolist() == [0, 3, 1, 4, 2, 5]
    assert column_major((7, 7))[:8].tolist() == [0, 7, 14, 21, 28, 35, 42, 1]


def test_the_columns_order_permutes_the_prefix_tokens_and_nothing_else(
    tok: CaptionTokenizer, pixels: torch.Tensor
) -> None:
    by_rows = CaptionModel(CaptionConfig.from_yaml(TINY, ["mapping.coords=2"]), tok).eval()
    by_columns = CaptionModel(
        CaptionConfig.from_yaml(TINY, ["mapping.coords=2", "mapping.order=columns"]), tok
    ).eval()
    by_columns.load_state_dict(by_rows.state_dict())  # same weights: only the order differs
    with torch.no_grad():
        rows, columns = by_rows.encode(pixels), by_columns.encode(pixels)  # (B, 4, D): a 2 x 2 grid
    assert torch.equal(columns, rows[:, [0, 2, 1, 3]])  # top-left, bottom-left, top-right, bottom-right
    assert not torch.equal(columns, rows)
