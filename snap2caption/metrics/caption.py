"""Caption metrics for evaluation runs: ``evaluate_captions`` is the one entry point.

Two scorers compute the coco-caption numbers that captioning papers report:

* ``"pycocoevalcap"``: the reference implementation. Captions are tokenized by its Stanford
  PTBTokenizer jar, scored by its Bleu/Rouge/Cider classes, and METEOR 1.5 runs in its jar. Needs
  the ``train`` extra and a working ``java``.
* ``"python"``: no Java. :mod:`snap2caption.metrics.tokenizer` (written independently) gives the
  jar's tokens on ordinary captions (its docstring lists where they differ), and
  :mod:`~snap2caption.metrics.bleu`, :mod:`~snap2caption.metrics.rouge` and
  :mod:`~snap2caption.metrics.cider` reproduce the scorers (same clipping, closest reference
  length, beta, sigma, idf and x10 scale, same float operation order). METEOR has no pure-Python
  equivalent and is not offered.

``"auto"`` picks pycocoevalcap when it is importable and Java runs, else python; the result records
which one ran. SPICE is not computed (see :mod:`snap2caption.metrics.coco`).
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Mapping, Sequence
from typing import Literal

from snap2caption.metrics import bleu, cider, rouge
from snap2caption.metrics.coco import BLEU_KEYS, score_with_pycocoevalcap
from snap2caption.metrics.jvm import JavaUnavailable, java_available, ptb_tokenize, pycocoevalcap_installed
from snap2caption.metrics.meteor import MeteorScorer
from snap2caption.metrics.tokenizer import tokenize_caption

logger = logging.getLogger(__name__)

Scorer = Literal["pycocoevalcap", "python", "auto"]

METRICS: tuple[str, ...] = (*BLEU_KEYS, "METEOR", "ROUGE-L", "CIDEr-D")
PYTHON_METRICS: tuple[str, ...] = tuple(name for name in METRICS if name != "METEOR")


class CaptionScores(dict[str, float]):
    """Metric name -> corpus score, plus where the numbers came from.

    A plain ``dict[str, float]`` to callers that only want the scores (e.g. ``mlflow.log_metrics``).

    Attributes:
        scorer: ``"pycocoevalcap"`` or ``"python"``, whichever computed the scores.
        cider_per_image: Image id -> CIDEr-D of that image (empty unless CIDEr-D was computed), for
            picking best and worst samples to show.
    """

    def __init__(
        self, scores: Mapping[str, float], scorer: str, cider_per_image: Mapping[str, float]
    ) -> None:
        super().__init__(scores)
        self.scorer = scorer
        self.cider_per_image = dict(cider_per_image)


def pycocoevalcap_usable() -> bool:
    """Whether the pycocoevalcap scorer can run here (package importable and ``java`` works)."""
    return pycocoevalcap_installed() and java_available()


def _check_inputs(references: Mapping[str, Sequence[str]], predictions: Mapping[str, str]) -> None:
    if not references:
        raise ValueError("no images to evaluate")
    missing = [image_id for image_id in references if image_id not in predictions]
    extra = [image_id for image_id in predictions if image_id not in references]
    if missing or extra:
        raise ValueError(
            f"references and predictions must cover the same images: {len(missing)} without a prediction "
            f"(e.g. {missing[:3]}), {len(extra)} without references (e.g. {extra[:3]})"
        )
    for image_id, refs in references.items():
        if isinstance(refs, str) or not refs:
            raise ValueError(f"image {image_id!r} needs a non-empty list of reference captions, got {refs!r}")
        if not all(isinstance(ref, str) for ref in refs) or not isinstance(predictions[image_id], str):
            raise TypeError(f"captions of image {image_id!r} must be strings")


def _check_metrics(metrics: Sequence[str] | None) -> None:
    if isinstance(metrics, str):
        raise ValueError(f"metrics must be a sequence of names, e.g. [{metrics!r}]")
    for name in metrics or ():
        if name not in METRICS:
            close = difflib.get_close_matches(name, METRICS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown metric {name!r}{hint} (known: {', '.join(METRICS)})")


def _resolve_scorer(scorer: Scorer, metrics: Sequence[str] | None) -> Literal["pycocoevalcap", "python"]:
    if scorer not in ("pycocoevalcap", "python", "auto"):
        raise ValueError(f"unknown scorer {scorer!r} (pycocoevalcap, python or auto)")
    wants_meteor = metrics is not None and "METEOR" in metrics
    if scorer == "python":
        if wants_meteor:
            raise ValueError("METEOR needs the pycocoevalcap scorer (it runs METEOR 1.5 on Java)")
        return "python"
    if pycocoevalcap_usable():
        return "pycocoevalcap"
    if scorer == "pycocoevalcap" or wants_meteor:
        reason = "pycocoevalcap is not installed" if not pycocoevalcap_installed() else "no working `java`"
        raise JavaUnavailable(f"the pycocoevalcap scorer cannot run: {reason}")
    logger.warning("pycocoevalcap scorer unavailable, using the pure-Python metrics (no METEOR)")
    return "python"


def evaluate_captions(
    references: Mapping[str, Sequence[str]],
    predictions: Mapping[str, str],
    scorer: Scorer = "auto",
    metrics: Sequence[str] | None = None,
    *,
    meteor: MeteorScorer | None = None,
) -> CaptionScores:
    """Score predicted captions against reference captions, coco-caption style.

    Args:
        references: Image id -> raw reference captions (COCO has 5 per image).
        predictions: Image id -> raw predicted caption; exactly the ids of ``references``. An empty
            prediction is allowed and scores 0.
        scorer: ``"pycocoevalcap"`` (Java), ``"python"`` (no Java, no METEOR) or ``"auto"``.
        metrics: Subset of ``BLEU-1..BLEU-4, METEOR, ROUGE-L, CIDEr-D``; ``None`` means every
            metric the chosen scorer computes. Asking for METEOR makes ``"auto"`` insist on
            pycocoevalcap.
        meteor: A long-lived :class:`MeteorScorer` to reuse across calls; without one, METEOR
            starts a JVM (~10 s) for this call and stops it before returning.

    Returns:
        Scores keyed by metric name, with ``.scorer`` and ``.cider_per_image``. CIDEr-D's idf
        comes from this call's references, so evaluate a split in one call.

    Raises:
        ValueError: Mismatched ids, an image without references, an unknown metric or scorer,
            or METEOR asked of the python scorer.
        JavaUnavailable: pycocoevalcap was required (explicitly, or for METEOR) but cannot run.
        MeteorError: The METEOR process failed or stopped answering.
    """
    _check_inputs(references, predictions)
    _check_metrics(metrics)
    chosen = _resolve_scorer(scorer, metrics)
    available = METRICS if chosen == "pycocoevalcap" else PYTHON_METRICS
    names = tuple(name for name in available if metrics is None or name in metrics)

    # One tokenizer pass over references and predictions together (one JVM start for the jar).
    raw = [*(ref for refs in references.values() for ref in refs), *predictions.values()]
    tokens = iter(
        ptb_tokenize(raw) if chosen == "pycocoevalcap" else [tokenize_caption(text) for text in raw]
    )
    tokenized_refs = {image_id: [next(tokens) for _ in refs] for image_id, refs in references.items()}
    tokenized_preds = {image_id: next(tokens) for image_id in predictions}
    if not any(ref for refs in tokenized_refs.values() for ref in refs):
        raise ValueError("every reference caption is empty after tokenization")

    if chosen == "pycocoevalcap":
        scores, cider_per_image = score_with_pycocoevalcap(tokenized_refs, tokenized_preds, names, meteor)
    else:
        scores, cider_per_image = _score_with_python(tokenized_refs, tokenized_preds, names)
    logger.info(
        "caption metrics scorer=%s images=%d %s",
        chosen,
        len(references),
        " ".join(f"{name}={scores[name]:.4f}" for name in names),
    )
    return CaptionScores({name: scores[name] for name in names}, chosen, cider_per_image)


def _score_with_python(
    references: Mapping[str, Sequence[str]], predictions: Mapping[str, str], names: Sequence[str]
) -> tuple[dict[str, float], dict[str, float]]:
    scores: dict[str, float] = {}
    per_image_cider: dict[str, float] = {}
    if any(key in names for key in BLEU_KEYS):
        scores.update(zip(BLEU_KEYS, bleu.corpus_bleu(references, predictions), strict=True))
    if "ROUGE-L" in names:
        scores["ROUGE-L"], _ = rouge.rouge_l(references, predictions)
    if "CIDEr-D" in names:
        scores["CIDEr-D"], per_image_cider = cider.cider_d(references, predictions)
    return scores, per_image_cider
