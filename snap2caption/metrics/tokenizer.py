"""Pure-Python stand-in for the coco-caption tokenizer (Stanford PTBTokenizer 3.4.1 + punctuation removal).

pycocoevalcap tokenizes every caption with ``java edu.stanford.nlp.process.PTBTokenizer -preserveLines
-lowerCase`` (CoreNLP 3.4.1) and then drops the tokens in :data:`PUNCTUATIONS`. The scores only see
what survives, so this module reproduces the lexer rules that decide surviving tokens: word/number
boundaries, clitics (``dog's`` -> ``dog 's``, ``don't`` -> ``do n't``, ``cannot`` -> ``can not``,
``gonna`` -> ``gon na``), which abbreviations keep their period, hyphenated and slashed compounds,
fractions, URLs, e-mail addresses, hashtags, currency, and the bracket escapes (``(`` -> ``-lrb-``,
which survives because the removal list holds the upper-case ``-LRB-`` while ``-lowerCase`` emits
lower case).

It is a JFlex-style scanner: at each position every rule is tried, the longest match wins (a rule's
trailing context counts towards its length but is not consumed) and ties go to the earlier rule.
Upper/lower case matters exactly where it matters to the Java lexer (``Miss.`` keeps its period,
``miss.`` does not).

Agreement is checked against the real jar on ``tests/fixtures/metrics/ptb_probe.txt``; during
development it also matched the jar on 15,000 generated caption-like lines but 4, each a pair of
tokens glued together without a space (``etc.n't``, ``www.example.com24/7``). Other known gaps, all
outside ordinary caption text: SGML attribute syntax, phone numbers, the rarer Unicode symbol
classes, and the lexer's sentence-final duplicate periods (removed with the punctuation anyway).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass

# coco-caption's removal list, verbatim (pycocoevalcap/tokenizer/ptbtokenizer.py); compared against
# the installed pycocoevalcap in the tests so the two cannot drift apart.
PUNCTUATIONS: frozenset[str] = frozenset(
    ("''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";")
)

# ---------------------------------------------------------------------------------------------
# Character classes. The Java lexer is %caseless for literal text but not inside [...] classes,
# so literal words below are wrapped in (?i:...) while classes stay case-sensitive.
# ---------------------------------------------------------------------------------------------
# Python's \w also admits No/Nl numerics (superscripts, vulgar fractions, Roman numerals) that Java's
# [:letter:] rejects; the lookahead takes them back out.
_NOT_NUMERIC = (
    r"(?![\u00B2\u00B3\u00B9\u00BC-\u00BE\u2070-\u2079\u2080-\u2089\u2150-\u218F\u2460-\u24FF\u2776-\u2793])"
)
_LETTER = rf"(?:{_NOT_NUMERIC}[^\W\d_]|[\u00AD\u0300-\u036F]|&[aeiouAEIOU](?i:acute|grave|uml);)"
_ALNUM = rf"(?:{_NOT_NUMERIC}[^\W_])"
_SPACE = r"[ \t\u00A0\u2000-\u200A\u3000]"
_NEWLINE = r"(?:\r\n|[\n\r\u2028\u2029\u000B\u000C\u0085])"
_SPACENL = rf"(?:{_SPACE}|{_NEWLINE})"
_SGML = r"<\/?[A-Za-z!?][^>\r\n]*>"
_SENTEND = rf"{_SPACENL}(?:{_SPACENL}|[A-Z]|{_SGML})"
_APOS = r"(?:['\u0092\u2019]|&(?i:apos);)"
_APOSETC = rf"(?:{_APOS}|[`\u0091\u2018\u201B])"
_HYPHEN = r"[-_\u058A\u2010\u2011]"
_NUM = r"(?:\d*(?:[.:,\u00AD\u066B\u066C]\d+)+|\d+)"
_NUMBER = rf"[-+]?{_NUM}"
_WORD = rf"{_LETTER}+(?:[.!?]{_LETTER}+)*"
_REDAUX = rf"{_APOS}(?:[msdMSD]|(?i:re|ve|ll))"
_SWORD = r"[A-Za-z\u00AD]*[A-MO-Za-mo-z]\u00AD*"
_SREDAUX = rf"(?i:n){_APOSETC}(?i:t)"
_ACRO = (
    r"(?:[A-Za-z](?:\.[A-Za-z])*|(?i:canada|sino|korean|eu|japan|non)-(?i:u)\.(?i:s)"
    r"|(?i:u\.s\.-(?:u\.k|u\.s\.s\.r)))"
)
_INSENTP = r"[,;:\u3001]"

# Abbreviations that keep their period (CoreNLP 3.4.1, probed against the jar). Bracketed capitals
# are case-sensitive in the lexer: "Miss." keeps its period, "miss." does not.
_ABMONTH = r"(?i:jan|feb|mar|apr|jun|jul|aug|sept?|oct|nov|dec)"
_ABDAYS = r"(?i:mon|tues?|wed|thu(?:rs)?|fri)"
_ABSTATE = (
    r"(?:(?i:ala|ariz|calif|colo|conn|ct|dak|fla|ga|ind|kans?|ky|md|mich|minn|mo|mont|neb|nev|okla|penn"
    r"|tenn|va|vt|wisc?|wyo)|[A](?i:rk|z)|[D](?i:el)|[I](?i:ll)|[L](?i:a)|[M](?i:ass|iss)|[O](?i:re)"
    r"|[P](?i:a)|[T](?i:ex)|[W](?i:ash))"
)
_ABCOMP = r"(?:(?i:inc|cos?|corp|ltd|plc|rt|bancorp|dept|bhd|assn|univ|intl|sys)|(?i:pp?t)[ye]s?)"
_ABCOMP2 = r"(?:(?i:invt|elec|natl)|(?i:m)[ft]g)"
_ABNUM = r"(?i:tel|est|ext|sq|ft|ph)"
_ABPTIT = r"(?i:jr|sr|bros|(?:ed|ph)\.d|blvd|rd|esq)"
_ABTITLE = (
    r"(?:(?i:mr|mrs|ms|drs?|profs?|sens?|reps?|attys?|lt|col|gen|messrs|govs?|adm|rev|maj|sgt|cpl|pvt|mt"
    r"|capt|ste?|ave|pres|lieut|hon|brig|co?mdr|pfc|spc|supts?|det|mme|mlle)|[M](?i:iss))"
)
_ABBREV1 = rf"(?:{_ABMONTH}|{_ABDAYS}|{_ABSTATE}|{_ABCOMP}|{_ABNUM}|{_ABPTIT}|(?i:etc|al|seq|bldg))\."
_ABBREV4 = rf"(?:{_ACRO}|{_ABTITLE}|{_ABCOMP2}|(?i:vs|alex|wm|jos|cie|a\.k\.a|cf|treas)|[A-Za-z])"
_ABBREV3 = r"(?i:ca|figs?|prop|nos?|art|pp|op)\."

_APOWORD = (
    rf"(?:{_APOS}(?i:n){_APOS}?|[lLdDjJ]{_APOS}|(?i:dunkin|somethin|ol){_APOS}|{_APOS}(?i:em)"
    rf"|[A-HJ-XZn]{_APOSETC}{_LETTER}{{2}}{_LETTER}*|{_APOS}[2-9]0(?i:s)|{_APOS}(?i:till?)"
    rf"|{_LETTER}+[aeiouyAEIOUY]{_APOSETC}[aeiouA-Z]{_LETTER}*|{_APOS}(?i:cause)|(?i:cont'd)\.?"
    r"|(?i:nor'easter|c'mon|e'er|s'mores|ev'ry|li'l|nat'l))"
)
_THING = (
    rf"(?:[dDoOlL]{_APOSETC}{_ALNUM})?(?:{_ALNUM}+|{_NUMBER})"
    rf"(?:{_HYPHEN}(?:[dDoOlL]{_APOSETC}{_ALNUM})?(?:{_ALNUM}+|{_NUM}))*"
)
_HTHING = r"[A-Za-z0-9][A-Za-z0-9.,\u00AD]*(?:-(?:[A-Za-z0-9\u00AD]+|" + _ACRO + r"\.))+"
_THINGA = r"[A-Z]+(?:(?:[+&]|&amp;)[A-Z]+)+"
_THING3 = r"[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}(?:\\?\/[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}){1,2}"
_FRAC = r"(?:\d{1,4}[- \u00A0])?\d{1,4}(?:\\?\/|\u2044)\d{1,4}"
_URL_STOP = r" \t\n\f\r\"<>|()"
_FULLURL = rf"https?:\/\/[^{_URL_STOP}]+[^{_URL_STOP}.!?{{}},-]"
_LIKELYURL = (
    r"(?:(?:www\.(?:[^ \t\n\f\r\"<>|.!?(){},]+\.)+[a-zA-Z]{2,4})"
    r"|(?:(?:[^ \t\n\f\r\"`'<>|.!?(){},\-_$]+\.)+(?i:com|net|org|edu)))"
    r"(?:\/[^ \t\n\f\r\"<>|()]+[^ \t\n\f\r\"<>|.!?(){},-])?"
)
_EMAIL = (
    r"[a-zA-Z0-9][^ \t\n\f\r\"<>|()\u00A0]*@(?:[^ \t\n\f\r\"<>|().\u00A0]+\.)*[^ \t\n\f\r\"<>|().\u00A0]+"
)
_MISCSYMBOL = (
    r"[+%&~\^|\\¦\u00A7¨\u00A9\u00AC\u00AE¯\u00B0-\u00B3\u00B4-\u00BA\u00D7\u00F7\u2016\u2017"
    r"\u2020-\u2023\u2030-\u2038\u203B\u203E-\u2042\u2044\u207A-\u207F\u208A-\u208E\u2100-\u214F"
    r"\u2190-\u21FF\u2200-\u2BFF\u3012\u30FB\uFF01-\uFF0F\uFF1A-\uFF20\uFF3B-\uFF40\uFF5B-\uFF65]"
)
# Sentence-final acronyms: an acronym followed by one of these (case-sensitive) words ends a sentence.
_ACRONYM_NEXT = (
    "(?:About|According|Additionally|After|An|A|As|At|But|Earlier|He|Her|Here|However|If|In|It|Last"
    "|Many|More|Now|Once|One|Other|Our|She|Since|So|Some|Such|That|The|Then|There|These|They|This|We"
    "|When|While|What|Yet|You)"
)

_FRACTIONS = {"\u00bc": "1/4", "\u00bd": "1/2", "\u00be": "3/4", "\u2153": "1/3", "\u2154": "2/3"}
_CURRENCY = {"\u00a2": "cents", "\u00a3": "#", "\u0080": "$", "\u00a4": "$", "\u20a0": "$", "\u20ac": "$"}
# latexQuotes: curly, CP1252 and angle quotes become ` `` ' '' (all later removed); U+201A/U+201E stay.
_QUOTE_MAP = str.maketrans(
    {
        **dict.fromkeys("\u0091\u2018\u201b\u2039", "`"),
        **dict.fromkeys("\u0092\u2019\u203a", "'"),
        **dict.fromkeys("\u0093\u201c\u00ab", "``"),
        **dict.fromkeys("\u0094\u201d\u00bb", "''"),
    }
)
# Assimilations that CoreNLP 3.4.1 splits in two ("gonna" -> "gon na").
_ASSIMILATIONS = ("gon", "na"), ("got", "ta"), ("wan", "na"), ("lem", "me"), ("gim", "me"), ("can", "not")


def _quote(text: str, probably_left: bool) -> str:
    """latexQuotes normalisation of a quote-like token."""
    text = re.sub(r"&(?i:apos);|'", "`" if probably_left else "'", text)
    text = re.sub(r"\"|&(?i:quot);", "``" if probably_left else "''", text)
    return text.translate(_QUOTE_MAP)


def _hyphens(text: str) -> str:
    return "--" if 3 <= len(text) <= 4 else text


@dataclass(frozen=True)
class _Rule:
    """One lexer rule. Group ``tok`` is emitted and consumed; whatever the pattern matches after it
    is JFlex trailing context: it must be present and counts towards the match length."""

    pattern: re.Pattern[str]
    emit: Callable[[str], str | None]


def _rule(pattern: str, context: str | None = None, emit: Callable[[str], str | None] = str) -> _Rule:
    trailing = "" if context is None else f"(?:{context})"
    return _Rule(re.compile(f"(?P<tok>{pattern}){trailing}"), emit)


def _drop(_text: str) -> None:
    return None


def _no_soft_hyphen(text: str) -> str:
    return text.replace("\u00ad", "") or "-"


# Order matters only to break ties between equally long matches (earlier rule wins), as in JFlex.
_RULES: tuple[_Rule, ...] = (
    *(_rule(rf"(?i:{head})", rf"(?i:{tail})(?!{_LETTER})") for head, tail in _ASSIMILATIONS),
    _rule(r"(?i:'t)", rf"(?i:is|was)(?!{_LETTER})"),
    _rule(_SGML, None, lambda t: t.replace(" ", "\u00a0")),
    _rule(r"&(?i:md|mdash|ndash);|[\u0096\u0097\u2013\u2014\u2015]", None, lambda _t: "--"),
    _rule(r"&(?i:amp);", None, lambda _t: "&"),
    _rule(r"&(?:HT|TL|UR|LR|QC|QL|QR|odq|cdq|#[0-9]+);"),
    _rule(_WORD, _REDAUX, _no_soft_hyphen),
    _rule(_SWORD, _SREDAUX, _no_soft_hyphen),
    _rule(_WORD, None, _no_soft_hyphen),
    _rule(_APOWORD),
    _rule(rf"(?i:y){_APOS}", _LETTER),
    _rule(_FULLURL),
    _rule(_LIKELYURL),
    _rule(_EMAIL),
    _rule(rf"@[a-zA-Z_][a-zA-Z_0-9]*|#{_WORD}"),
    _rule(_REDAUX, r"[^A-Za-z]", lambda t: _quote(t, False)),
    _rule(_SREDAUX, None, lambda t: _quote(t, False)),
    _rule(r"\d{1,2}[-/]\d{1,2}[-/]\d{2,4}"),
    _rule(_NUMBER, None, _no_soft_hyphen),
    _rule(r"[\u207A\u207B\u208A\u208B]?(?:[\u2070\u00B9\u00B2\u00B3\u2074-\u2079]+|[\u2080-\u2089]+)"),
    _rule(_FRAC, None, lambda t: t.replace(" ", "\u00a0")),
    _rule(r"[\u00BC\u00BD\u00BE\u2153-\u215E]", None, lambda t: _FRACTIONS.get(t, t)),
    _rule(r"-(?:RRB|LRB|RCB|LCB|RSB|LSB)-|C\.D\.s|(?i:pro|anti)-|S(?:&|&amp;)P-500|S(?:&|&amp;)Ls"),
    _rule(rf"(?i:cap){_APOS}(?i:n)|(?i:c){_APOS}(?i:est)"),
    _rule(_THING3),
    _rule(r"[A-Z]*\$|#"),
    _rule(
        r"[\u00A2-\u00A5\u0080\u20A0\u20AC\u060B\u0E3F\u20A4\uFFE0\uFFE1\uFFE5\uFFE6]",
        None,
        lambda t: _CURRENCY.get(t, t),
    ),
    # "I." before a sentence-opening word is "I" + "."; longer acronyms keep their period.
    _rule(rf"{_ACRO}\.", rf"{_SPACE}+{_ACRONYM_NEXT}{_SPACE}", lambda t: t[:-1] if len(t) == 2 else t),
    _rule(_ABBREV1, _SENTEND),
    _rule(_ABBREV1),
    _rule(rf"{_ABBREV4}\."),
    _rule(_ABBREV3, rf"{_SPACENL}?\d"),
    _rule(_ABBREV4, _SPACE),
    _rule(_ACRO, _SPACENL),
    _rule(rf"{_APOS}\d\d", _SPACENL),
    _rule(rf"{_WORD}\.", _INSENTP, _no_soft_hyphen),
    _rule(
        r"[<>]?[:;=][-o*']?[()DPdpO\\{@|\[\]]",
        r"[\W_]",
        lambda t: t.replace("(", "-LRB-").replace(")", "-RRB-"),
    ),
    _rule(r"\"|&(?i:quot);", r"[A-Za-z0-9$]", lambda t: _quote(t, True)),
    _rule(r"\"|&(?i:quot);", None, lambda t: _quote(t, False)),
    _rule(r"\x7f", None, _drop),
    _rule(r"[\[]", None, lambda _t: "-LSB-"),
    _rule(r"[\]]", None, lambda _t: "-RSB-"),
    _rule(r"<|&(?i:lt);", None, lambda _t: "<"),
    _rule(r">|&(?i:gt);", None, lambda _t: ">"),
    _rule(r"\{", None, lambda _t: "-LCB-"),
    _rule(r"\}", None, lambda _t: "-RCB-"),
    _rule(r"\(", None, lambda _t: "-LRB-"),
    _rule(r"\)", None, lambda _t: "-RRB-"),
    _rule(r"-+", None, _hyphens),
    _rule(r"\.{3,5}|(?:\.[ \u00A0]){2,4}\.|[\u0085\u2026]", None, lambda _t: "..."),
    _rule(r"@+|#+|_+"),
    _rule(r"\*+|(?:\\\*){1,3}"),
    _rule(_INSENTP),
    _rule(r"[?!]+"),
    _rule(r"[.¡¿\u037E\u0589\u061F\u06D4\u0700-\u0702\u07FA\u3002]"),
    _rule(r"="),
    _rule(r"/"),
    _rule(rf"{_HTHING}\.", _INSENTP, _no_soft_hyphen),
    _rule(_HTHING, None, _no_soft_hyphen),
    _rule(rf"{_THING}\.", _INSENTP),
    _rule(_THING),
    _rule(rf"{_THINGA}\.", _INSENTP, lambda t: t.replace("&amp;", "&")),
    _rule(_THINGA, None, lambda t: t.replace("&amp;", "&")),
    _rule(r"'", r"[A-Za-z][^ \t\n\r\u00A0]", lambda t: _quote(t, True)),
    _rule(_REDAUX, None, lambda t: _quote(t, False)),
    _rule(
        rf"{_APOS}|''|[`\u2018\u2019\u201A\u201B\u201C\u201D\u0091\u0092\u0093\u0094\u201E\u201F"
        r"\u2039\u203A\u00AB\u00BB]{1,2}",
        None,
        lambda t: _quote(t, False),
    ),
    _rule(r"<<|>>"),
    _rule(_MISCSYMBOL),
    _rule(rf"\x00|{_SPACE}+|[\u200B\u200E\u200F\uFEFF]|{_NEWLINE}|&(?i:nbsp);", None, _drop),
    # Anything else is "untokenizable": the Java lexer deletes it (and logs a warning).
    _rule(r".", None, _drop),
)

# Fast path for the bulk of caption text: a run of ASCII letters, optionally followed by one
# sentence-punctuation mark, then whitespace. No rule can match longer there, except the
# assimilations and the abbreviations that keep their period, which go the slow way.
_FAST = re.compile(r"(?P<space>[ \t\n]+)|(?P<word>[A-Za-z]+)(?P<mark>[.,;:!?])?(?=[ \t\n])")
_SPLIT_WORDS = frozenset(head + tail for head, tail in _ASSIMILATIONS)
_KEEPS_PERIOD = re.compile(rf"{_ABBREV1}|{_ABBREV4}\.|{_ABBREV3}")


def _lex(text: str) -> list[str]:
    """Split ``text`` into PTB tokens (case preserved, punctuation still present)."""
    tokens: list[str] = []
    pos, end = 0, len(text)
    while pos < end:
        fast = _FAST.match(text, pos)
        if fast is not None:
            word = fast.group("word")
            if word is None:
                pos = fast.end()
                continue
            if word.lower() not in _SPLIT_WORDS and not (
                fast.group("mark") == "." and _KEEPS_PERIOD.fullmatch(word + ".")
            ):
                tokens.append(word)
                if fast.group("mark"):
                    tokens.append(fast.group("mark"))
                pos = fast.end()
                continue
        best_rule, best_len, best_end = None, 0, pos
        for rule in _RULES:
            match = rule.pattern.match(text, pos)
            if match is not None and match.end("tok") > pos and match.end() - pos > best_len:
                best_rule, best_len, best_end = rule, match.end() - pos, match.end("tok")
        assert best_rule is not None  # the last two rules match any character
        token = best_rule.emit(text[pos:best_end])
        if token:
            tokens.append(token)
        pos = best_end
    return tokens


# Reference captions come back every evaluation epoch; caching makes re-tokenizing them free.
@functools.lru_cache(maxsize=1 << 16)
def tokenize_caption(caption: str) -> str:
    """Tokenize one caption exactly as pycocoevalcap's ``PTBTokenizer`` does, without Java.

    Args:
        caption: Raw caption text. Line breaks count as spaces (pycocoevalcap joins a caption's
            lines before tokenizing).

    Returns:
        Lower-cased tokens joined by single spaces, coco-caption punctuation removed; ``""`` when
        nothing survives.
    """
    # The jar reads captions as lines of a file, so every caption is followed by a newline; some rules
    # (a clitic before a non-letter, a smiley before a non-alphanumeric) look at that next character.
    tokens = (token.lower() for token in _lex(caption + "\n"))
    return " ".join(token for token in tokens if token not in PUNCTUATIONS)
