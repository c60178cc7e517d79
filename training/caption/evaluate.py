"""Caption a split and score it: coco-caption metrics, (colour, shape) pair accuracy and sample triples.

CIDEr-D alone flatters templated captions (DESIGN.md): a caption can share most n-grams with the references
and still name the wrong colour. So besides BLEU-1..4, METEOR, ROUGE-L and CIDEr-D, every evaluation
reports how well the predicted captions name the right objects:

- ``pair_precision`` / ``pair_recall`` / ``pair_f1``: the (colour, shape) pairs a prediction names (``"two
  red circles"`` -> (red, circle)) against those its references name, pooled over the split;
- ``pair_exact``: the share of images whose predicted pair set equals the reference set;
- ``shape_precision`` / ``shape_recall``: the same for shape words alone.

The vocabulary is the synthetic benchmark's (``snap2caption.data.synth``): on other data these scores are
computed over the few captions that happen to use those words and mean little.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor
from tqdm import tqdm

from snap2caption.data.synth import COLOURS, PLURALS, SHAPES
from snap2caption.metrics import MeteorScorer, Scorer, evaluate_captions
from snap2caption.models.caption import Caption, Captioner
from snap2caption.models.caption.model import CaptionModel
from snap2caption.models.caption.views import caption_views, flip_pixels
from training.caption.data import SplitData, image_loader

logger = logging.getLogger(__name__)

_SHAPE_WORDS = {**{s: s for s in SHAPES}, **{p: s for s, p in PLURALS.items()}}
_WORD = re.compile(r"[a-z]+")
# Metric names as evaluate_captions reports them -> snake-case keys for MLflow and the registry.
METRIC_KEYS = {
    "BLEU-1": "bleu_1",
    "BLEU-2": "bleu_2",
    "BLEU-3": "bleu_3",
    "BLEU-4": "bleu_4",
    "METEOR": "meteor",
    "ROUGE-L": "rouge_l",
    "CIDEr-D": "cider_d",
}


def named_pairs(caption: str) -> set[tuple[str, str]]:
    """(colour, shape) pairs a caption names: a colour word right before a shape word (singular or plural).

    >>> sorted(named_pairs("two small red circles and a blue star above the green square"))
    [('blue', 'star'), ('green', 'square'), ('red', 'circle')]
    """
    words = _WORD.findall(caption.lower())
    return {
        (w, _SHAPE_WORDS[nxt]) for w, nxt in itertools.pairwise(words) if w in COLOURS and nxt in _SHAPE_WORDS
    }


def named_shapes(caption: str) -> set[str]:
    """Shape words a caption names (plurals folded to the singular)."""
    return {_SHAPE_WORDS[w] for w in _WORD.findall(caption.lower()) if w in _SHAPE_WORDS}


def pairs_right(references: Sequence[str], prediction: str) -> bool:
    """Whether a caption names exactly the (colour, shape) pairs its references name (``pair_exact``
    for one image): what "right" means for the calibrated confidence."""
    return named_pairs(prediction) == set().union(*(named_pairs(r) for r in references))


def _prf(hits: int, predicted: int, expected: int) -> tuple[float, float, float]:
    precision = hits / predicted if predicted else 0.0
    recall = hits / expected if expected else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def pair_scores(references: Mapping[str, Sequence[str]], predictions: Mapping[str, str]) -> dict[str, float]:
    """Micro-averaged (colour, shape) pair and shape-word precision/recall of predictions vs references.

    The expected set of an image is the union over its references (each reference is true; the synthetic
    benchmark's first caption names every object).
    """
    pair_hits = pair_pred = pair_true = exact = 0
    shape_hits = shape_pred = shape_true = 0
    for image_id, refs in references.items():
        pred = predictions[image_id]
        expected = set().union(*(named_pairs(r) for r in refs))
        got = named_pairs(pred)
        pair_hits, pair_pred, pair_true = (
            pair_hits + len(got & expected),
            pair_pred + len(got),
            pair_true + len(expected),
        )
        exact += got == expected
        shapes_expected = set().union(*(named_shapes(r) for r in refs))
        shapes_got = named_shapes(pred)
        shape_hits += len(shapes_got & shapes_expected)
        shape_pred, shape_true = shape_pred + len(shapes_got), shape_true + len(shapes_expected)
    precision, recall, f1 = _prf(pair_hits, pair_pred, pair_true)
    s_precision, s_recall, _ = _prf(shape_hits, shape_pred, shape_true)
    return {
        "pair_precision": precision,
        "pair_recall": recall,
        "pair_f1": f1,
        "pair_exact": exact / len(references) if references else 0.0,
        "shape_precision": s_precision,
        "shape_recall": s_recall,
    }


@dataclass
class EvalResult:
    """Scores of one split.

    Attributes:
        split: Split name.
        metrics: Snake-case metric -> value (``cider_d``, ``bleu_4``, ``meteor``, ``pair_recall``...).
        scorer: Which caption-metric scorer computed them.
        predictions: Image id -> predicted caption.
        samples: Image/reference/prediction triples with their per-image CIDEr-D and pairs.
        seconds: Wall time of captioning plus scoring.
        confidences: Per image, the caption's geometric-mean token probability (what the captioner
            serves as ``confidence``): the output side of the drift reference.
    """

    split: str
    metrics: dict[str, float]
    scorer: str
    predictions: dict[str, str]
    samples: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    confidences: list[float] = field(default_factory=list)

    def prefixed(self, prefix: str) -> dict[str, float]:
        """Metrics as ``<prefix>_<name>`` (``test_cider_d``): the registry's gate metric names."""
        return {f"{prefix}_{k}": v for k, v in self.metrics.items()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "split": self.split,
            "n_images": len(self.predictions),
            "scorer": self.scorer,
            "metrics": self.metrics,
            "seconds": round(self.seconds, 2),
        }


