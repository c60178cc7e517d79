"""One real MLflow SQLite registry in a temporary folder, shared by a module's tests (apart by model name)."""

from __future__ import annotations

from pathlib import Path

import pytest

from snap2caption.registry import Gate, Registry
from tests.snap2caption.registry.helpers import copy_db

CAPTION_GATE = Gate("test_cider_d", higher_is_better=True, default_margin=0.05)


@pytest.fixture(scope="module")
def registry(mlflow_template_db: Path, tmp_path_factory: pytest.TempPathFactory) -> Registry:
    db = copy_db(mlflow_template_db, tmp_path_factory.mktemp("shared"))
    return Registry(f"sqlite:///{db}")


@pytest.fixture
def name(registry: Registry, request: pytest.FixtureRequest) -> str:
    """A model name of this test's own, gated like the captioner."""
    model = "cap-" + "".join(c if c.isalnum() else "-" for c in request.node.name)[:80]
    registry.gates[model] = CAPTION_GATE
    return model


@pytest.fixture(autouse=True)
def _no_ambient_mlflow_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
