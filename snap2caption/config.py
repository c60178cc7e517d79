"""Typed configs and the one loader they all go through: preset or file -> YAML -> overrides -> dataclass.

A config is a (nested) dataclass whose fields document themselves (CONVENTIONS.md, 3). :func:`load_config`
reads a preset name (``training/configs/caption/tiny.yaml`` is the preset ``tiny`` of its folder) or a YAML
path, applies ``key=value`` overrides and builds the dataclass, checking every key and value on the way in:

- unknown keys are refused, with the nearest valid key suggested (``lora.rank``: did you mean ``lora.r``?);
- values are checked against the field's type (``int``, ``float``, ``bool``, ``str``, ``Literal[...]``,
  ``X | None``, ``list[X]``, nested dataclasses) and converted only where lossless;
- ``key=value`` overrides use dotted keys (``decoder.n_layer=2``) and YAML scalar/list syntax for values;
- every problem is reported at once, in one :class:`ConfigError`: unknown keys, values of the wrong type, and
  what each dataclass's own validation (``__post_init__``) refuses.

Two shapes of config file:

- **sectioned** (a training run): every field of the dataclass is a section, read from the top-level YAML key
  of its name (``run:``, ``model:``, ``train:``; a missing or empty one takes its defaults). An override
  names its section (``train.lr=1e-3``) or not (``lr=1e-3``): a bare key belongs to the one section that
  has it.
- **one section** of a file (``section="model"``): the dataclass is read from that top-level key, the others
  being left to their own configs; override keys are relative to it (``lora.r=8``, or ``model.lora.r=8``).

Usage::

    run = load_config(RunSections, "tiny", ["lr=1e-3", "run.out=/tmp/x"], presets="training/configs/caption")
    model = load_config(CaptionConfig, "training/configs/caption/tiny.yaml", section="model")
    to_dict(run)  # plain nested dict, JSON/YAML-safe

(``RunSections`` standing for a dataclass whose fields are the ``run``, ``model`` and ``train`` sections.)
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

# A "key=value" string (the value parsed as YAML), or a (key, value) pair whose value is taken as it is
# (a CLI option's value, already a string or a flag).
Override = str | tuple[str, Any]


class ConfigError(ValueError):
    """Config keys are unknown, values have the wrong type, or the values contradict each other.

    Attributes:
        problems: Every problem found, in order; the message joins them with ``"; "``.
    """

    def __init__(self, *problems: str) -> None:
        super().__init__("; ".join(problems))
        self.problems = list(problems)


def field_types(cls: type) -> dict[str, Any]:
    """The resolved type of each field of config dataclass ``cls``, in declaration order."""
    hints = get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def dotted_keys(cls: type, prefix: str = "") -> list[str]:
    """Every settable key of a (nested) config dataclass, dotted: ``["prefix_len", "encoder.name", ...]``."""
    keys = []
    for name, tp in field_types(cls).items():
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


def parse_override(item: Override) -> tuple[str, Any]:
    """Split ``"a.b=value"`` into the key and the value parsed as YAML (``""`` for an empty value); a
    ``(key, value)`` pair is returned as it is.

    Raises:
        ConfigError: Not ``key=value``, or a value that is not valid YAML.
    """
    if isinstance(item, tuple):
        return item
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
    data: dict[str, Any], overrides: Sequence[Override], valid: Sequence[str], *, sections: Sequence[str] = ()
) -> dict[str, Any]:
    """A deep copy of nested ``data`` with each ``"a.b=value"`` override set.

    Args:
        data: Parsed config (nested dicts).
        overrides: ``key=value`` strings (values parsed as YAML scalars or lists) or ``(key, value)`` pairs.
        valid: The settable dotted keys (see :func:`dotted_keys`).
        sections: Top-level sections a key may leave out: ``lr`` stands for ``train.lr`` when ``train`` is
            the only one of them with that key.

    Raises:
        ConfigError: Every override that is not ``key=value``, names an unknown key (nearest one suggested)
            or, without its section, fits several sections.
    """
    problems: list[str] = []
    data = _apply(data, overrides, valid, sections, problems)
    if problems:
        raise ConfigError(*problems)
    return data


def _apply(
    data: dict[str, Any],
    overrides: Sequence[Override],
    valid: Sequence[str],
    sections: Sequence[str],
    problems: list[str],
) -> dict[str, Any]:
    """:func:`apply_overrides`, appending what is wrong to ``problems`` and going on."""
    data = copy.deepcopy(data)
    for item in overrides:
        try:
            key, value = parse_override(item)
            set_dotted(data, _resolve_key(key, valid, sections), value)
        except ConfigError as exc:
            problems += exc.problems
    return data


def _resolve_key(key: str, valid: Sequence[str], sections: Sequence[str]) -> str:
    """``key`` itself when valid, else the one ``<section>.<key>`` that is.

    Raises:
        ConfigError: No such key (the nearest is suggested: relative to the section when there is one), or
            a key without its section that fits several.
    """
    if key in valid:
        return key
    matches = [f"{section}.{key}" for section in sections if f"{section}.{key}" in valid]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise ConfigError(f"config key {key!r} is ambiguous: say {' or '.join(map(repr, matches))}")
    bare = [k.partition(".")[2] for k in valid if k.partition(".")[0] in sections]
    raise ConfigError(unknown_key_message(key, bare if len(sections) == 1 else [*valid, *bare]))


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A YAML file's top-level mapping (``{}`` for an empty file).

    Raises:
        ConfigError: The file is not a mapping.
    """
    raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return raw


