"""snap2caption.metrics: agreement with pycocoevalcap, hand-checked values, METEOR process handling.

Fixtures (tests/fixtures/metrics/):
* captions.json: 8 images x 5 COCO-style references; predictions that are an exact copy of a
  reference, a partial match, empty, a case/punctuation variant, punctuation only (empty after
  tokenization), disjoint, repeated words (count clipping) and clitics/brackets. It also records
  the METEOR values pycocoevalcap 1.2's own ``Meteor`` class gave on it.
* ptb_probe.txt: caption-like lines (COCO-style, with punctuation, quotes, brackets, clitics,
  abbreviations and numbers, plus synthetic-shape captions) on which the pure-Python tokenizer
  must give exactly the PTBTokenizer jar's tokens. Known differences on odder input are listed in
  the tokenizer's module docstring and are not probed here.

Tolerances: BLEU is bit-identical (same integer statistics, same float operations in the same
order). ROUGE-L and CIDEr-D per-image sums run in pycocoevalcap's order too; the corpus means use
a plain sum where pycocoevalcap uses ``np.mean`` (pairwise summation), and CIDEr-D's ``math.log``
may differ from ``np.log``'s SIMD path in the last bit, so those compare at 1e-12.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from snap2caption.metrics import (
    METRICS,
    PYTHON_METRICS,
    CaptionScores,
    JavaUnavailable,
    MeteorError,
    MeteorScorer,
    evaluate_captions,
    tokenize_caption,
)
from snap2caption.metrics import caption as caption_module
from snap2caption.metrics.bleu import corpus_bleu
from snap2caption.metrics.cider import cider_d
from snap2caption.metrics.jvm import java_available, ptb_tokenize, pycocoevalcap_installed
from snap2caption.metrics.rouge import rouge_l
from snap2caption.metrics.tokenizer import PUNCTUATIONS

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "metrics"
TOL = 1e-12

needs_pycocoevalcap = pytest.mark.skipif(
    not pycocoevalcap_installed(), reason="pycocoevalcap not installed (pip install 'snap2caption[train]')"
)
needs_java = pytest.mark.skipif(
    not (pycocoevalcap_installed() and java_available()),
    reason="no working `java` on PATH (or no pycocoevalcap): its PTB tokenizer and METEOR run on the JVM",
)


DATA: dict[str, Any] = json.loads((FIXTURES / "captions.json").read_text(encoding="utf-8"))
REFS: dict[str, list[str]] = DATA["references"]
PREDS: dict[str, str] = DATA["predictions"]
PROBE = (FIXTURES / "ptb_probe.txt").read_text(encoding="utf-8").rstrip("\n").split("\n")


def _tokenized(
    refs: dict[str, list[str]], preds: dict[str, str]
) -> tuple[dict[str, list[str]], dict[str, str]]:
    return (
        {k: [tokenize_caption(r) for r in v] for k, v in refs.items()},
        {k: tokenize_caption(v) for k, v in preds.items()},
    )


def _probe_corpus() -> tuple[dict[str, list[str]], dict[str, str]]:
    """A second, odder corpus without Java: consecutive probe lines as 5 references + 1 prediction."""
    refs, preds = {}, {}
    for start in range(0, len(PROBE) - 5, 6):
        refs[f"probe{start}"] = PROBE[start : start + 5]
        preds[f"probe{start}"] = PROBE[start + 5]
    return refs, preds


# ------------------------------------------------------------------------------------------------
# Pure Python: no Java needed.
# ------------------------------------------------------------------------------------------------


@needs_pycocoevalcap
def test_punctuation_list_is_coco_captions() -> None:
    from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS as COCO_PUNCTUATIONS

    assert frozenset(COCO_PUNCTUATIONS) == PUNCTUATIONS


@needs_pycocoevalcap
@pytest.mark.parametrize("corpus", ["fixture", "probe"])
def test_python_scorers_equal_pycocoevalcap_scorers(corpus: str) -> None:
    """Same tokens in, same numbers out: isolates the scorers from the tokenizer."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    refs, preds = _tokenized(*((REFS, PREDS) if corpus == "fixture" else _probe_corpus()))
    gts, res = refs, {k: [v] for k, v in preds.items()}

    coco_bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    assert corpus_bleu(refs, preds) == coco_bleu

    coco_rouge, coco_rouge_each = Rouge().compute_score(gts, res)
    rouge, rouge_each = rouge_l(refs, preds)
    assert rouge == pytest.approx(coco_rouge, abs=TOL)
    assert list(rouge_each.values()) == list(coco_rouge_each)

    coco_cider, coco_cider_each = Cider().compute_score(gts, res)
    cider, cider_each = cider_d(refs, preds)
    assert cider == pytest.approx(coco_cider, abs=TOL)
    assert list(cider_each.values()) == pytest.approx(list(coco_cider_each), abs=TOL)


