"""Alt text rules and gender-neutral wording (pure functions, no services)."""

from __future__ import annotations

import pytest

from snap2caption.alt_text import (
    AltText,
    alt_text_labels,
    caption_alt_text,
    caption_note,
    dedupe_labels,
    fallback_alt_text,
    finish_sentence,
    gender_neutral,
    join_words,
    make_alt_text,
    strip_redundant_opening,
    truncate_words,
)


@pytest.mark.parametrize(
    ("caption", "expected"),
    [
        ("an image of a dog on a beach", "A dog on a beach."),
        ("Image of a dog", "A dog."),
        ("a picture of two cats", "Two cats."),
        ("this is a photo of a red bus", "A red bus."),
        ("a photograph showing people at a market", "People at a market."),
        ("a close-up photo of a flower", "A flower."),
        ("A photo of an image of a cat", "A cat."),  # repeated openings all go
        ("  a   dog  running  ", "A dog running."),
        ("a dog running.", "A dog running."),
        ("is it a bird?", "Is it a bird?"),
        ("a dog,", "A dog."),
        ("photographers at a stadium", "Photographers at a stadium."),  # not an opening, a word
        ("iPhone on a table", "IPhone on a table."),
        ("NASA rocket launch", "NASA rocket launch."),
    ],
)
def test_caption_alt_text_cleans_caption(caption: str, expected: str) -> None:
    assert caption_alt_text(caption) == expected


def test_opening_alone_is_kept_rather_than_emptied() -> None:
    assert strip_redundant_opening("an image of ") == "an image of "
    assert caption_alt_text("a photo") == "A photo."


def test_long_caption_is_cut_at_a_word_boundary_with_a_full_stop() -> None:
    caption = "a " + " ".join(f"word{i}" for i in range(60))
    text = caption_alt_text(caption, max_chars=125)
    assert len(text) <= 125
    assert text.endswith(".")
    body = text[:-1]
    assert caption.startswith(body[0].lower() + body[1:])  # a prefix of the caption...
    assert caption[len(body)] == " "  # ...ending where a word ended


def test_truncate_words_edge_cases() -> None:
    assert truncate_words("short", 10) == "short"
    assert truncate_words("abcdefghijklmnop", 5) == "abcde"  # one long word: hard cut
    assert truncate_words("one two, three", 8) == "one two"  # trailing comma dropped
    assert finish_sentence("", 125) == ""


@pytest.mark.parametrize(
    ("items", "expected"),
    [([], ""), (["a"], "a"), (["a", "b"], "a and b"), (["a", "b", "c"], "a, b and c")],
)
def test_join_words(items: list[str], expected: str) -> None:
    assert join_words(items) == expected


def test_fallback_dedupes_and_lists_labels() -> None:
    labels = ["dog", "Dog", "frisbee", " dog ", "grass", "", "frisbee"]
    assert dedupe_labels(labels) == ["dog", "frisbee", "grass"]
    assert fallback_alt_text(labels) == "Image may contain: dog, frisbee and grass."
    assert fallback_alt_text(["cat"]) == "Image may contain: cat."
    assert fallback_alt_text([]) is None


def test_fallback_keeps_at_most_five_labels_and_fits_the_limit() -> None:
    labels = [f"label{i}" for i in range(10)]
    assert fallback_alt_text(labels) == "Image may contain: label0, label1, label2, label3 and label4."
    long_labels = ["a" * 40, "b" * 40, "c" * 40]
    text = fallback_alt_text(long_labels, max_chars=125)
    assert text is not None and len(text) <= 125
    assert text == f"Image may contain: {'a' * 40} and {'b' * 40}."