def load_yaml_section(path: str | os.PathLike[str], section: str) -> dict[str, Any]:
    """The mapping under top-level key ``section`` of a YAML file.

    Raises:
        ConfigError: The file is not a mapping; the section is missing or not a mapping.
    """
    value = read_yaml(path).get(section)
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: expected a top-level '{section}:' mapping")
    return value


def config_file(source: str | os.PathLike[str], presets: str | os.PathLike[str] | None = None) -> Path:
    """``<presets>/<name>.yaml`` for a preset name, else the YAML file ``source`` itself.

    A preset name has no path separator and no ``.yaml``/``.yml`` suffix.

    Raises:
        ConfigError: Neither a preset nor an existing file (the presets are listed, the nearest suggested).
    """
    text = str(source)
    if presets is not None and os.sep not in text and not text.endswith((".yaml", ".yml")):
        preset = Path(presets) / f"{text}.yaml"
        if preset.is_file():
            return preset
    path = Path(text)
    if path.is_file():
        return path
    names = sorted(p.stem for p in Path(presets).glob("*.yaml")) if presets is not None else []
    near = difflib.get_close_matches(text, names, n=1, cutoff=0.5)
    hint = (f"did you mean {near[0]!r}? " if near else "") + f"presets: {', '.join(names) or 'none'}"
    raise ConfigError(f"no config preset or file {text!r} ({hint})")


def load_config(
    cls: type[T],
    source: str | os.PathLike[str],
    overrides: Sequence[Override] = (),
    *,
    presets: str | os.PathLike[str] | None = None,
    section: str | None = None,
) -> T:
    """Load config dataclass ``cls`` from a preset or YAML file, with ``key=value`` overrides.

    Args:
        cls: The config dataclass: sectioned (every field a dataclass) unless ``section`` is given.
        source: A preset name (``<presets>/<name>.yaml``) or a YAML path.
        overrides: ``key=value`` strings or ``(key, value)`` pairs, applied in order (see the module
            docstring for how keys are written).
        presets: The folder of named presets (None: ``source`` must be a path).
        section: Read ``cls`` from this one top-level key, which must be there.

    Raises:
        ConfigError: Every problem found: no such preset or file, unknown keys (nearest suggested), values
            of the wrong type, and what the dataclasses' validation refuses.
    """
    path = config_file(source, presets)
    if section is not None:
        return build_config(cls, load_yaml_section(path, section), overrides, section=section)
    data = {key: {} if value is None else value for key, value in read_yaml(path).items()}  # empty: defaults
    return build_config(cls, data, overrides)


def build_config(
    cls: type[T], data: dict[str, Any], overrides: Sequence[Override] = (), *, section: str | None = None
) -> T:
    """Config dataclass ``cls`` from parsed ``data`` plus overrides, keys as in :func:`load_config`.

    Raises:
        ConfigError: Every problem found (see :func:`load_config`).
    """
    if section is None:
        sections = list(field_types(cls))
        valid = dotted_keys(cls)
    else:  # keys relative to the section; "<section>." in front is accepted
        sections, valid = [section], dotted_keys(cls, f"{section}.")
        data = {section: data}
    problems: list[str] = []
    data = _apply(data, overrides, valid, sections, problems)
    config = _build(cls, data[section] if section else data, "", problems)
    if problems:
        raise ConfigError(*problems)
    return cast(T, config)


def with_overrides(config: T, overrides: Sequence[Override], *, section: str | None = None) -> T:
    """A copy of config dataclass ``config`` with overrides applied, keys as in :func:`load_config`.

    Raises:
        ConfigError: Every problem found.
    """
    return build_config(type(config), to_dict(config), overrides, section=section)


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
        ConfigError: Every unknown key (nearest valid key suggested), value of the wrong type, and whatever
            the dataclasses' own validation (``__post_init__``) refuses.
    """
    problems: list[str] = []
    config = _build(cls, data, prefix, problems)
    if problems:
        raise ConfigError(*problems)
    return cast(T, config)


def _build(cls: type, data: Any, prefix: str, problems: list[str]) -> Any:
    """``cls`` from ``data``, or None with what is wrong appended to ``problems``.

    Every key and value is checked, so that one pass finds every problem; a dataclass's own validation
    runs once its fields are well-typed.
    """
    if not isinstance(data, dict):
        problems.append(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
        return None
    types_ = field_types(cls)
    kwargs: dict[str, Any] = {}
    found = len(problems)
    for name, value in data.items():
        tp = types_.get(name)
        if tp is None:
            sections = [prefix + n for n, t in types_.items() if dataclasses.is_dataclass(t)]
            problems.append(unknown_key_message(prefix + str(name), [*sections, *dotted_keys(cls, prefix)]))
        elif dataclasses.is_dataclass(tp):
            kwargs[name] = _build(cast(type, tp), value, f"{prefix}{name}.", problems)
        else:
            try:
                kwargs[name] = coerce(value, tp, prefix + name)
            except ConfigError as exc:
                problems += exc.problems
    if len(problems) > found:
        return None
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        problems += exc.problems
    except (TypeError, ValueError) as exc:
        problems.append(f"{prefix.rstrip('.') or 'config'}: {exc}")
    return None


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