@torch.no_grad()
def caption_batches(
    model: CaptionModel | Captioner,
    batches: Iterable[Tensor],
    *,
    is_features: bool,
    num_beams: int = 0,
    device: torch.device | None = None,
    progress: bool | None = False,
    total: int | None = None,
) -> list[Caption]:
    """Caption (B, C, h, w) features or (B, 3, H, W) pixels batch by batch, in eval mode.

    Args:
        model: The model in training (put back in its previous train/eval mode afterwards), or a runtime
            loaded from an artifact (``snap2caption.models.caption.load``; pixels only).
        batches: Image inputs.
        is_features: Whether the batches are encoder features (else pixels). A model in training captions
            pixels over its ``decoding.views`` (mirroring them here), features from the one view given.
        num_beams: Beams (0 = the model's ``decoding.num_beams``).
        device: Where to run (default: the model's device).
        progress: Show a tqdm bar (None: only on a terminal).
        total: Images in all (for the bar).
    """
    was_training = False
    if isinstance(model, CaptionModel):
        was_training = model.training
        model.eval()
        device = device or next(model.parameters()).device
    beams = num_beams or None
    out: list[Caption] = []
    try:
        disable = None if progress is None else not progress
        with tqdm(total=total, desc="caption", unit="img", disable=disable) as bar:
            for batch in batches:
                if not isinstance(model, CaptionModel):  # a runtime: NumPy pixels, as the service has them
                    out += model.generate(batch.float().numpy(), num_beams=beams)
                elif is_features:
                    out += model.generate(features=batch.to(device).float(), num_beams=beams)
                else:
                    out += _pixel_captions(model, batch.to(device).float(), beams)
                bar.update(batch.shape[0])
    finally:
        if isinstance(model, CaptionModel):
            model.train(was_training)
    return out


def _pixel_captions(model: CaptionModel, pixels: Tensor, beams: int | None) -> list[Caption]:
    """A batch of pixels captioned by the model in training over its decoding's views (mirrored here)."""
    settings = model.config.decoding

    def decode_view(view: int, rows: list[int]) -> list[Caption]:
        return model.generate(flip_pixels(pixels[rows], view), num_beams=beams)

    first = model.generate(pixels, num_beams=beams)
    return caption_views(first, decode_view, settings.views, settings.views_below)


