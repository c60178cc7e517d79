"""The caption model's artifact folder, its model card, and its registration as ``captioner``.

The folder is what the registry stores and services load: ``model.safetensors``, ``config.json``,
``tokenizer.json`` (written by :func:`snap2caption.models.caption.artifact.save_caption_model`), plus the
model card ``README.md`` written here and a ``MANIFEST.json`` that hashes them all. No pickle.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from snap2caption.manifest import write_manifest

logger = logging.getLogger(__name__)

MODEL_CARD = "README.md"


@dataclass
class DataFacts:
    """What a model was trained on, for the model card and the run's tags.

    Attributes:
        data_dir: The ETL output folder.
        version: Dataset version (``dvc:<md5>`` or ``manifests:<hash>``).
        images: Images per split.
        train_pairs: (image, caption) training pairs.
        synthetic: Whether the folder is an ETL of the synthetic shapes benchmark.
    """

    data_dir: str
    version: str
    images: dict[str, int]
    train_pairs: int
    synthetic: bool


def is_synthetic(data_dir: str | os.PathLike[str]) -> bool:
    """Whether an ETL output came from ``snap2caption data synth`` (``synth_config.json`` by its images)."""
    try:
        report = json.loads((Path(data_dir) / "report.json").read_text(encoding="utf-8"))
        images = Path(report["config"]["images"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    candidates = (
        [images.parent]
        if images.is_absolute()
        else [Path.cwd() / images.parent, Path(data_dir) / images.parent]
    )
    return any((c / "synth_config.json").is_file() for c in candidates)


def _table(metrics: Mapping[str, float], keys: list[str]) -> str:
    rows = [f"| {k} | {metrics[k]:.4f} |" for k in keys if k in metrics]
    return "\n".join(["| metric | value |", "|---|---|", *rows])


_SYNTHETIC = """\
**Trained on the synthetic shapes benchmark**: scenes of 1-4 simple coloured shapes (8 shapes x 8 colours,
3 sizes) rendered by `snap2caption data synth`, each with 5 templated captions. It is not COCO or any real
photo data, and nothing here says how the model does on real photos."""

_USE_AND_LIMITS = """\
## Intended use

Captions and alt text for images like the training data: the synthetic benchmark that Snap2Caption's tests,
demos, serving benchmarks and release drills run on. It is a baseline that exercises the whole loop
(training, registry, serving, monitoring) and the starting point for training the same code on real data.

## Limits

- It knows only the training captions' words and templates: on a photo it still talks about coloured
  shapes. Do not serve it as alt text for real users' images.
- Colour and shape mix-ups remain (see the pair scores); counts, sizes and positions are less reliable
  than colours and shapes.
- Not evaluated for bias, safety or robustness. SPICE is not computed (it needs a CoreNLP download).
"""

_CAPTION_METRICS = ["bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider_d"]
_PAIR_METRICS = ["pair_precision", "pair_recall", "pair_f1", "pair_exact", "shape_precision", "shape_recall"]


def model_card(
    *,
    name: str,
    config: Mapping[str, Any],
    preset: str,
    data: DataFacts,
    test: Mapping[str, Any] | None,
    training: Mapping[str, Any],
    provenance: Mapping[str, str],
    n_params: int,
    n_trainable: int,
    vocab_size: int,
) -> str:
    """The model card (Markdown): data, model, training, metrics, intended use, limits, provenance."""
    model, train = config["model"], config["train"]
    enc, dec, lora, decoding = model["encoder"], model["decoder"], model["lora"], model["decoding"]
    weights = (
        enc["pretrained"]
        if isinstance(enc["pretrained"], str)
        else ("ImageNet" if enc["pretrained"] else "random")
    )
    decoder = f"GPT-2 {dec['n_layer']} layers x {dec['n_embd']} wide"
    decoder += f" (from `{dec['pretrained']}`)" if dec["pretrained"] else " (trained from scratch)"
    if lora["enabled"]:
        decoder += f", LoRA r={lora['r']} merged into the weights"
    search = "greedy" if decoding["num_beams"] == 1 else f"{decoding['num_beams']} beams"
    views = decoding.get("views", 1)
    if views > 1:
        search += (
            f"; an image whose caption's raw confidence is below {decoding['views_below']} is captioned again"
            f" mirrored ({views} views in all) and gets the caption the views agree on"
        )
    images = ", ".join(f"{k} {v}" for k, v in data.images.items())
    n_captions = train["captions_per_image"]
    per_image = f"the first {n_captions} caption(s) of each image" if n_captions else "every caption"
    best_val = training.get("best_val_cider_d", float("nan"))
    lines = [
        f"# {name}: Snap2Caption caption model",
        "",
        _SYNTHETIC if data.synthetic else f"Trained on the ETL output at `{data.data_dir}`.",
        "",
        "## Model",
        "",
        f"- Preset `{preset}`: encoder `{enc['name']}` ({weights} weights, trainable: {enc['trainable']}) -> "
        f"{model['mapping']['type']} mapping -> {model['prefix_len']} prefix embeddings -> {decoder}.",
        f"- Parameters: {n_params:,} ({n_trainable:,} trained); tokenizer: byte-level BPE, {vocab_size} ids.",
        f"- Decoding: {search}, at most {decoding['max_new_tokens']} tokens.",
        "- Files: `model.safetensors`, `config.json` (resolved config and preprocessing), `tokenizer.json`,",
        "  `MANIFEST.json` (sha256 of each file). Load: `snap2caption.models.caption.load`.",
        "",
        "## Data",
        "",
        f"- Dataset `{data.data_dir}`, version `{data.version}`.",
        f"- Images: {images}; training (image, caption) pairs: {data.train_pairs} ({per_image}).",
        "",
        "## Training",
        "",
        f"- {training.get('steps')} optimizer steps ({training.get('epochs', 0):.2f} epochs) of "
        f"{train['batch_size']} x {train['grad_accum']} pairs;",
        f"  AdamW lr {train['lr']} (warmup {train['warmup_steps']}, cosine), precision {train['precision']}, "
        f"device {training.get('device')}.",
        f"- Wall time {training.get('total_s', 0):.0f} s (features {training.get('features_s', 0):.0f} s, "
        f"loop {training.get('train_s', 0):.0f} s); stopped: {training.get('stop_reason')}.",
        f"- Weights kept: step {training.get('best_step')} (validation CIDEr-D {best_val:.4f}).",
        "",
    ]
    if test:
        lines += [
            f"## Metrics (test split, {test['n_images']} images, {test['scorer']} scorers, {search})",
            "",
            _table(test["metrics"], _CAPTION_METRICS),
            "",
            "Do the captions name the right objects? (colour, shape) pairs named in the predictions vs.",
            "in the references, pooled over the split (CIDEr-D alone flatters templated captions):",
            "",
            _table(test["metrics"], _PAIR_METRICS),
            "",
        ]
    lines += [_USE_AND_LIMITS, "## Provenance", "", *[f"- {k}: `{v}`" for k, v in provenance.items()], ""]
    return "\n".join(lines)


def write_model_card(artifact_dir: str | os.PathLike[str], text: str) -> Path:
    """Write ``README.md`` into the artifact and rewrite its ``MANIFEST.json`` to cover it."""
    path = Path(artifact_dir) / MODEL_CARD
    path.write_text(text, encoding="utf-8")
    write_manifest(artifact_dir)
    return path
