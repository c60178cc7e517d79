"""``snap2caption registry list|show|promote|rollback`` against a real MLflow SQLite registry."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from snap2caption.cli import main
from snap2caption.registry import Registry
from tests.snap2caption.registry.helpers import copy_db, register


@pytest.fixture
def registry(mlflow_template_db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Registry:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    return Registry(f"sqlite:///{copy_db(mlflow_template_db, tmp_path / 'registry')}")


def test_cli_list_show_promote_refusal_and_rollback(registry: Registry, tmp_path: Path) -> None:
    model = "captioner"  # the CLI uses the built-in gate table
    for cider in (3.0, 3.2):
        register(registry, model, tmp_path, cider)
        registry.promote(model)
    register(registry, model, tmp_path, 1.5)
    runner = CliRunner()
    base = ["registry", "--tracking-uri", registry.tracking_uri]

    listed = runner.invoke(main, [*base, "list", model])
    assert listed.exit_code == 0, listed.output
    assert "gate: test_cider_d" in listed.output
    assert re.search(r"^v3 +candidate ", listed.output, re.M)
    assert re.search(r"^v2 +production ", listed.output, re.M)
    assert "test_cider_d=1.5" in listed.output
    everything = runner.invoke(main, [*base, "list"])
    assert everything.exit_code == 0 and "captioner" in everything.output

    refused = runner.invoke(main, [*base, "promote", model])
    assert refused.exit_code == 3
    assert "refused" in refused.output and "1.5000" in refused.output and "3.2000" in refused.output

    forced = runner.invoke(main, [*base, "promote", model, "--force"])
    assert forced.exit_code == 1
    assert "reason" in forced.output and "Traceback" not in forced.output

    shown = runner.invoke(main, [*base, "show", f"{model}@production"])
    assert shown.exit_code == 0 and "captioner v2" in shown.output and "metric test_cider_d" in shown.output

    rolled = runner.invoke(main, [*base, "rollback", model])
    assert rolled.exit_code == 0 and "production is now v1" in rolled.output
    assert registry.resolve(model, "production").version == 1

    missing = runner.invoke(main, [*base, "show", "nosuchmodel@production"])
    assert missing.exit_code == 1 and "Error:" in missing.output and "Traceback" not in missing.output