def evaluate_split(
    model: CaptionModel | Captioner,
    split: SplitData,
    *,
    features: Tensor | None = None,
    mirrored: Callable[[int, list[int]], Tensor] | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    num_beams: int = 0,
    scorer: Scorer = "python",
    metrics: Sequence[str] | None = None,
    meteor: MeteorScorer | None = None,
    num_samples: int = 0,
    progress: bool | None = False,
) -> EvalResult:
    """Caption every image of a split and score the captions against its references.

    Args:
        model: The model in training, or a runtime loaded from an artifact (see :func:`caption_batches`).
        split: The images and references.
        features: (N, C, h, w) precomputed encoder features of ``split`` (frozen encoder), else the images
            are decoded and preprocessed with ``model.preprocess`` (the serving path).
        mirrored: With ``features`` and a model in training: ``(view, rows) -> features`` of those images
            mirrored as the view sees them, so the unsure ones are captioned over the model's
            ``decoding.views`` as the runtimes serve them (without it, features give one view).
        batch_size: Images per generate call.
        num_workers: Decoding workers (pixel path).
        num_beams: Beams (0 = the model's default).
        scorer: Caption-metric scorer (see :func:`snap2caption.metrics.evaluate_captions`).
        metrics: Subset of caption metrics (``["CIDEr-D"]`` for a quick validation score); None = all the
            scorer computes.
        meteor: A running METEOR process to reuse.
        num_samples: Sample triples to keep, evenly spaced over the split.
        progress: Show a tqdm bar.
    """
    started = time.perf_counter()
    batches: Iterable[Tensor]
    if features is not None:
        batches = features.split(batch_size)
    else:
        batches = image_loader(split.paths, model.preprocess, batch_size, num_workers)
    captions = caption_batches(
        model,
        batches,
        is_features=features is not None,
        num_beams=num_beams,
        progress=progress,
        total=len(split),
    )
    if features is not None and mirrored is not None and isinstance(model, CaptionModel):
        settings = model.config.decoding

        def decode_view(view: int, rows: list[int]) -> list[Caption]:
            grids = mirrored(view, rows).split(batch_size)
            return caption_batches(model, grids, is_features=True, num_beams=num_beams)

        captions = caption_views(captions, decode_view, settings.views, settings.views_below)
    predictions = {image_id: c.text for image_id, c in zip(split.image_ids, captions, strict=True)}
    references = split.references()
    scores = evaluate_captions(references, predictions, scorer=scorer, metrics=metrics, meteor=meteor)
    values = {METRIC_KEYS[name]: float(value) for name, value in scores.items()}
    values.update(pair_scores(references, predictions))
    values["mean_confidence"] = sum(c.confidence for c in captions) / len(captions)
    result = EvalResult(
        split.name,
        values,
        scores.scorer,
        predictions,
        seconds=time.perf_counter() - started,
        confidences=[math.exp(c.confidence) for c in captions],
    )
    if num_samples:
        step = max(1, len(split) // num_samples)
        for i in range(0, len(split), step)[:num_samples]:
            image_id = split.image_ids[i]
            refs = split.captions[i]
            expected = set().union(*(named_pairs(r) for r in refs))
            result.samples.append(
                {
                    "image_id": image_id,
                    "path": str(split.paths[i]),
                    "prediction": predictions[image_id],
                    "references": refs,
                    "confidence": round(math.exp(captions[i].confidence), 4),
                    "cider_d": round(scores.cider_per_image.get(image_id, float("nan")), 4),
                    "pairs_predicted": sorted(map(list, named_pairs(predictions[image_id]))),
                    "pairs_expected": sorted(map(list, expected)),
                }
            )
    logger.info(
        "eval %s: %d images, %s",
        split.name,
        len(split),
        " ".join(f"{k}={v:.4f}" for k, v in values.items()),
    )
    return result


def describe_model(uri: str, folder: Path) -> dict[str, Any]:
    """What was evaluated: a folder, or the registry name and version (``Registry.download`` puts a version
    in ``<cache>/<name>/v<version>``)."""
    if uri.startswith("models:/"):
        from snap2caption.registry import parse_model_ref

        name, ref = parse_model_ref(uri)
        return {"uri": uri, "name": name, "ref": ref, "version": int(folder.name.removeprefix("v"))}
    return {"uri": str(folder.resolve())}


def evaluate_model(
    uri: str,
    data_dir: str | os.PathLike[str],
    split: str,
    out_dir: str | os.PathLike[str],
    *,
    max_images: int = 0,
    scorer: Scorer = "auto",
    num_beams: int = 0,
    batch_size: int = 64,
    num_workers: int = 0,
    num_samples: int = 20,
    tracking_uri: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool | None = None,
    runtime: Literal["torch", "onnx", "onnx-int8"] = "torch",
) -> tuple[EvalResult, dict[str, Any]]:
    """Load a model from its artifact alone, caption a split from the image files, score it, write results.

    ``runtime`` runs the model as the captioner service can (``snap2caption.models.caption.load``):
    PyTorch, or the artifact's ONNX export on ONNX Runtime (``onnx-int8``: with the int8 decoder).

    Writes ``<out_dir>/metrics.json`` (model, data, metrics) and ``<out_dir>/samples.json`` (triples).

    Returns:
        The evaluation and the ``metrics.json`` content.
    """
    from snap2caption.models import caption
    from snap2caption.models.uri import resolve_model_dir
    from training.provenance import dataset_version

    folder = resolve_model_dir(
        uri, tracking_uri=tracking_uri, cache_dir=Path(cache_dir) if cache_dir else None
    )
    captioner = caption.load(folder, runtime, threads=torch.get_num_threads())
    data = SplitData.load(data_dir, split).head(max_images)
    result = evaluate_split(
        captioner,
        data,
        batch_size=batch_size,
        num_workers=num_workers,
        num_beams=num_beams,
        scorer=scorer,
        num_samples=num_samples,
        progress=progress,
    )
    report = {
        "model": {**describe_model(uri, folder), "runtime": runtime},
        "dataset": {"path": str(data_dir), "version": dataset_version(data_dir), "split": split},
        **result.to_dict(),
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (out / "samples.json").write_text(json.dumps(result.samples, indent=2) + "\n", encoding="utf-8")
    return result, report
