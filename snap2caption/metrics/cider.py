"""CIDEr-D exactly as pycocoevalcap computes it (its ``Cider`` class is the CIDEr-D variant)."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence

from snap2caption.metrics.ngrams import NGram, ngram_counts

SIGMA = 6.0
N = 4


def _tfidf(
    counts: Counter[NGram], document_frequency: Counter[NGram], log_images: float, n: int
) -> tuple[list[dict[NGram, float]], list[float], int]:
    """TF-IDF vectors per n-gram order, their L2 norms, and the caption "length".

    Returns:
        ``(vectors, norms, length)``: one dict per order (index = order - 1), one norm per order,
        and the length used by the Gaussian penalty. Like pycocoevalcap, that length is the number
        of *bigrams* (words - 1), a quirk of its ``counts2vec`` kept here for identical scores.
    """
    vectors: list[dict[NGram, float]] = [{} for _ in range(n)]
    norms = [0.0] * n
    length = 0
    for ngram, term_frequency in counts.items():
        order = len(ngram) - 1
        # idf from the evaluated set's references: log(#images) - log(#images whose refs hold it).
        weight = float(term_frequency) * (log_images - math.log(max(1.0, document_frequency[ngram])))
        vectors[order][ngram] = weight
        norms[order] += weight**2
        if order == 1:
            length += term_frequency
    return vectors, [math.sqrt(norm) for norm in norms], length


def cider_d(
    references: Mapping[str, Sequence[str]],
    predictions: Mapping[str, str],
    n: int = N,
    sigma: float = SIGMA,
) -> tuple[float, dict[str, float]]:
    """CIDEr-D (Vedantam et al. 2015) over tokenized captions.

    Per image and per order k = 1..n: the cosine between the candidate's and each reference's
    TF-IDF n-gram vectors, where candidate weights are clipped by the reference weights
    (``min(c, r) * r``), times the Gaussian length penalty ``exp(-(l_c - l_r)^2 / (2 sigma^2))``.
    The per-image score is the mean over orders, averaged over references, times 10; the corpus
    score is the mean over images.

    Document frequency counts, for each n-gram, the images of *this* set whose references contain
    it, so scores depend on the whole set evaluated together: a single image always scores 0
    (log(1) - log(1)), and scores are comparable only across runs on the same reference set.

    Args:
        references: Image id -> tokenized reference captions (at least one).
        predictions: Image id -> tokenized predicted caption; same ids as ``references``.
        n: Highest n-gram order.
        sigma: Width of the Gaussian length penalty.

    Returns:
        ``(mean, per-image scores)``. Sums run in pycocoevalcap's order; only the final mean
        differs from its ``np.mean`` (pairwise summation) by rounding (~1e-16).
    """
    reference_counts = {
        image_id: [ngram_counts(ref, n) for ref in refs] for image_id, refs in references.items()
    }
    document_frequency: Counter[NGram] = Counter()
    for counts in reference_counts.values():
        document_frequency.update({ngram for ref in counts for ngram in ref})
    log_images = math.log(float(len(reference_counts)))
    penalty_scale = 2 * sigma**2

    per_image: dict[str, float] = {}
    for image_id, refs in reference_counts.items():
        vec, norm, length = _tfidf(ngram_counts(predictions[image_id], n), document_frequency, log_images, n)
        totals = [0.0] * n
        for ref in refs:
            vec_ref, norm_ref, length_ref = _tfidf(ref, document_frequency, log_images, n)
            penalty = math.e ** (-(float(length - length_ref) ** 2) / penalty_scale)
            for k in range(n):
                value = 0.0
                for ngram, weight in vec[k].items():
                    ref_weight = vec_ref[k].get(ngram, 0.0)
                    value += min(weight, ref_weight) * ref_weight
                if norm[k] != 0 and norm_ref[k] != 0:
                    value /= norm[k] * norm_ref[k]
                totals[k] += value * penalty
        per_image[image_id] = sum(totals) / n / len(refs) * 10.0
    return sum(per_image.values()) / len(per_image), per_image
