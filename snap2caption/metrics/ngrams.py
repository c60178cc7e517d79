"""N-gram counting shared by BLEU and CIDEr-D (coco-caption's ``precook``)."""

from __future__ import annotations

from collections import Counter

NGram = tuple[str, ...]


def ngram_counts(tokenized: str, n: int = 4) -> Counter[NGram]:
    """Count every 1..n-gram of a tokenized caption (whitespace split).

    Insertion order is all unigrams left to right, then bigrams, and so on; CIDEr-D sums over the
    counts in this order, which keeps its floating-point results identical to pycocoevalcap's.

    Args:
        tokenized: Caption already tokenized, tokens separated by whitespace.
        n: Longest n-gram.

    Returns:
        Counts keyed by n-gram tuple.
    """
    words = tokenized.split()
    counts: Counter[NGram] = Counter()
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i : i + k])] += 1
    return counts
