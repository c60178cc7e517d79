"""Promotion through the gate and rollback along the production history, on a real MLflow registry."""

from __future__ import annotations

from pathlib import Path

import pytest

from snap2caption.registry import PromotionError, Registry, RollbackError
from snap2caption.registry.versions import TAG_OVERRIDE, TAG_OVERRIDE_BY, TAG_OVERRIDE_REASON
from tests.snap2caption.registry.helpers import register

# ------------------------------------------------------------------------------------------ promote


def test_promote_without_production_promotes(registry: Registry, name: str, tmp_path: Path) -> None:
    register(registry, name, tmp_path, 2.0)
    result = registry.promote(name)
    assert result.status == "promoted"
    assert result.promoted
    assert registry.resolve(name, "production").version == 1
    assert registry.production_history(name) == ["1"]
    assert registry.promote(name).status == "unchanged"


def test_worse_candidate_refused_production_unchanged(registry: Registry, name: str, tmp_path: Path) -> None:
    register(registry, name, tmp_path, 3.0)
    registry.promote(name)
    register(registry, name, tmp_path, 2.5)
    result = registry.promote(name, margin=0.1)
    assert result.status == "refused"
    assert not result.promoted
    assert (result.candidate_value, result.production_value, result.margin) == (2.5, 3.0, 0.1)
    assert "test_cider_d" in result.message and "3.0000" in result.message and "2.5000" in result.message
    assert registry.resolve(name, "production").version == 1
    assert registry.resolve(name, "candidate").version == 2


def test_candidate_within_margin_promoted(registry: Registry, name: str, tmp_path: Path) -> None:
    register(registry, name, tmp_path, 3.0)
    registry.promote(name)
    register(registry, name, tmp_path, 2.96)
    result = registry.promote(name, margin=0.05)
    assert result.status == "promoted"
    assert registry.resolve(name, "production").version == 2
    assert result.previous is not None and result.previous.version == 1


def test_force_needs_reason_and_override_is_recorded(registry: Registry, name: str, tmp_path: Path) -> None:
    register(registry, name, tmp_path, 3.0)
    registry.promote(name)
    register(registry, name, tmp_path, 1.0)
    for reason in (None, "   "):
        with pytest.raises(PromotionError, match="reason"):
            registry.promote(name, force=True, reason=reason)
    assert registry.resolve(name, "production").version == 1

    result = registry.promote(name, force=True, reason="hotfix for a tokenizer bug")
    assert result.status == "overridden"
    prod = registry.resolve(name, "production")
    assert prod.version == 2
    assert prod.tags[TAG_OVERRIDE] == "true"
    assert prod.tags[TAG_OVERRIDE_REASON] == "hotfix for a tokenizer bug"
    assert prod.tags[TAG_OVERRIDE_BY]
    [entry] = registry.override_history(name)
    assert entry["version"] == "2" and entry["from_version"] == "1"
    assert entry["reason"] == "hotfix for a tokenizer bug"
    assert "fails" in entry["gate"]


def test_promote_without_candidate_is_a_clear_error(registry: Registry, name: str) -> None:
    registry.ensure_registered_model(name)
    with pytest.raises(PromotionError, match="candidate"):
        registry.promote(name)


# ------------------------------------------------------------------------------------------ rollback


def test_rollback_steps_back_through_history(registry: Registry, name: str, tmp_path: Path) -> None:
    for cider in (1.0, 2.0, 3.0):
        register(registry, name, tmp_path, cider)
        assert registry.promote(name).promoted
    assert registry.production_history(name) == ["1", "2", "3"]

    assert registry.rollback(name).version == 2
    assert registry.rollback(name).version == 1
    assert registry.resolve(name, "production").version == 1
    with pytest.raises(RollbackError, match="no previous"):
        registry.rollback(name)
    assert registry.resolve(name, "production").version == 1

    # v3 is still the candidate, but it was rolled back: the gate will not put it back quietly.
    result = registry.promote(name)
    assert result.status == "refused" and "rolled back" in result.message


def test_rollback_without_production_is_a_clear_error(registry: Registry, name: str, tmp_path: Path) -> None:
    register(registry, name, tmp_path, 1.0)
    with pytest.raises(RollbackError, match="no production"):
        registry.rollback(name)
