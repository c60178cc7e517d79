"""Typed configs shared by every job: dataclass <-> dict, YAML sections and ``key=value`` overrides.

A config is a (nested) dataclass whose fields document themselves (CONVENTIONS.md, 3). This module turns
parsed YAML into such a dataclass and back, checking every key and value on the way in:

- unknown keys are refused, with the nearest valid key suggested (``lora.rank``: did you mean ``lora.r``?);
- values are checked against the field's type (``int``, ``float``, ``bool``, ``str``, ``Literal[...]``,
  ``X | None``, ``list[X]``, nested dataclasses) and converted only where lossless;
- ``key=value`` overrides use dotted keys (``decoder.n_layer=2``) and YAML scalar/list syntax for values.

Usage::

    data = load_yaml_section("training/configs/caption/tiny.yaml", "train")
    cfg = from_dict(TrainConfig, apply_overrides(data, ["lr=1e-3"], dotted_keys(TrainConfig)))
    to_dict(cfg)  # plain nested dict, JSON/YAML-safe
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, cast, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config key is unknown, a value has the wrong type, or the values contradict each other."""


def dotted_keys(cls: type, prefix: str = "") -> list[str]:
    """Every settable key of a (nested) config dataclass, dotted: ``["prefix_len", "encoder.name", ...]``."""
    keys = []
    for name, tp in get_type_hints(cls).items():
        if dataclasses.is_dataclass(tp):
            keys += dotted_keys(cast(type, tp), f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def unknown_key_message(key: str, valid: Sequence[str]) -> str:
    """``unknown config key 'lora.rank' (did you mean 'lora.r'?)``, or the valid keys when none is close."""
    near = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"did you mean {near[0]!r}?" if near else f"valid keys: {', '.join(valid)}"
    return f"unknown config key {key!r} ({hint})"


def parse_override(item: str) -> tuple[str, Any]:
    """Split ``"a.b=value"`` into the key and the value parsed as YAML (``""`` for an empty value).

    Raises:
        ConfigError: Not ``key=value``, or a value that is not valid YAML.
    """
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not key=value")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({exc})") from None
    return key, value


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``data["a"]["b"] = value`` for key ``"a.b"``, creating missing mappings on the way."""
    node = data
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {key}: {part} is not a mapping")
    node[leaf] = value


def apply_overrides(
    data: dict[str, Any], overrides: Sequence[str], valid: Sequence[str], *, strip_prefix: str = ""
) -> dict[str, Any]:
    """A deep copy of nested ``data`` with each ``"a.b=value"`` override set.

    Args:
        data: Parsed config (nested dicts).
        overrides: ``key=value`` strings; values are parsed as YAML scalars or lists.
        valid: The settable dotted keys (see :func:`dotted_keys`).
        strip_prefix: A prefix callers may write before the key (``"model."``), removed first.

    Raises:
        ConfigError: An override that is not ``key=value``, or an unknown key (nearest one suggested).
    """
    data = copy.deepcopy(data)
    for item in overrides:
        key, value = parse_override(item)
        key = key.removeprefix(strip_prefix) if strip_prefix else key
        if key not in valid:
            raise ConfigError(unknown_key_message(key, valid))
        set_dotted(data, key, value)
    return data


def load_yaml_section(path: str | os.PathLike[str], section: str, *, required: bool = True) -> dict[str, Any]:
    """The mapping under top-level key ``section`` of a YAML file.

    Raises:
        ConfigError: The file is not a mapping; the section is missing (when ``required``) or not a mapping.
    """
    raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    value = raw.get(section)
    if value is None and not required:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: expected a top-level '{section}:' mapping")
    return value


def to_dict(config: Any) -> dict[str, Any]:
    """Plain nested dict of a config dataclass (JSON/YAML-safe)."""
    return dataclasses.asdict(config)


def from_dict(cls: type[T], data: Any, prefix: str = "") -> T:
    """Instantiate config dataclass ``cls`` from nested ``data``; missing keys take their defaults.

    Args:
        cls: The config dataclass.
        data: Parsed YAML / JSON.
        prefix: Dotted path of ``data`` inside a larger config, for error messages.

    Raises:
        ConfigError: An unknown key (nearest valid key suggested), a value of the wrong type, or whatever
            the dataclass's own validation (``__post_init__``) refuses.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = get_type_hints(cls)
    unknown = [k for k in data if k not in hints]
    if unknown:
        raise ConfigError(unknown_key_message(prefix + str(unknown[0]), dotted_keys(cls, prefix)))
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = from_dict(cast(type, tp), value, f"{prefix}{name}.")
        else:
            kwargs[name] = coerce(value, tp, prefix + name)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {exc}") from exc


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` (parsed YAML) against type ``tp`` and convert where lossless.

    Raises:
        ConfigError: The value does not fit the type.
    """
    origin = get_origin(tp)
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{key} must be one of {list(get_args(tp))}, got {value!r}")
        return value
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None:
            if type(None) in options:
                return None
            raise ConfigError(f"{key} may not be null")
        # bool first: YAML true/false must stay booleans in `bool | str`.
        for option in sorted((o for o in options if o is not type(None)), key=lambda o: o is not bool):
            try:
                return coerce(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} is not a {tp}")
    if origin is list:
        (item_tp,) = get_args(tp)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                raise ConfigError(f"{key} must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported type {tp}")  # a programming error in the dataclasses
