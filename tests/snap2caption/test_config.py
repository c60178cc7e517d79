"""The shared config helpers: dataclass <-> dict, YAML sections, key=value overrides, nearest-key hints."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from snap2caption.config import (
    ConfigError,
    apply_overrides,
    config_file,
    dotted_keys,
    from_dict,
    load_config,
    load_yaml_section,
    to_dict,
    with_overrides,
)


@dataclass
class Inner:
    size: int = 2
    names: list[str] = field(default_factory=lambda: ["a"])


@dataclass
class Outer:
    rate: float = 0.1
    mode: Literal["fast", "slow"] = "fast"
    path: str | None = None
    flag: bool | str = False
    inner: Inner = field(default_factory=Inner)

    def __post_init__(self) -> None:
        if self.rate < 0:
            raise ValueError("rate must be >= 0")


def test_round_trip_and_dotted_keys() -> None:
    cfg = Outer(rate=0.5, inner=Inner(size=3))
    assert from_dict(Outer, to_dict(cfg)) == cfg
    assert dotted_keys(Outer) == ["rate", "mode", "path", "flag", "inner.size", "inner.names"]


def test_overrides_are_coerced_to_the_field_types() -> None:
    data = apply_overrides(
        {},
        ["rate=1e-3", "mode=slow", "path=null", "flag=true", "inner.size=4", "inner.names=x,y"],
        dotted_keys(Outer),
    )
    cfg = from_dict(Outer, data)
    assert cfg == Outer(rate=0.001, mode="slow", path=None, flag=True, inner=Inner(size=4, names=["x", "y"]))
    assert from_dict(Outer, {"flag": "/some/file"}).flag == "/some/file"
    assert isinstance(from_dict(Outer, {"rate": 1}).rate, float)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"rat": 1.0}, "did you mean 'rate'"),
        ({"inner": {"sise": 1}}, "did you mean 'inner.size'"),
        ({"mode": "medium"}, "mode must be one of"),
        ({"inner": {"size": 1.5}}, "inner.size must be an integer"),
        ({"rate": -1.0}, "rate must be >= 0"),
        ({"inner": 3}, "inner: expected a mapping"),
    ],
)
def test_bad_keys_and_values_are_refused(data: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        from_dict(Outer, data)


def test_override_errors() -> None:
    with pytest.raises(ConfigError, match=r"did you mean 'inner\.size'"):
        apply_overrides({}, ["inner.sizes=3"], dotted_keys(Outer))
    with pytest.raises(ConfigError, match="not key=value"):
        apply_overrides({}, ["rate"], dotted_keys(Outer))
    # Every bad override at once, in order.
    with pytest.raises(ConfigError) as info:
        apply_overrides({}, ["rate", "inner.sizes=3", "mode=[unclosed"], dotted_keys(Outer))
    problems = info.value.problems
    assert len(problems) == 3
    assert problems[0] == "override 'rate' is not key=value"
    assert problems[1] == "unknown config key 'inner.sizes' (did you mean 'inner.size'?)"
    assert problems[2].startswith("override 'mode=[unclosed': the value is not valid YAML")


def test_yaml_sections(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  rate: 0.2\n", encoding="utf-8")
    assert load_yaml_section(path, "model") == {"rate": 0.2}
    with pytest.raises(ConfigError, match="expected a top-level 'train:' mapping"):
        load_yaml_section(path, "train")


def test_every_problem_is_reported_at_once() -> None:
    data = {"rat": 1.0, "mode": "medium", "inner": {"sise": 1, "size": 1.5}}
    with pytest.raises(ConfigError) as info:
        from_dict(Outer, data)
    assert info.value.problems == [
        "unknown config key 'rat' (did you mean 'rate'?)",
        "mode must be one of ['fast', 'slow'], got 'medium'",
        "unknown config key 'inner.sise' (did you mean 'inner.size'?)",
        "inner.size must be an integer, got 1.5",
    ]
    assert str(info.value) == "; ".join(info.value.problems)


# ----------------------------------------------------------------------------------------- the loader


@dataclass
class Where:
    name: str = "job"
    size: int = 1

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("where.name may not be empty")


@dataclass
class Job:
    """A sectioned config: ``where`` and ``outer`` both have a ``size`` somewhere, ``rate`` only ``outer``."""

    where: Where = field(default_factory=Where)
    outer: Outer = field(default_factory=Outer)


PRESET = """\
# a preset of the Job config
where:
  name: small
outer:
  rate: 0.5
  inner:
    size: 3
