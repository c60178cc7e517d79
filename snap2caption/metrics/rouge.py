"""ROUGE-L exactly as pycocoevalcap computes it (``Rouge()``, beta = 1.2)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

BETA = 1.2


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token lists (O(len(a) * len(b)))."""
    previous = [0] * (len(b) + 1)
    for token_a in a:
        current = [0]
        for j, token_b in enumerate(b):
            current.append(previous[j] + 1 if token_a == token_b else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l_image(candidate: str, references: Sequence[str], beta: float = BETA) -> float:
    """ROUGE-L F-score of one tokenized candidate against its tokenized references.

    Precision and recall are each maximised over the references separately (coco-caption's
    choice), then combined as ``(1 + b^2) P R / (R + b^2 P)``.

    Args:
        candidate: Tokenized predicted caption.
        references: Tokenized reference captions (at least one).
        beta: Recall weight.

    Returns:
        The F-score in [0, 1].
    """
    # split(" "), not split(): pycocoevalcap does this, so an empty caption is one empty token
    # (length 1, matching nothing) rather than zero tokens.
    tokens = candidate.split(" ")
    precisions, recalls = [], []
    for reference in references:
        ref_tokens = reference.split(" ")
        lcs = _lcs_length(ref_tokens, tokens)
        precisions.append(lcs / len(tokens))
        recalls.append(lcs / len(ref_tokens))
    precision, recall = max(precisions), max(recalls)
    if precision == 0 or recall == 0:
        return 0.0
    return ((1 + beta**2) * precision * recall) / (recall + beta**2 * precision)


def rouge_l(
    references: Mapping[str, Sequence[str]], predictions: Mapping[str, str], beta: float = BETA
) -> tuple[float, dict[str, float]]:
    """Mean ROUGE-L over images.

    Args:
        references: Image id -> tokenized reference captions.
        predictions: Image id -> tokenized predicted caption; same ids as ``references``.
        beta: Recall weight.

    Returns:
        ``(mean, per-image scores)``. The mean is a plain left-to-right sum, which differs from
        pycocoevalcap's ``np.mean`` (pairwise summation) by rounding only (~1e-16).
    """
    per_image = {
        image_id: rouge_l_image(predictions[image_id], refs, beta) for image_id, refs in references.items()
    }
    return sum(per_image.values()) / len(per_image), per_image
