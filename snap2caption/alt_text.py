"""Alt text from a caption, or from labels when the caption is unsure, and gender-neutral wording.

Pure functions (no I/O, no model), following common accessibility practice for alt text:

- no "image of" / "picture of" / "photo of" opening (screen readers already announce an image);
- sentence case, ending with a full stop;
- short: at most ~125 characters, cut at a word boundary;
- when the caption is unsure (confidence under a threshold) or missing, say what is likely there
  instead: ``"Image may contain: dog, frisbee and grass."`` from the top tags and detected objects;
- a caption of an image outside the captioner's training domain is never used (a confident wrong
  description is worse than none), and objects only when no model places the image outside its domain
  (neither the detector nor the captioner): :func:`alt_text_labels` and :func:`make_alt_text`'s
  ``caption_in_domain``. ``None`` ("the model has no domain description", older artifacts) counts as
  inside.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

DEFAULT_MAX_CHARS = 125
# The caption's confidence is a calibrated probability that it is right (the captioner's calibration.json):
# 0.5 uses a caption as alt text only when it is more likely right than wrong. The gateway's and the
# backfill's default.
DEFAULT_MIN_CONFIDENCE = 0.5
FALLBACK_PREFIX = "Image may contain: "
MAX_FALLBACK_LABELS = 5

# Openings that only say "this is an image"; removed repeatedly ("a photo of an image of ...").
_REDUNDANT_OPENING = re.compile(
    r"^\s*(?:(?:this|here)\s+is\s+)?(?:(?:a|an|the)\s+)?(?:close[- ]?up\s+)?"
    r"(?:image|picture|photo|photograph|pic|snapshot|shot|screenshot|illustration)\s+"
    r"(?:of|showing|shows|with|that\s+shows)\s+",
    re.IGNORECASE,
)
_SPACES = re.compile(r"\s+")
_TRAILING_PUNCT = re.compile(r"[\s,;:\-–—.]+$")


@dataclass(frozen=True)
class AltText:
    """Alt text and where it came from.

    Attributes:
        text: The alt text.
        source: ``caption`` (the cleaned caption) or ``fallback`` (built from labels).
    """

    text: str
    source: Literal["caption", "fallback"]


def strip_redundant_opening(text: str) -> str:
    """Remove "image of" / "a picture of" / "this is a photo of" openings (repeatedly).

    Args:
        text: A caption.

    Returns:
        The caption without the opening; unchanged when it has none, or when nothing would remain.
    """
    current = text
    while True:
        stripped = _REDUNDANT_OPENING.sub("", current, count=1)
        if stripped == current or not stripped.strip():
            return current
        current = stripped


def sentence_case(text: str) -> str:
    """Upper-case the first letter and leave the rest alone (names and acronyms keep their case)."""
    for i, ch in enumerate(text):
        if ch.isalpha():
            return text[:i] + ch.upper() + text[i + 1 :]
    return text


def truncate_words(text: str, max_chars: int) -> str:
    """Cut ``text`` to at most ``max_chars`` characters at a word boundary, no trailing punctuation.

    A single word longer than ``max_chars`` is cut hard (there is no boundary to use).
    """
    if len(text) <= max_chars:
        return text
    cut = text[: max_chars + 1]
    space = cut.rfind(" ")
    cut = cut[:space] if space > 0 else text[:max_chars]
    return _TRAILING_PUNCT.sub("", cut)


def finish_sentence(text: str, max_chars: int = DEFAULT_MAX_CHARS) -> str:
    """Sentence case, at most ``max_chars`` characters including a final full stop.

    A text already ending in ``.``, ``!`` or ``?`` keeps its ending when it fits.
    """
    text = sentence_case(_SPACES.sub(" ", text).strip())
    if not text:
        return ""
    if len(text) <= max_chars and text[-1] in ".!?":
        return text
    body = truncate_words(_TRAILING_PUNCT.sub("", text), max_chars - 1)
    return f"{body}." if body else ""


def caption_alt_text(caption: str, max_chars: int = DEFAULT_MAX_CHARS) -> str:
    """Alt text from a caption: opening removed, sentence case, full stop, at most ``max_chars``."""
    return finish_sentence(strip_redundant_opening(_SPACES.sub(" ", caption).strip()), max_chars)


def dedupe_labels(labels: Iterable[str]) -> list[str]:
    """Labels in first-seen order without repeats (case-insensitive, blanks dropped)."""
    seen: set[str] = set()
    out: list[str] = []
    for label in labels:
        clean = _SPACES.sub(" ", label).strip()
        key = clean.casefold()
        if clean and key not in seen:
            seen.add(key)
            out.append(clean)
    return out


def join_words(items: Sequence[str]) -> str:
    """``["a"]`` -> ``"a"``; ``["a", "b", "c"]`` -> ``"a, b and c"``."""
    if len(items) <= 1:
        return "".join(items)
    return f"{', '.join(items[:-1])} and {items[-1]}"


def fallback_alt_text(
    labels: Iterable[str], max_labels: int = MAX_FALLBACK_LABELS, max_chars: int = DEFAULT_MAX_CHARS
) -> str | None:
    """``"Image may contain: a, b and c."`` from labels (best first), or ``None`` without any.

    Labels are deduplicated; as many as fit in ``max_chars`` (up to ``max_labels``) are kept, so the
    list is never cut mid-word.
    """
    unique = dedupe_labels(labels)[:max_labels]
    while unique:
        text = f"{FALLBACK_PREFIX}{join_words(unique)}."
        if len(text) <= max_chars:
            return text
        unique = unique[:-1]
    return None


def alt_text_labels(
    tags: Sequence[str],
    objects: Sequence[str],
    *,
    objects_in_domain: bool | None = None,
    caption_in_domain: bool | None = None,
) -> list[str]:
    """The labels a fallback may name, best first: the tags, then the object labels unless a model places
    the image outside its training domain, the detector (``objects_in_domain`` False) or the captioner
    (``caption_in_domain`` False).

    An object class in alt text is a claim about what the image shows, and each model's domain check
    misses images another one catches: the starter detector's (fitted on features of its 160-pixel input)
    passes 4 of scikit-image's 25 photos, all grey ones, that the captioner's rejects, and named a crater
    of the moon a "square". Naming a class only when no check objects errs towards saying less (the tags
    of the tagger, a model of real photos, still describe the image), never towards a shape on a photo.
    """
    trusted = objects_in_domain is not False and caption_in_domain is not False
    return [*tags, *(objects if trusted else [])]


def caption_note(
    confidence: float | None, in_domain: bool | None, *, min_confidence: float, used: bool | None = None
) -> str | None:
    """Why a caption is not (or would not be) the alt text, in a few words; ``None`` when it is trusted.

    Args:
        confidence: The caption's confidence in [0, 1].
        in_domain: Whether the image is inside the captioner's training domain (None: unknown, trusted).
        min_confidence: The alt-text threshold on the confidence.
        used: Whether it became the alt text after all (an unsure caption with no label to fall back on).
    """
    if in_domain is False:
        return "not used for alt text: the image is outside the captioner's training domain"
    if confidence is None or confidence >= min_confidence:
        return None
    reason = f"confidence {confidence:.2f} is under the alt-text threshold {min_confidence:.2f}"
    if used:
        return f"used for alt text although {reason}: there was no tag or object to fall back on"
    return f"not used for alt text: {reason}"


def make_alt_text(
    caption: str | None,
    confidence: float | None,
    labels: Sequence[str],
    *,
    min_confidence: float,
    max_chars: int = DEFAULT_MAX_CHARS,
    caption_in_domain: bool | None = None,
) -> AltText | None:
    """Choose the alt text of an image.

    Args:
        caption: The caption, or ``None`` when the captioner failed.
        confidence: The caption's confidence in [0, 1] (``None`` with no caption).
        labels: Tag names and object labels, best first (duplicates allowed); see :func:`alt_text_labels`.
        min_confidence: Captions below this are not trusted; labels are used instead.
        max_chars: Longest alt text.
        caption_in_domain: Whether the image is inside the captioner's training domain; ``False`` means
            the caption is never used, not even as a last resort (``None``: unknown, counts as inside).

    Returns:
        The caption's alt text when it is in domain and confident enough; else the labels' fallback;
        else the unsure in-domain caption (better than nothing); ``None`` when there is none of these.
    """
    from_caption = caption_alt_text(caption, max_chars) if caption and caption_in_domain is not False else ""
    trusted = bool(from_caption) and confidence is not None and confidence >= min_confidence
    if trusted:
        return AltText(from_caption, "caption")
    fallback = fallback_alt_text(labels, max_chars=max_chars)
    if fallback is not None:
        return AltText(fallback, "fallback")
    if from_caption:
        return AltText(from_caption, "caption")
    return None


# --- gender-neutral wording ---------------------------------------------------------------------------

# Gendered noun -> neutral noun; plurals listed explicitly (English plurals of these are irregular).
_NEUTRAL_NOUNS: dict[str, str] = {
    "man": "person",
    "men": "people",
    "woman": "person",
    "women": "people",
    "boy": "child",
    "boys": "children",
    "girl": "child",
    "girls": "children",
    "gentleman": "person",
    "gentlemen": "people",
    "lady": "person",
    "ladies": "people",
    "guy": "person",
    "guys": "people",
    "gal": "person",
    "gals": "people",
    "male": "person",
    "males": "people",
    "female": "person",
    "females": "people",
    "mother": "parent",
    "mothers": "parents",
    "father": "parent",
    "fathers": "parents",
    "mom": "parent",
    "moms": "parents",
    "dad": "parent",
    "dads": "parents",
    "son": "child",
    "sons": "children",
    "daughter": "child",
    "daughters": "children",
    "brother": "sibling",
    "brothers": "siblings",
    "sister": "sibling",
    "sisters": "siblings",
    "husband": "spouse",
    "husbands": "spouses",
    "wife": "spouse",
    "wives": "spouses",
    "grandmother": "grandparent",
    "grandmothers": "grandparents",
    "grandfather": "grandparent",
    "grandfathers": "grandparents",
    "businessman": "businessperson",
    "businessmen": "businesspeople",
    "businesswoman": "businessperson",
    "businesswomen": "businesspeople",
    "policeman": "police officer",
    "policemen": "police officers",
    "policewoman": "police officer",
    "policewomen": "police officers",
    "fireman": "firefighter",
    "firemen": "firefighters",
    "chairman": "chairperson",
    "chairmen": "chairpersons",
    "waiter": "server",
    "waiters": "servers",
    "waitress": "server",
    "waitresses": "servers",
    "actress": "actor",
    "actresses": "actors",
    "sportsman": "athlete",
    "sportsmen": "athletes",
    "sportswoman": "athlete",
    "sportswomen": "athletes",
    "schoolboy": "student",
    "schoolboys": "students",
    "schoolgirl": "student",
    "schoolgirls": "students",
}
# Whole words only, so "manhole", "human", "German", "woman's" (-> "person's") behave.
_GENDERED = re.compile(
    r"\b(" + "|".join(sorted(_NEUTRAL_NOUNS, key=len, reverse=True)) + r")\b", re.IGNORECASE
)


def _match_case(original: str, replacement: str) -> str:
    if original.isupper() and len(original) > 1:
        return replacement.upper()
    if original[0].isupper():
        return replacement[0].upper() + replacement[1:]
    return replacement


def gender_neutral(text: str) -> str:
    """Replace gendered nouns with neutral ones: man/woman -> person, men/women -> people,
    boy/girl -> child, boys/girls -> children, and similar, keeping the case of the first letter
    (``Women`` -> ``People``, ``MAN`` -> ``PERSON``), plurals plural and possessives intact.

    Only whole words change (``human``, ``manhole``, ``German`` stay). Pronouns are left alone: turning
    ``she is`` into ``they is`` would be worse than the original.
    """
    return _GENDERED.sub(lambda m: _match_case(m.group(0), _NEUTRAL_NOUNS[m.group(0).lower()]), text)
