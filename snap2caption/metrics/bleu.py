"""Corpus BLEU-1..4 exactly as pycocoevalcap computes it (``Bleu(4)``, ``option="closest"``)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from snap2caption.metrics.ngrams import NGram, ngram_counts

# pycocoevalcap's smoothing constants: ``tiny`` keeps a zero match count from giving log(0), ``small``
# keeps a zero guess count from dividing by zero. They make a perfect match score 1 - ~1e-9, not 1.
_TINY = 1e-15
_SMALL = 1e-9


def corpus_bleu(
    references: Mapping[str, Sequence[str]], predictions: Mapping[str, str], n: int = 4
) -> list[float]:
    """Corpus-level BLEU-1..n over tokenized captions.

    Method (Papineni et al. 2002 as implemented in coco-caption's ``bleu_scorer.py``): per image,
    candidate n-gram counts are clipped by the maximum count of that n-gram in any one reference,
    and the reference length is the one *closest* to the candidate length (ties go to the shorter).
    Clipped matches, candidate n-gram totals and lengths are summed over the corpus, then BLEU-k is
    the geometric mean of the k corpus precisions times the corpus brevity penalty
    ``exp(1 - r/c)`` when ``c < r``.

    Args:
        references: Image id -> tokenized reference captions (at least one).
        predictions: Image id -> tokenized predicted caption; same ids as ``references``.
        n: Highest order.

    Returns:
        ``[BLEU-1, ..., BLEU-n]``.
    """
    correct = [0] * n  # clipped n-gram matches, per order
    guess = [0] * n  # candidate n-grams, per order
    test_len = ref_len = 0
    for image_id, refs in references.items():
        candidate = ngram_counts(predictions[image_id], n)
        length = len(predictions[image_id].split())
        max_ref: dict[NGram, int] = {}
        ref_lengths = []
        for ref in refs:
            ref_lengths.append(len(ref.split()))
            for ngram, count in ngram_counts(ref, n).items():
                max_ref[ngram] = max(max_ref.get(ngram, 0), count)
        test_len += length
        ref_len += min((abs(r - length), r) for r in ref_lengths)[1]
        for k in range(n):
            guess[k] += max(0, length - k)
        for ngram, count in candidate.items():
            correct[len(ngram) - 1] += min(max_ref.get(ngram, 0), count)

    scores = []
    product = 1.0
    for k in range(n):
        # Same operation order as pycocoevalcap, so the floats come out bit-identical.
        product *= (correct[k] + _TINY) / (guess[k] + _SMALL)
        scores.append(product ** (1.0 / (k + 1)))
    ratio = (test_len + _TINY) / (ref_len + _SMALL)
    if ratio < 1:
        scores = [score * math.exp(1 - 1 / ratio) for score in scores]
    return scores