"""


@pytest.fixture()
def presets(tmp_path: Path) -> Path:
    folder = tmp_path / "presets"
    folder.mkdir()
    (folder / "small.yaml").write_text(PRESET, encoding="utf-8")
    return folder


def test_a_preset_by_name_or_by_path(presets: Path) -> None:
    job = load_config(Job, "small", presets=presets)
    assert job == Job(Where(name="small"), Outer(rate=0.5, inner=Inner(size=3)))
    assert load_config(Job, presets / "small.yaml") == job == load_config(Job, str(presets / "small.yaml"))
    assert config_file("small", presets) == presets / "small.yaml"
    with pytest.raises(
        ConfigError, match=r"no config preset or file 'smal' \(did you mean 'small'\? presets: small\)"
    ):
        load_config(Job, "smal", presets=presets)
    with pytest.raises(ConfigError, match=r"no config preset or file 'small' \(presets: none\)"):
        load_config(Job, "small")  # no preset folder: a path, which does not exist


def test_overrides_with_or_without_their_section(presets: Path) -> None:
    job = load_config(
        Job, "small", ["rate=0.25", "outer.mode=slow", "where.size=4", "name=big"], presets=presets
    )
    assert (job.outer.rate, job.outer.mode, job.where.size, job.where.name) == (0.25, "slow", 4, "big")
    # A (key, value) pair is taken as it is: no YAML parsing of a CLI option's value.
    assert load_config(Job, "small", [("outer.path", "null")], presets=presets).outer.path == "null"
    assert load_config(Job, "small", ["outer.path=null"], presets=presets).outer.path is None
    # "size" alone could be where.size or outer.inner.size... only where.size is a bare key of a section.
    assert load_config(Job, "small", ["size=7"], presets=presets).where.size == 7


def test_a_bare_key_in_two_sections_is_ambiguous() -> None:
    @dataclass
    class Twice:
        a: Where = field(default_factory=Where)
        b: Where = field(default_factory=Where)

    with pytest.raises(ConfigError, match=r"config key 'size' is ambiguous: say 'a\.size' or 'b\.size'"):
        with_overrides(Twice(), ["size=2"])
    assert with_overrides(Twice(), ["b.size=2"]) == Twice(b=Where(size=2))


def test_the_loader_reports_yaml_override_and_validation_problems_together(presets: Path) -> None:
    (presets / "bad.yaml").write_text(PRESET.replace("name: small", "nmae: small"), encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(Job, "bad", ["rat=1", "outer.rate=fast", "where.name="], presets=presets)
    assert info.value.problems == [
        "unknown config key 'rat' (did you mean 'rate'?)",
        "unknown config key 'where.nmae' (did you mean 'where.name'?)",
        "outer.rate must be a number, got 'fast'",
    ]
    # Once the keys and types are right, each section's own validation speaks.
    with pytest.raises(ConfigError, match=r"where\.name may not be empty; outer: rate must be >= 0"):
        load_config(Job, "small", ["where.name=", "rate=-1"], presets=presets)


def test_a_missing_or_empty_section_takes_its_defaults(presets: Path) -> None:
    (presets / "empty.yaml").write_text("where:\n", encoding="utf-8")
    assert load_config(Job, "empty", presets=presets) == Job()


def test_an_unknown_section_is_refused(presets: Path) -> None:
    (presets / "typo.yaml").write_text(PRESET.replace("outer:", "outr:"), encoding="utf-8")
    with pytest.raises(ConfigError, match=r"unknown config key 'outr' \(did you mean 'outer'\?\)"):
        load_config(Job, "typo", presets=presets)


def test_one_section_of_a_file(presets: Path) -> None:
    path = presets / "small.yaml"
    outer = load_config(Outer, path, ["inner.size=4", "outer.mode=slow"], section="outer")
    assert outer == Outer(
        rate=0.5, mode="slow", inner=Inner(size=4)
    )  # the where: section is not its business
    assert with_overrides(outer, ["outer.rate=2", "flag=yes"], section="outer") == Outer(
        rate=2.0, mode="slow", flag=True, inner=Inner(size=4)
    )
    # Keys relative to the section, in messages too.
    with pytest.raises(
        ConfigError, match=r"unknown config key 'inner\.sise' \(did you mean 'inner\.size'\?\)"
    ):
        load_config(Outer, path, ["inner.sise=4"], section="outer")
    with pytest.raises(ConfigError, match="expected a top-level 'model:' mapping"):
        load_config(Outer, path, section="model")
