"""Caption evaluation metrics: BLEU-1..4, METEOR, ROUGE-L and CIDEr-D, as coco-caption computes them.

``evaluate_captions`` is the entry point; see :mod:`snap2caption.metrics.caption` for the two
scorers (pycocoevalcap on Java, or pure Python without METEOR). SPICE is not computed: it needs
a Stanford CoreNLP download that offline machines cannot make.
"""

from __future__ import annotations

from snap2caption.metrics.caption import (
    METRICS,
    PYTHON_METRICS,
    CaptionScores,
    Scorer,
    evaluate_captions,
    pycocoevalcap_usable,
)
from snap2caption.metrics.jvm import JavaUnavailable
from snap2caption.metrics.meteor import MeteorError, MeteorScorer
from snap2caption.metrics.tokenizer import tokenize_caption

__all__ = [
    "METRICS",
    "PYTHON_METRICS",
    "CaptionScores",
    "JavaUnavailable",
    "MeteorError",
    "MeteorScorer",
    "Scorer",
    "evaluate_captions",
    "pycocoevalcap_usable",
    "tokenize_caption",
]
