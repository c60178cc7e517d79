"""The reference scorer: pycocoevalcap's own scorers on PTB-jar tokens, plus METEOR.

SPICE is left out: it needs Stanford CoreNLP 3.6.0 (~400 MB), which pycocoevalcap downloads on
first use, and this project's machines are offline.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

from snap2caption.metrics.meteor import MeteorScorer

BLEU_KEYS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4")


def score_with_pycocoevalcap(
    references: Mapping[str, Sequence[str]],
    predictions: Mapping[str, str],
    metrics: Collection[str],
    meteor: MeteorScorer | None = None,
) -> tuple[dict[str, float], dict[str, float]]:
    """Run pycocoevalcap's Bleu(4), Rouge and Cider, and METEOR, on tokenized captions.

    Args:
        references: Image id -> tokenized reference captions.
        predictions: Image id -> tokenized predicted caption; same ids, same order.
        metrics: Which of ``BLEU-1..4, METEOR, ROUGE-L, CIDEr-D`` to compute.
        meteor: A running scorer to reuse; without one a scorer is started and stopped here.

    Returns:
        ``(scores, per-image CIDEr-D)``; the second is empty when CIDEr-D is not requested.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts = {image_id: list(refs) for image_id, refs in references.items()}
    res = {image_id: [predictions[image_id]] for image_id in references}
    scores: dict[str, float] = {}
    per_image_cider: dict[str, float] = {}
    if any(key in metrics for key in BLEU_KEYS):
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)  # verbose=0: it prints otherwise
        scores.update(
            {key: float(value) for key, value in zip(BLEU_KEYS, bleu, strict=True) if key in metrics}
        )
    if "METEOR" in metrics:
        if meteor is None:
            with MeteorScorer() as scorer:
                scores["METEOR"], _ = scorer.score(references, predictions)
        else:
            scores["METEOR"], _ = meteor.score(references, predictions)
    if "ROUGE-L" in metrics:
        rouge, _ = Rouge().compute_score(gts, res)
        scores["ROUGE-L"] = float(rouge)
    if "CIDEr-D" in metrics:
        cider, per_image = Cider().compute_score(gts, res)
        scores["CIDEr-D"] = float(cider)
        per_image_cider = {image_id: float(value) for image_id, value in zip(gts, per_image, strict=True)}
    return scores, per_image_cider
