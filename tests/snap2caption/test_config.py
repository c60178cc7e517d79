"""The shared config helpers: dataclass <-> dict, YAML sections, key=value overrides, nearest-key hints."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from snap2caption.config import (
    ConfigError,
    apply_overrides,
    dotted_keys,
    from_dict,
    load_yaml_section,
    to_dict,
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
    assert apply_overrides({}, ["model.rate=2"], dotted_keys(Outer), strip_prefix="model.") == {"rate": 2}


def test_yaml_sections(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  rate: 0.2\n", encoding="utf-8")
    assert load_yaml_section(path, "model") == {"rate": 0.2}
    assert load_yaml_section(path, "train", required=False) == {}
    with pytest.raises(ConfigError, match="expected a top-level 'train:' mapping"):
        load_yaml_section(path, "train")
