"""bench/real_photos.py: its tally of the gateway's answers, and a smoke run through the session stack."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from tests.bench.conftest import load_script, read_result
from tests.gateway_stack import Stack

script = load_script("real_photos")


def test_shape_words_are_the_alt_texts_own_not_a_tags() -> None:
    assert script.shape_words("A large white circle and two stars.", []) == ("circle", "stars")
    # "Image may contain: crossword puzzle" names no shape; a tag's word is the tagger's, not the shapes'.
    tags = ["star", "crossword puzzle"]
    assert script.shape_words("Image may contain: crossword puzzle, star.", tags) == ()
    assert script.shape_words("Image may contain: cat.", ["cat"]) == ()


def test_tally_counts_what_got_through_over_the_answered_requests() -> None:
    body_in = {
        "caption": {"in_domain": True},
        "alt_text": {"text": "A small red square."},
        "objects": [{"label": "square"}],
        "objects_domain": {"in_domain": True},
        "tags": [{"name": "envelope"}],
    }
    body_out = {
        "caption": {"in_domain": False},
        "alt_text": {"text": "Image may contain: cat."},
        "objects": [],
        "objects_domain": {"in_domain": False},
        "tags": [{"name": "cat"}],
    }
    answers = [
        script.answer("moon", "orig", 200, body_in),
        script.answer("chelsea", "orig", 200, body_out),
        script.answer("chelsea", "grey", 200, body_out),
        script.answer("coffee", "orig", 503, None),
    ]
    figures = script.tally(answers)
    assert figures["requests"] == 4 and figures["errors"] == 1
    assert figures["captioner_in_domain"] == figures["detector_in_domain"] == 1
    assert figures["captioner_out_of_domain_rate"] == figures["detector_out_of_domain_rate"] == 0.6667
    assert figures["alt_text_shape_words_on"] == ["moon/orig: A small red square."]
    assert figures["objects_returned_on"] == ["moon/orig: 1"]


def test_every_variant_gives_an_rgb_image_of_the_photo() -> None:
    original = Image.new("RGB", (300, 200), (120, 80, 40))
    sizes = {name: make(original).size for name, make in script.VARIANTS.items()}
    assert all(make(original).mode == "RGB" for make in script.VARIANTS.values())
    assert sizes["orig"] == sizes["grey"] == sizes["jpeg10"] == (300, 200)
    assert sizes["thumb64"] == (64, 43) and sizes["crop40"] == (120, 80) and sizes["corner"] == (150, 100)
    assert sizes["rot90"] == (200, 300)


def test_unknown_photos_or_variants_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        script.main(["--photos", "chelsea,mona_lisa"])
    assert "unknown photos ['mona_lisa']" in capsys.readouterr().err


@pytest.mark.integration
@pytest.mark.slow
def test_smoke_run_writes_its_result(stack: Stack, tmp_path: Path) -> None:
    out = tmp_path / "real_photos.json"
    args = [
        "--url", stack.gateway.url, "--photos", "chelsea,moon", "--variants", "orig,thumb64",
        "--out", str(out),
    ]  # fmt: skip
    returned = load_script("real_photos").main(args)
    figures = read_result(out, "real_photos")
    assert figures == returned
    assert figures["requests"] == 4 and figures["errors"] == 0
    assert [(a["photo"], a["variant"], a["status"]) for a in figures["answers"]] == [
        ("chelsea", "orig", 200), ("chelsea", "thumb64", 200),
        ("moon", "orig", 200), ("moon", "thumb64", 200),
    ]  # fmt: skip
    # The session stack's tiny models carry no domain models, so only the shape of the answers is checked.
    for answer in figures["answers"]:
        assert isinstance(answer["alt_text"], str) and answer["alt_text"]
        assert isinstance(answer["objects"], int) and isinstance(answer["shape_words"], list)
