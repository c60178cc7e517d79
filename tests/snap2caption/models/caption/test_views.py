"""Mirrored views of unsure images: which caption wins, which images are made again, and that every runtime
serves the same combined captions."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from snap2caption.models.caption import runtimes
from snap2caption.models.caption.artifact import save_caption_model
from snap2caption.models.caption.config import CaptionConfig
from snap2caption.models.caption.decoding import Caption, DecodingConfig, decoding_problems
from snap2caption.models.caption.export import export_for_serving
from snap2caption.models.caption.model import build_caption_model
from snap2caption.models.caption.views import caption_views, combine, flip_pixels, view_key
from tests.snap2caption.models.caption.conftest import CAPTIONS, TINY


def caption(text: str, probability: float) -> Caption:
    return Caption(text=text, token_ids=[], confidence=math.log(probability), n_tokens=0)


def test_views_agree_on_the_same_words_in_another_order() -> None:
    assert view_key("A red circle and a blue star") == view_key("a blue star and a red circle")
    assert view_key("a red circle, a blue star and a cross") == view_key(
        "a cross, a red circle and a blue star"
    )
    assert view_key("a red circle and a blue star") != view_key("a red circle and a red star")
    assert view_key("a red circle") != view_key("a red circle and a red circle")  # a count is a word


def test_flips_mirror_width_then_height_alike_in_numpy_and_torch() -> None:
    pixels = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
    expected = [pixels, pixels[..., ::-1], pixels[..., ::-1, :], pixels[..., ::-1, ::-1]]
    for view, want in enumerate(expected):
        got = flip_pixels(pixels, view)
        np.testing.assert_array_equal(got, want)
        assert got.flags.c_contiguous  # ONNX Runtime is handed it as is
        np.testing.assert_array_equal(flip_pixels(torch.from_numpy(pixels), view).numpy(), want)
        np.testing.assert_array_equal(flip_pixels(got, view), pixels)  # each mirror undoes itself


def test_the_views_agreeing_with_the_most_probability_win() -> None:
    """Two views agreeing at 0.6 outweigh one at 0.9; the winner is the group's likeliest caption, and its
    raw confidence the group's probability over all four views (a view saying something else counts 0)."""
    views = [
        caption("a red circle and a blue star", 0.9),
        caption("a blue star and a green square", 0.6),
        caption("a green square and a blue star", 0.65),
        caption("a blue star", 0.3),
    ]
    got = combine(views)
    assert got.text == "a green square and a blue star"
    assert got.raw_probability == pytest.approx((0.6 + 0.65) / 4)


def test_a_tie_goes_to_the_image_as_it_is() -> None:
    got = combine([caption("a red circle", 0.5), caption("a blue star", 0.5)])
    assert got.text == "a red circle" and got.raw_probability == pytest.approx(0.25)


def test_only_unsure_images_are_made_again() -> None:
    first = [caption("a red circle", 0.99), caption("a blue star", 0.5), caption("a green square", 0.9)]
    asked: list[tuple[int, list[int]]] = []

    def decode_view(view: int, rows: list[int]) -> list[Caption]:
        asked.append((view, rows))
        return [caption("a green square", 0.8) for _ in rows]

    got = caption_views(first, decode_view, views=3, below=0.95)
    assert asked == [(1, [1, 2]), (2, [1, 2])]
    assert got[0] is first[0]  # sure: served from the one view
    assert got[1].text == "a green square" and got[1].raw_probability == pytest.approx(1.6 / 3)
    assert got[2].text == "a green square" and got[2].raw_probability == pytest.approx(2.5 / 3)
    assert caption_views(first, decode_view, views=1, below=1.0) is first
    assert len(asked) == 2  # one view takes no others


def test_views_are_checked() -> None:
    assert decoding_problems(DecodingConfig(views=4, views_below=0.9)) == []
    assert decoding_problems(DecodingConfig(views=5))
    assert decoding_problems(DecodingConfig(views=0))
    assert decoding_problems(DecodingConfig(views_below=0.0))
    assert decoding_problems(DecodingConfig(views_below=1.5))
    assert CaptionConfig().decoding.views == 3  # the starter's
    assert DecodingConfig().views == 1


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded, untrained ``tiny`` model whose captions depend on the image: its mapping and decoder
    matrices scaled 4x (at their initial scale every image gets the same caption)."""
    torch.manual_seed(0)
    model, tokenizer = build_caption_model(CaptionConfig.from_yaml(TINY), captions=CAPTIONS * 2)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if not name.startswith("encoder") and weight.dim() > 1:
                weight.mul_(4.0)
    folder = save_caption_model(model.eval(), tokenizer, tmp_path_factory.mktemp("caption") / "artifact")
    export_for_serving(folder)
    return folder


def test_every_runtime_serves_the_combination_of_its_single_views(artifact: Path) -> None:
    """With 4 views below 1.0 (every image of a random model is unsure), the ONNX and torch runtimes each
    give what combining their own one-view captions of the four mirrors gives (the one-view loops agree:
    ``test_ort.py``)."""
    one = DecodingConfig(max_new_tokens=8)
    four = dataclasses.replace(one, views=4, views_below=1.0)
    for name in ("onnx", "torch"):
        runtime = runtimes.load(artifact, name)
        pixels = np.random.default_rng(3).standard_normal((4, *runtime.preprocess.output_shape))
        pixels = pixels.astype(np.float32)
        runtime.decoding = one
        if name == "torch":
            runtime.model.config.decoding = one  # type: ignore[attr-defined]
        with torch.inference_mode():
            mirrors = [runtime.generate(flip_pixels(pixels, view)) for view in range(4)]
        want = [combine([raw(m[i]) for m in mirrors]) for i in range(4)]
        runtime.decoding = four
        with torch.inference_mode():
            got = runtime.generate(pixels)
        assert [c.text for c in got] == [c.text for c in want], name
        assert [c.confidence for c in got] == pytest.approx([c.confidence for c in want], abs=1e-5), name
        assert any(abs(a.confidence - b.confidence) > 1e-3 for a, b in zip(got, mirrors[0], strict=True))
        assert len({view_key(m[i].text) for m in mirrors for i in range(4)}) > 1  # the views differ


def raw(c: Caption) -> Caption:
    """A served caption without its calibration and domain answer (what the views combine)."""
    return dataclasses.replace(c, calibrated=None, in_domain=None, domain_score=None)
