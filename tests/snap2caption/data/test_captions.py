"""Caption normalisation: every source's quirks end up as the same clean text."""

from __future__ import annotations

import pytest

from snap2caption.data.captions import CaptionPolicy, normalise_caption


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        # Flickr30K tokenises punctuation off its word.
        (
            "Two young , White males are outside near many bushes .",
            "two young, white males are outside near many bushes",
        ),
        # COCO leaves trailing spaces and sometimes a final period.
        (
            "A man with a red helmet on a small moped on a dirt road. ",
            "a man with a red helmet on a small moped on a dirt road",
        ),
        ("there is a woman that is cutting a white cake", "there is a woman that is cutting a white cake"),
        # Control characters go; tabs and newlines separate words.
        ("A\tdog\nruns\x00 on\u200b grass\x7f", "a dog runs on grass"),
        # NFKC: full-width letters and the "fi" ligature become plain ASCII.
        ("Ａ ﬁsh in a tank", "a fish in a tank"),
        ("Is it a cat ?", "is it a cat?"),
        ("Wait ... a dog !", "wait... a dog!"),
    ],
)
def test_normalise_caption_cleans_source_quirks(raw: str, expected: str) -> None:
    assert normalise_caption(raw) == expected


def test_policy_switches() -> None:
    keep = CaptionPolicy(lowercase=False, strip_trailing_period=False)
    assert normalise_caption("A dog runs on the green grass .", keep) == "A dog runs on the green grass."
    assert normalise_caption("A dog.", CaptionPolicy()) == "a dog"


@pytest.mark.parametrize("raw", ["", "   ", " . ", "...", "\x00\x01", "- !"])
def test_empty_or_wordless_captions_are_dropped(raw: str) -> None:
    assert normalise_caption(raw) is None


def test_word_bounds() -> None:
    policy = CaptionPolicy(min_words=3, max_words=5)
    assert normalise_caption("a red cube", policy) == "a red cube"
    assert normalise_caption("a cube", policy) is None
    assert normalise_caption("a big red cube here", policy) == "a big red cube here"
    assert normalise_caption("a big red cube on the grass", policy) is None
    # Punctuation attached to a word does not make a word of its own.
    assert normalise_caption("a , red , cube .", policy) == "a, red, cube"


def test_policy_refuses_impossible_bounds() -> None:
    with pytest.raises(ValueError, match="min_words"):
        CaptionPolicy(min_words=0)
    with pytest.raises(ValueError, match="max_words"):
        CaptionPolicy(min_words=5, max_words=4)
