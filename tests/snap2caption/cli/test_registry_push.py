"""``snap2caption registry push``: copy versions from one real MLflow registry into another.

Both registries are SQLite files here (copies of the migrated template database); the compose test
(``tests/containers/``) pushes the same way into a real MLflow tracking server in a container.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from snap2caption.cli import main
from snap2caption.cli.registry import GATE_REFUSED_EXIT
from snap2caption.registry import Registry
from snap2caption.registry.versions import TAG_MANIFEST_SHA256
from tests.snap2caption.registry.helpers import files_of, make_model


@pytest.fixture
def registries(mlflow_template_db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[Registry]:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    out = []
    for side in ("source", "target"):
        (tmp_path / side).mkdir()
        shutil.copyfile(mlflow_template_db, tmp_path / side / "mlflow.db")
        out.append(Registry(f"sqlite:///{tmp_path / side / 'mlflow.db'}"))
    return out


def push(source: Registry, target: Registry, *args: str) -> Result:
    return CliRunner().invoke(
        main, ["registry", "--tracking-uri", source.tracking_uri, "push", "--to", target.tracking_uri, *args]
    )


def test_push_copies_production_with_files_metrics_and_provenance(
    registries: list[Registry], tmp_path: Path
) -> None:
    source, target = registries
    folder = make_model(tmp_path / "m1", "one")
    source.register("captioner", folder, metrics={"test_cider_d": 1.5}, tags={"git_commit": "abc"})
    source.promote("captioner")
    source.register("detector", make_model(tmp_path / "d1", "det"), metrics={"test_map50_95": 0.4})
    # detector has a candidate only: `push` without names takes the models that have `production`

    result = push(source, target)
    assert result.exit_code == 0, result.output
    assert "captioner: v1 ->" in result.output and "detector" not in result.output
    there = target.resolve("captioner", "production")
    assert there.metrics == {"test_cider_d": 1.5}
    assert there.tags["git_commit"] == "abc"
    assert there.tags["pushed_from"] == f"{source.tracking_uri} models:/captioner/1"
    assert "promoted_at" in there.tags  # written by the target's own promotion
    assert target.list_models() == ["captioner"]
    downloaded, _ = target.download("captioner", "production", tmp_path / "cache")
    assert files_of(downloaded) == files_of(folder)

    again = push(source, target)  # the same files are production there already: nothing registered
    assert again.exit_code == 0, again.output
    assert "already production there as v1" in again.output
    assert [v.version for v in target.list_versions("captioner")] == [1]


def test_push_goes_through_the_targets_gate(registries: list[Registry], tmp_path: Path) -> None:
    source, target = registries
    target.register("captioner", make_model(tmp_path / "t", "there"), metrics={"test_cider_d": 2.0})
    target.promote("captioner")
    source.register("captioner", make_model(tmp_path / "s", "worse"), metrics={"test_cider_d": 1.0})
    source.promote("captioner")

    refused = push(source, target, "captioner")
    assert refused.exit_code == GATE_REFUSED_EXIT, refused.output
    assert "refused" in refused.output
    assert target.resolve("captioner", "production").version == 1
    assert target.resolve("captioner", "candidate").version == 2  # pushed, waiting as the candidate

    kept = push(source, target, "captioner", "--no-promote")  # a third copy, left as candidate only
    assert kept.exit_code == 0, kept.output
    assert target.resolve("captioner", "candidate").version == 3
    assert (
        target.resolve("captioner", "candidate").tags[TAG_MANIFEST_SHA256]
        == source.resolve("captioner", "production").tags[TAG_MANIFEST_SHA256]
    )


def test_push_with_nothing_to_push_is_one_clear_error(registries: list[Registry]) -> None:
    source, target = registries
    result = push(source, target)
    assert result.exit_code == 1
    assert "Error: no model has the alias 'production'" in result.output
    assert "Traceback" not in result.output


def test_push_of_tampered_files_is_one_clear_error(registries: list[Registry], tmp_path: Path) -> None:
    source, target = registries
    info = source.register("captioner", make_model(tmp_path / "m", "tamper"), metrics={"test_cider_d": 1.0})
    source.promote("captioner")
    (Path(info.source.removeprefix("file://")) / "model.safetensors").write_bytes(b"evil weights")

    result = push(source, target, "captioner")
    assert result.exit_code == 1
    assert "Error:" in result.output and "model.safetensors was modified" in result.output
    assert "Traceback" not in result.output
    assert target.list_models() == []  # nothing registered there
