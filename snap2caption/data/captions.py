"""Caption normalisation: one policy, applied the same way to every source format.

COCO, Karpathy and Flickr30K write captions differently (Flickr30K tokenises punctuation as
``"in the yard ."``, COCO leaves trailing spaces, some captions carry control characters or
full-width forms). Training targets must not depend on which file a caption came from, so every
caption goes through :func:`normalise_caption` before it reaches a manifest.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

# Whitespace controls become spaces (they separate words); every other control, format, surrogate,
# private-use or unassigned code point is dropped.
_WHITESPACE_CONTROLS = str.maketrans({"\t": " ", "\n": " ", "\r": " ", "\v": " ", "\f": " "})
_SPACE_RUN = re.compile(r"\s+")
# " ." -> ".", " ," -> ",": Flickr30K and tokenised sources put a space before punctuation.
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([.,!?;:])")
_TRAILING_PERIODS = re.compile(r"[\s.]+$")
_LETTER_OR_DIGIT = re.compile(r"[^\W_]")


@dataclass(frozen=True)
class CaptionPolicy:
    """How captions are cleaned before training.

    Attributes:
        lowercase: Lowercase the caption (the caption vocabulary then has no case variants).
        min_words: Captions with fewer words are dropped.
        max_words: Captions with more words are dropped (they are rare and dominate padding).
        strip_trailing_period: Remove a final ``.``; sources disagree on it, and a model trained on a
            mix learns to emit it at random.
    """

    lowercase: bool = True
    min_words: int = 1
    max_words: int = 60
    strip_trailing_period: bool = True

    def __post_init__(self) -> None:
        if self.min_words < 1:
            raise ValueError(f"min_words must be >= 1, got {self.min_words}")
        if self.max_words < self.min_words:
            raise ValueError(f"max_words ({self.max_words}) must be >= min_words ({self.min_words})")


def _drop_controls(text: str) -> str:
    # isprintable() is False for every category-C code point, so most captions skip the per-character pass.
    if text.isprintable():
        return text
    return "".join(ch for ch in text if not unicodedata.category(ch).startswith("C"))


def normalise_caption(text: str, policy: CaptionPolicy | None = None) -> str | None:
    """Clean one caption.

    Steps: Unicode NFKC, whitespace controls to spaces, other control characters removed,
    whitespace collapsed and stripped, no space before ``. , ! ? ; :``, optional trailing-period
    removal and lowercasing.

    Args:
        text: The raw caption as the source file holds it.
        policy: The rules to apply; the defaults of :class:`CaptionPolicy` when omitted.

    Returns:
        The cleaned caption, or ``None`` when it is empty or its word count falls outside
        ``[policy.min_words, policy.max_words]``.
    """
    policy = policy or CaptionPolicy()
    text = unicodedata.normalize("NFKC", text).translate(_WHITESPACE_CONTROLS)
    text = _drop_controls(text)
    text = _SPACE_RUN.sub(" ", text).strip()
    text = _SPACE_BEFORE_PUNCT.sub(r"\1", text)
    if policy.strip_trailing_period:
        text = _TRAILING_PERIODS.sub("", text)
    if policy.lowercase:
        text = text.lower()
    # A word is a space-separated token with a letter or digit in it: a lone "-" or "..." is not one.
    n_words = sum(1 for token in text.split() if _LETTER_OR_DIGIT.search(token))
    if n_words == 0 or not policy.min_words <= n_words <= policy.max_words:
        return None
    return text
