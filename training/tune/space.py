"""What a search varies: a search space is a mapping of config keys to a distribution, in plain data.

A space is written as YAML or a dict (``--space FILE``; the defaults below), one dotted config key each::

    train.lr: {loguniform: [3.0e-4, 3.0e-3]}
    train.batch_size: {choice: [16, 32, 64]}
    model.mapping.type: {grid: [mlp, transformer]}    # every value, crossed with the samples
    train.seed: 0                                     # a constant

Kinds: ``loguniform``, ``uniform``, ``randint`` (low, high exclusive), ``choice``, ``grid``. The keys are
the trainer's own config keys, so a trial's parameters are ``key=value`` overrides of its config (checked
by the one config loader: a misspelt key fails before Ray starts).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from snap2caption.config import ConfigError, Override, dotted_keys, unknown_key_message
from snap2caption.models.caption.config import CaptionConfig
from training.caption.config import CaptionRunConfig
from training.detector.config import DetectorRunConfig

KINDS = ("loguniform", "uniform", "randint", "choice", "grid")


def caption_space(config: CaptionRunConfig) -> dict[str, Any]:
    """The default caption search: learning rate, effective batch (size x accumulation), prefix length,
    mapping network, and the decoder's size (from scratch) or its LoRA rank and alpha (pretrained).

    The transformer mapping is tried only where the base model's mapping settings allow it: the starter's
    cell coordinates and column order belong to the mlp mapping, so its search keeps the mlp.

    A decoder trained from scratch trains whole: LoRA would freeze its random weights, so rank and alpha
    are searched only where ``model.lora.enabled`` (a pretrained decoder, e.g. the ``paper`` preset), and
    the decoder's size only where it is not pretrained (a pretrained decoder's size is fixed).
    """
    model = config.model
    # Square prefix grids (the mlp mapping pools the encoder grid to P = g x g cells) that fit the decoder's
    # positions beside the longest caption.
    longest = max(model.tokenizer.max_caption_tokens + 2, model.decoding.max_new_tokens + 1)
    prefixes = [p for p in (16, 25, 49) if p + longest <= model.decoder.n_positions] or [model.prefix_len]
    space: dict[str, Any] = {
        "train.lr": {"loguniform": [3.0e-4, 3.0e-3]},
        "train.batch_size": {"choice": [16, 32, 64]},
        "train.grad_accum": {"choice": [1, 2]},
        "model.prefix_len": {"choice": prefixes},
    }
    mappings = [m for m in ("mlp", "transformer") if _allows(model, f"mapping.type={m}")]
    if len(mappings) > 1:
        space["model.mapping.type"] = {"choice": mappings}
    if model.lora.enabled:
        space |= {"model.lora.r": {"choice": [4, 8, 16]}, "model.lora.alpha": {"choice": [8, 16, 32]}}
    if model.decoder.pretrained is None:
        # Widths divisible by the 4 heads of the decoder and of the transformer mapping.
        space |= {
            "model.decoder.n_layer": {"choice": [2, 4, 6]},
            "model.decoder.n_embd": {"choice": [128, 256]},
        }
    return space


def _allows(model: CaptionConfig, override: str) -> bool:
    """Whether one ``key=value`` override of the model config gives a valid config."""
    try:
        model.with_overrides([override])
    except ConfigError:
        return False
    return True


def detector_space(config: DetectorRunConfig) -> dict[str, Any]:
    """The default detector search: learning rate, batch and nominal batch, warm-up, mosaic, input size."""
    imgsz = config.train.imgsz
    return {
        "train.lr0": {"loguniform": [2.0e-3, 3.0e-2]},
        "train.batch": {"choice": [8, 16, 32]},
        "train.nbs": {"choice": [16, 64]},
        "train.warmup_epochs": {"uniform": [0.0, 2.0]},
        "train.mosaic": {"uniform": [0.0, 1.0]},
        "train.imgsz": {"choice": sorted({max(32, imgsz - 32), imgsz, imgsz + 32})},
    }


def to_tune(space: Mapping[str, Any]) -> dict[str, Any]:
    """The Ray Tune ``param_space`` of a plain space: each ``{kind: args}`` becomes a Tune domain.

    Raises:
        ConfigError: An unknown kind, or arguments that do not fit it.
    """
    from ray import tune

    domains: dict[str, Callable[[Any], Any]] = {
        "loguniform": lambda a: tune.loguniform(*a),
        "uniform": lambda a: tune.uniform(*a),
        "randint": lambda a: tune.randint(*a),
        "choice": tune.choice,
        "grid": tune.grid_search,
    }
    param_space: dict[str, Any] = {}
    problems = []
    for key, spec in space.items():
        if not isinstance(spec, Mapping):
            param_space[key] = spec
            continue
        if len(spec) != 1 or next(iter(spec)) not in KINDS:
            problems.append(f"{key}: expected one of {{{', '.join(KINDS)}: [...]}}, got {dict(spec)}")
            continue
        kind, args = next(iter(spec.items()))
        if (
            not isinstance(args, list)
            or not args
            or (kind in ("loguniform", "uniform", "randint") and len(args) != 2)
        ):
            problems.append(
                f"{key}: {kind} takes a list ({'of values' if kind in ('choice', 'grid') else '[low, high]'})"
            )
            continue
        param_space[key] = domains[kind](args)
    if problems:
        raise ConfigError(*problems)
    return param_space


def overrides(params: Mapping[str, Any]) -> list[Override]:
    """A trial's parameters as ``(key, value)`` overrides of its config."""
    return [(key, value) for key, value in params.items()]


def check_space(space: Mapping[str, Any], config_class: type) -> None:
    """Fail before Ray starts when a key of the space is not a full dotted key of the config.

    Raises:
        ConfigError: Every unknown key, each with the nearest valid one.
    """
    valid = dotted_keys(config_class)
    unknown = [unknown_key_message(key, valid) for key in space if key not in valid]
    if unknown:
        raise ConfigError(*unknown)