def test_make_alt_text_chooses_caption_or_fallback() -> None:
    labels = ["dog", "ball"]
    assert make_alt_text("a dog with a ball", 0.9, labels, min_confidence=0.5) == AltText(
        "A dog with a ball.", "caption"
    )
    # Unsure caption: labels instead.
    assert make_alt_text("a dog with a ball", 0.2, labels, min_confidence=0.5) == AltText(
        "Image may contain: dog and ball.", "fallback"
    )
    # No caption (captioner down): labels.
    assert make_alt_text(None, None, labels, min_confidence=0.5) == AltText(
        "Image may contain: dog and ball.", "fallback"
    )
    # Unsure caption and no labels: the caption is better than nothing.
    assert make_alt_text("a dog", 0.1, [], min_confidence=0.5) == AltText("A dog.", "caption")
    assert make_alt_text(None, None, [], min_confidence=0.5) is None
    # Exactly at the threshold counts as sure.
    assert make_alt_text("a dog", 0.5, labels, min_confidence=0.5) == AltText("A dog.", "caption")


def test_a_caption_outside_the_captioners_domain_is_never_used_and_out_of_domain_objects_are_not_named() -> (
    None
):
    labels = ["cat"]
    out = {"min_confidence": 0.5, "caption_in_domain": False}
    assert make_alt_text("an orange square", 0.95, labels, **out) == AltText(
        "Image may contain: cat.", "fallback"
    )
    assert make_alt_text("an orange square", 0.95, [], **out) is None  # not even as a last resort
    for in_domain in (True, None):  # None: a model without a domain description counts as inside
        got = make_alt_text("a dog", 0.9, labels, min_confidence=0.5, caption_in_domain=in_domain)
        assert got == AltText("A dog.", "caption")
    assert alt_text_labels(["cat"], ["square"], objects_in_domain=False) == ["cat"]
    assert alt_text_labels(["cat"], ["square"], objects_in_domain=True) == ["cat", "square"]
    assert alt_text_labels(["cat"], ["square"]) == ["cat", "square"]
    # A captioner that finds the image outside its domain vetoes the objects too, whatever the detector says.
    for objects_in_domain in (True, None):
        got = alt_text_labels(
            ["cat"], ["square"], caption_in_domain=False, objects_in_domain=objects_in_domain
        )
        assert got == ["cat"]
    assert alt_text_labels(["cat"], ["square"], objects_in_domain=True, caption_in_domain=True) == [
        "cat",
        "square",
    ]


def test_caption_note_says_why_a_caption_is_not_the_alt_text() -> None:
    assert caption_note(0.9, True, min_confidence=0.5) is None
    assert caption_note(0.9, None, min_confidence=0.5) is None
    note = caption_note(0.9, False, min_confidence=0.5)
    assert note is not None and "outside the captioner's training domain" in note
    note = caption_note(0.2, True, min_confidence=0.5, used=False)
    assert note == "not used for alt text: confidence 0.20 is under the alt-text threshold 0.50"
    note = caption_note(0.2, None, min_confidence=0.5, used=True)
    assert note is not None and note.startswith("used for alt text although")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a man riding a bike", "a person riding a bike"),
        ("two women on a bench", "two people on a bench"),
        ("Men playing football", "People playing football"),
        ("a boy and a girl", "a child and a child"),
        ("boys and girls at school", "children and children at school"),
        ("a woman's hat", "a person's hat"),
        ("A MAN", "A PERSON"),
        ("a businessman with a phone", "a businessperson with a phone"),
        ("a policeman and a fireman", "a police officer and a firefighter"),
        ("a mother and her son", "a parent and her child"),  # pronouns left alone on purpose
        # Whole words only: these contain gendered words but are not them.
        ("a human at a manhole", "a human at a manhole"),
        ("a German shepherd", "a German shepherd"),
        ("a woman-owned shop", "a person-owned shop"),
        ("manly mandolin", "manly mandolin"),
        ("", ""),
    ],
)
def test_gender_neutral(text: str, expected: str) -> None:
    assert gender_neutral(text) == expected


def test_gender_neutral_is_idempotent() -> None:
    once = gender_neutral("a man and two women with a girl")
    assert once == "a person and two people with a child"
    assert gender_neutral(once) == once