def test_identical_prediction_scores_full_marks() -> None:
    caption = "a man riding a horse on the beach at sunset"
    refs = {"a": [caption, "a horse"], "b": ["a plate of food", "two dogs playing in the snow"]}
    scores = evaluate_captions(refs, {"a": caption, "b": "two dogs playing in the snow"}, scorer="python")
    # 1 - ~1e-9, not exactly 1: coco-caption's smoothing constants (see bleu.py).
    for name in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L"):
        assert scores[name] == pytest.approx(1.0, abs=1e-6), name


def test_disjoint_prediction_scores_zero() -> None:
    refs = {"a": ["a red bus on a street"], "b": ["a cat on a sofa"]}
    scores = evaluate_captions(
        refs, {"a": "green mountains under snow", "b": "two dogs playing"}, scorer="python"
    )
    for name in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4"):
        assert 0 <= scores[name] < 1e-9, name
    assert scores["ROUGE-L"] == 0.0
    assert scores["CIDEr-D"] == 0.0


def test_bleu_uses_closest_reference_length() -> None:
    # One 6-word reference for a 2-word prediction: brevity penalty exp(1 - 6/2).
    assert corpus_bleu({"a": ["the cat sat on the mat"]}, {"a": "the cat"})[0] == pytest.approx(
        0.1353352832, abs=1e-9
    )
    # Lengths 1 and 3 are equally close to 2; the shorter wins, so no penalty (3 would give 0.61).
    assert corpus_bleu({"a": ["cat", "the big cat"]}, {"a": "the cat"})[0] == pytest.approx(1.0, abs=1e-6)


def test_rouge_l_by_hand() -> None:
    # LCS("a b c d", "a c d e f") = 3 -> P = 3/4, R = 3/5 -> F = 2.44 * .45 / (.6 + 1.44 * .75).
    score, _ = rouge_l({"x": ["a c d e f"]}, {"x": "a b c d"})
    assert score == pytest.approx(2.44 * 0.45 / (0.6 + 1.44 * 0.75), abs=1e-15)


def test_cider_d_by_hand() -> None:
    # Each n-gram is in one of two images: idf = log 2 for all. Identical prediction: cosine 1 for
    # unigrams and bigrams, no 3- or 4-grams (0), equal lengths: mean(1, 1, 0, 0) * 10 = 5.
    mean, per_image = cider_d({"a": ["red bus"], "b": ["green tram"]}, {"a": "red bus", "b": "green tram"})
    assert per_image == pytest.approx({"a": 5.0, "b": 5.0}, abs=1e-12)
    assert mean == pytest.approx(5.0, abs=1e-12)
    # One image alone: idf = log(1) - log(1) = 0 everywhere, so CIDEr-D is 0 by construction.
    assert cider_d({"a": ["red bus"]}, {"a": "red bus"})[0] == 0.0


