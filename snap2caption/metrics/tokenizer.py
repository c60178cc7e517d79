"""A small caption tokenizer for the pure-Python metrics, written independently for this project.

coco-caption (pycocoevalcap) tokenizes captions with the Stanford PTB tokenizer jar, lower-cased,
then drops the tokens in its punctuation list (:data:`PUNCTUATIONS`). :func:`tokenize_caption`
gives the same tokens for ordinary English captions without Java. It was written from scratch from
that pipeline's observable output on caption-like sentences (the jar used only as a black box), not
from the jar's grammar or source. What it does, in order:

1. Curly quotes, apostrophes, dashes and the ellipsis character become their ASCII forms
   (``’`` -> ``'``, ``—`` -> ``--``, ``…`` -> ``...``), and the caption is lower-cased.
2. The text is cut into words, numbers and punctuation. A word is a run of letters/digits that may
   hold a single ``-``, ``.``, ``'``, ``/`` or ``@`` between two letters/digits (``double-decker``,
   ``u.s``, ``o'clock``, ``dog/cat``). A number may hold ``,``, ``.``, ``:`` or ``/`` between digits
   (``1,000``, ``3.5``, ``5:30``, ``1/2``). Everything else is punctuation, split off on its own;
   runs of ``!``/``?`` stay one token (``!!``, ``?!``), three or more dots become ``...``, two or
   more hyphens ``--``.
3. A word keeps a final ``.`` when it is an abbreviation: it has an inner period (``u.s.``,
   ``p.m.``, ``e.g.``), is a single letter (``j.``) or is one of a few common ones (``mr.``,
   ``dr.``, ``st.``, ``etc.``, ...). Otherwise the period is split off.
4. English clitics are split the usual way: ``n't`` (``isn't`` -> ``is n't``, ``can't`` ->
   ``ca n't``), ``'s``, ``'re``, ``'ll``, ``'ve``, ``'m``, ``'d``; and ``cannot`` -> ``can not``.
5. Brackets become the PTB escapes, lower-cased (``(`` -> ``-lrb-``, ``]`` -> ``-rsb-``), and a
   double quote becomes ``''``.
6. Tokens in :data:`PUNCTUATIONS` are dropped and the rest joined by single spaces.

Two coco-caption quirks are kept on purpose, because the reference numbers include them: the
removal list names the bracket escapes in upper case while the jar emits them lower-cased, so
``-lrb-``/``-rrb-`` survive; and only a lone ``!`` or ``?`` is removed, so ``!!`` survives.

Known differences from the PTB tokenizer (all rare in captions): hashtags, handles, URLs and
``<tags>`` are split at their symbols (the jar keeps ``#tag``, ``@user``, ``http://x.com``,
``<y>`` whole); ``&`` is always split off (the jar keeps ``AT&T``); only the listed abbreviations
keep their period (the jar also keeps e.g. ``no.`` before a number); ``gonna``/``wanna``/``gotta``
and ``'tis`` are not split, ``'n'`` and ``y'all`` not specially handled; a leading apostrophe is
split off (``'90s`` -> ``90s``); fraction characters such as ``½``, other Unicode symbols,
decomposed accents and signed numbers (``-5``) are not normalised the way the jar does.
"""

from __future__ import annotations

import re

# coco-caption's removal list (pycocoevalcap/tokenizer/ptbtokenizer.py), applied after tokenizing.
PUNCTUATIONS: frozenset[str] = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)

_ASCII = str.maketrans(
    {
        "\u2018": "`",  # left single quote
        "\u2019": "'",  # right single quote / apostrophe
        "\u201c": '"',
        "\u201d": '"',
        "\u2013": "--",  # en dash
        "\u2014": "--",  # em dash
        "\u2026": "...",
    }
)

_ESCAPES = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-", '"': "''"}

# Abbreviations that keep their final period even without an inner one (lower case, no period).
_ABBREVIATIONS = frozenset(
    ["mr", "mrs", "ms", "dr", "prof", "st", "jr", "sr", "vs", "etc", "inc", "co", "mt", "ave"]
)

_CLITIC = re.compile(r"(.+?)(n't|'s|'re|'ll|'ve|'m|'d)$")

_TOKEN = re.compile(
    r"""
      (?P<number>\d+(?:[.,:/]\d+)+)            # 1,000  3.5  5:30  1/2
    | (?P<word>[^\W_]+(?:[-.'/@][^\W_]+)*)     # dog  double-decker  u.s  dog's  dog/cat
      (?P<period>\.(?!\.))?                    # a final period, kept only for abbreviations
    | (?P<clitic>'(?:s|re|ll|ve|m|d)(?![^\W_]))  # a clitic written apart: "here 's"
    | (?P<dots>\.{3,})
    | (?P<dashes>-{2,})
    | (?P<marks>[!?]+)
    | (?P<other>\S)                            # any other single character
    """,
    re.VERBOSE,
)


def tokenize_caption(caption: str) -> str:
    """Tokenize one caption the way coco-caption's PTB pipeline does, without Java.

    See the module docstring for the rules and where they may differ from the PTB tokenizer.

    Args:
        caption: Raw caption text. Line breaks count as spaces.

    Returns:
        Lower-cased tokens joined by single spaces, coco-caption punctuation removed; ``""`` when
        nothing but punctuation was left.
    """
    tokens: list[str] = []
    for match in _TOKEN.finditer(caption.translate(_ASCII).lower()):
        word, period = match["word"], match["period"]
        if word is None:
            text = match.group()
            tokens.append("..." if match["dots"] else "--" if match["dashes"] else _ESCAPES.get(text, text))
        elif period and _is_abbreviation(word):
            tokens.append(word + period)
        else:
            tokens.extend(_split_clitics(word))
            if period:
                tokens.append(period)
    return " ".join(token for token in tokens if token not in PUNCTUATIONS)


def _is_abbreviation(word: str) -> bool:
    """Whether ``word`` (lower case, final period stripped) keeps its period: ``u.s``, ``j``, ``mr``."""
    return "." in word or (len(word) == 1 and word.isalpha()) or word in _ABBREVIATIONS


def _split_clitics(word: str) -> list[str]:
    """Split clitics off a word: ``dog's`` -> ``dog 's``, ``isn't`` -> ``is n't``, ``i'd've`` -> ``i 'd 've``.

    ``cannot`` is split too (``can not``), as in the Penn Treebank.
    """
    if word == "cannot":
        return ["can", "not"]
    tail: list[str] = []
    while (match := _CLITIC.match(word)) is not None:
        word = match[1]
        tail.insert(0, match[2])
    return [word, *tail]