@pytest.mark.parametrize(
    ("raw", "tokens"),
    [
        ("A DOG, catching a Frisbee!!", "a dog catching a frisbee !!"),  # "!!" is not on the removal list
        ("A toy (near the fence).", "a toy -lrb- near the fence -rrb-"),  # lower-cased escapes survive
        ("The dog's toy isn't here; I cannot see it.", "the dog 's toy is n't here i can not see it"),
        ("I'd've seen the dogs' bowl", "i 'd 've seen the dogs bowl"),
        ("Mr. Smith at 5 p.m. in the U.S.", "mr. smith at 5 p.m. in the u.s."),
        ("1,000 people at 5:30, a 3.5 m wall.", "1,000 people at 5:30 a 3.5 m wall"),
        ("\u201cA sign\u201d \u2014 it\u2019s red\u2026", "a sign it 's red"),
        ("a plate of food.. a cat...dog", "a plate of food a cat dog"),
        ("... !", ""),
        ("two\rlines\u2028here", "two lines here"),
    ],
)
def test_tokenizer_examples(raw: str, tokens: str) -> None:
    assert tokenize_caption(raw) == tokens


def test_metric_subset_and_order() -> None:
    scores = evaluate_captions(REFS, PREDS, scorer="python", metrics=["CIDEr-D", "BLEU-4"])
    assert list(scores) == ["BLEU-4", "CIDEr-D"]
    assert scores.cider_per_image.keys() == REFS.keys()
    assert evaluate_captions(REFS, PREDS, scorer="python", metrics=["BLEU-1"]).cider_per_image == {}


def test_auto_without_java_falls_back_to_python(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(caption_module, "java_available", lambda: False)
    scores = evaluate_captions(REFS, PREDS)
    assert isinstance(scores, CaptionScores)
    assert scores.scorer == "python"
    assert tuple(scores) == PYTHON_METRICS
    with pytest.raises(JavaUnavailable):
        evaluate_captions(REFS, PREDS, metrics=["METEOR"])
    with pytest.raises(JavaUnavailable):
        evaluate_captions(REFS, PREDS, scorer="pycocoevalcap")


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"predictions": {"exact": "a"}}, ValueError, "same images"),
        ({"references": {**REFS, "exact": []}}, ValueError, "non-empty list"),
        ({"references": {**REFS, "exact": "a man surfing"}}, ValueError, "non-empty list"),
        ({"metrics": ["CIDEr"]}, ValueError, "did you mean 'CIDEr-D'"),
        ({"metrics": ["METEOR"], "scorer": "python"}, ValueError, "METEOR needs"),
        ({"scorer": "java"}, ValueError, "unknown scorer"),
        ({"predictions": {**PREDS, "punctuation_only": None}}, TypeError, "must be strings"),
    ],
)
def test_rejects_bad_input(kwargs: dict[str, Any], error: type[Exception], message: str) -> None:
    arguments: dict[str, Any] = {"references": REFS, "predictions": PREDS, "scorer": "python", **kwargs}
    with pytest.raises(error, match=message):
        evaluate_captions(**arguments)


# ------------------------------------------------------------------------------------------------
# Java: the PTB jar and METEOR.
# ------------------------------------------------------------------------------------------------


@needs_java
def test_python_tokenizer_matches_ptb_jar() -> None:
    # The last entry holds line breaks the jar would read as new lines; both sides must treat them
    # as spaces and keep one output per caption.
    captions = [*PROBE, *(c for refs in REFS.values() for c in refs), *PREDS.values(), "two\rlines\u2028here"]
    java = ptb_tokenize(captions)
    python = [tokenize_caption(c) for c in captions]
    mismatches = [(c, j, p) for c, j, p in zip(captions, java, python, strict=True) if j != p]
    assert not mismatches


@needs_java
def test_jar_wrapper_matches_pycocoevalcap_ptbtokenizer() -> None:
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    gts = {k: [{"caption": c} for c in v] for k, v in REFS.items()}
    gts["prediction"] = [{"caption": p} for p in PREDS.values()]
    expected = PTBTokenizer().tokenize(gts)
    ours = ptb_tokenize([c["caption"] for v in gts.values() for c in v])
    assert [t for v in expected.values() for t in v] == ours


@pytest.fixture(scope="module")
def meteor() -> Iterator[MeteorScorer]:
    # One JVM for the module: starting METEOR and loading its paraphrase table takes ~10 s.
    with MeteorScorer() as scorer:
        yield scorer


@pytest.fixture(scope="module")
def coco_scores(meteor: MeteorScorer) -> CaptionScores:
    return evaluate_captions(REFS, PREDS, scorer="pycocoevalcap", meteor=meteor)


@needs_java
@pytest.mark.slow  # shares one METEOR JVM: ~10 s to start and load its tables
def test_scorers_agree(coco_scores: CaptionScores) -> None:
    python = evaluate_captions(REFS, PREDS, scorer="python")
    assert (coco_scores.scorer, python.scorer) == ("pycocoevalcap", "python")
    assert tuple(coco_scores) == METRICS
    for name in PYTHON_METRICS:
        assert python[name] == pytest.approx(coco_scores[name], abs=TOL), name
    assert python.cider_per_image == pytest.approx(coco_scores.cider_per_image, abs=TOL)
    assert max(coco_scores.cider_per_image, key=coco_scores.cider_per_image.__getitem__) == "exact"


@needs_java
@pytest.mark.slow  # shares one METEOR JVM: ~10 s to start and load its tables
def test_meteor_matches_pycocoevalcap(coco_scores: CaptionScores, meteor: MeteorScorer) -> None:
    expected = DATA["pycocoevalcap_meteor"]
    assert 0.0 <= coco_scores["METEOR"] <= 1.0
    assert coco_scores["METEOR"] == pytest.approx(expected["corpus"], abs=TOL)
    corpus, per_image = meteor.score(*_tokenized(REFS, PREDS))
    assert corpus == pytest.approx(expected["corpus"], abs=TOL)
    assert per_image == pytest.approx(expected["per_image"], abs=TOL)
    assert per_image["empty"] == per_image["punctuation_only"] == 0.0  # empty hypotheses don't hang


@needs_java
def test_meteor_jvm_failure_raises_and_scorer_recovers() -> None:
    # A heap the JVM refuses: upstream's wrapper raised ValueError('') with its lock still held,
    # so the next call (or garbage collection) deadlocked. Here every call fails cleanly.
    scorer = MeteorScorer(max_heap="1k")
    for _ in range(2):
        with pytest.raises(MeteorError, match="METEOR"):
            scorer.score({"a": ["a cat"]}, {"a": "a cat"})
        assert scorer.pid is None
    scorer.close()


@needs_java
def test_meteor_read_timeout_kills_process() -> None:
    with MeteorScorer(timeout_s=0.05) as scorer:
        with pytest.raises(MeteorError, match="no reply"):
            scorer.score({"a": ["a cat"]}, {"a": "a cat"})
        assert scorer.pid is None


@needs_java
@pytest.mark.slow  # shares one METEOR JVM: ~10 s to start and load its tables
def test_evaluate_twice_reuses_meteor_then_close_stops_it(
    coco_scores: CaptionScores, meteor: MeteorScorer
) -> None:
    # Last in the module: it closes the shared process.
    pid = meteor.pid
    assert pid is not None
    again = evaluate_captions(REFS, PREDS, scorer="pycocoevalcap", meteor=meteor)
    assert again == coco_scores
    assert again.cider_per_image == coco_scores.cider_per_image
    assert meteor.pid == pid
    meteor.close()
    meteor.close()  # idempotent
    assert meteor.pid is None
    with pytest.raises(ProcessLookupError):  # exited and reaped, not left as a zombie
        os.kill(pid, 0)
