"""Registry client against a real MLflow SQLite registry in a temporary folder.

MLflow's first database migration takes seconds, so the tests copy the migrated template database of
``tests/conftest.py`` (``mlflow_template_db``) for every registry they need; they share one registry and
keep apart by model name.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from snap2caption.cli import main
from snap2caption.registry import (
    GATES,
    MANIFEST_NAME,
    TAG_OVERRIDE,
    TAG_OVERRIDE_BY,
    TAG_OVERRIDE_REASON,
    ArtifactIntegrityError,
    Gate,
    ModelNotFoundError,
    PromotionError,
    Registry,
    RegistryError,
    RollbackError,
    parse_model_ref,
    verify_manifest,
    write_manifest,
)

CAPTION_GATE = Gate("test_cider_d", higher_is_better=True, default_margin=0.05)


def _copy_db(template: Path, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    db = folder / "mlflow.db"
    shutil.copyfile(template, db)
    return db


@pytest.fixture(scope="module")
def registry(mlflow_template_db: Path, tmp_path_factory: pytest.TempPathFactory) -> Registry:
    db = _copy_db(mlflow_template_db, tmp_path_factory.mktemp("shared"))
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


def make_model(folder: Path, seed: str = "a") -> Path:
    """A small model folder in the project's shape, with its manifest."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"hidden": 32, "seed": seed}))
    (folder / "model.safetensors").write_bytes(seed.encode() * 1000)
    (folder / "tokenizer.json").write_text('{"version": "1.0"}')
    (folder / "README.md").write_text(f"# model {seed}\n")
    (folder / "onnx").mkdir()
    (folder / "onnx" / "model.onnx").write_bytes(b"\x08\x07" + seed.encode() * 10)
    write_manifest(folder)
    return folder


def register(registry: Registry, name: str, tmp_path: Path, cider: float, seed: str | None = None) -> int:
    seed = seed or f"{cider}"
    folder = make_model(tmp_path / f"{name}-{seed}", seed)
    return registry.register(name, folder, metrics={"test_cider_d": cider, "test_bleu4": 0.5}).version


def files_of(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


# ------------------------------------------------------------------------------------------ manifest


def test_manifest_detects_changed_extra_and_pickled_files(tmp_path: Path) -> None:
    folder = make_model(tmp_path / "m")
    digest = verify_manifest(folder)
    assert verify_manifest(folder, expected_sha256=digest) == digest
    # The shape snap2caption.models.artifact writes for caption models, so either side reads the other's.
    listed = json.loads((folder / MANIFEST_NAME).read_text())["files"]
    assert set(listed) == {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "README.md",
        "onnx/model.onnx",
    }
    assert listed["model.safetensors"]["bytes"] == 1000 and len(listed["model.safetensors"]["sha256"]) == 64

    (folder / "extra.json").write_text("{}")
    with pytest.raises(ArtifactIntegrityError, match="not in the manifest"):
        verify_manifest(folder)
    (folder / "extra.json").unlink()

    (folder / "onnx" / "model.onnx").write_bytes(b"tampered")
    with pytest.raises(ArtifactIntegrityError, match=r"model\.onnx"):
        verify_manifest(folder)
    # Rewriting the manifest makes the folder consistent again, but not the registered digest.
    write_manifest(folder)
    with pytest.raises(ArtifactIntegrityError, match="registered"):
        verify_manifest(folder, expected_sha256=digest)

    (folder / "weights.pt").write_bytes(b"\x80\x04")
    with pytest.raises(ArtifactIntegrityError, match="pickle"):
        write_manifest(folder)


def test_parse_model_ref() -> None:
    assert parse_model_ref("captioner@production") == ("captioner", "production")
    assert parse_model_ref("models:/detector/3") == ("detector", "3")
    with pytest.raises(RegistryError):
        parse_model_ref("captioner")


# ------------------------------------------------------------------------------------------ register


def test_register_sets_candidate_and_stores_gate_metric(
    registry: Registry, name: str, tmp_path: Path
) -> None:
    folder = make_model(tmp_path / "m")
    info = registry.register(
        name, folder, metrics={"test_cider_d": 3.1, "test_bleu4": 0.62}, tags={"git_commit": "abc123"}
    )
    assert info.version == 1
    assert info.aliases == ("candidate",)
    assert info.metrics == {"test_cider_d": 3.1, "test_bleu4": 0.62}
    assert info.tags["git_commit"] == "abc123"
    assert info.status == "READY"
    assert registry.resolve(name, "candidate").version == 1
    # Plain files in the run's artifact folder under the registry's artifact root; no MLmodel, no pickle.
    assert registry.artifact_root is not None
    source = Path(info.source.removeprefix("file://"))
    assert source.is_relative_to(registry.artifact_root)
    assert files_of(source) == files_of(folder)

    rows = registry.list_versions(name)
    assert [(r.version, r.aliases, r.run_id) for r in rows] == [(1, ("candidate",), info.run_id)]


def test_register_refuses_missing_gate_metric_and_missing_manifest(
    registry: Registry, name: str, tmp_path: Path
) -> None:
    folder = make_model(tmp_path / "m")
    with pytest.raises(RegistryError, match="test_cider_d"):
        registry.register(name, folder, metrics={"test_bleu4": 0.5})
    with pytest.raises(RegistryError, match="not finite"):
        registry.register(name, folder, metrics={"test_cider_d": float("nan")})
    (folder / MANIFEST_NAME).unlink()
    with pytest.raises(ArtifactIntegrityError, match="write_manifest"):
        registry.register(name, folder, metrics={"test_cider_d": 1.0})


def test_register_into_an_existing_training_run(registry: Registry, name: str, tmp_path: Path) -> None:
    client = registry._client
    run = client.create_run(registry.ensure_experiment("training-test"))
    info = registry.register(
        name, make_model(tmp_path / "m"), metrics={"test_cider_d": 1.0}, run_id=run.info.run_id
    )
    assert info.run_id == run.info.run_id
    assert info.source.startswith(run.info.artifact_uri)


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


# ------------------------------------------------------------------------------------------ download


def test_download_by_alias_verifies_files(registry: Registry, name: str, tmp_path: Path) -> None:
    folder = make_model(tmp_path / "m", "download")
    registry.register(name, folder, metrics={"test_cider_d": 1.0})
    registry.promote(name)

    path, info = registry.download(name, "production", tmp_path / "cache")
    assert info.version == 1 and "production" in info.aliases
    assert path == tmp_path / "cache" / name / "v1"
    assert files_of(path) == files_of(folder)
    # Cached: a second call reuses the verified folder.
    assert registry.download(name, 1, tmp_path / "cache")[0] == path

    with pytest.raises(ModelNotFoundError):
        registry.download(name, "staging", tmp_path / "cache")


def test_download_refuses_tampered_artifacts(registry: Registry, name: str, tmp_path: Path) -> None:
    info = registry.register(name, make_model(tmp_path / "m", "tamper"), metrics={"test_cider_d": 1.0})
    stored = Path(info.source.removeprefix("file://"))

    (stored / "model.safetensors").write_bytes(b"evil weights")
    with pytest.raises(ArtifactIntegrityError, match=r"model\.safetensors"):
        registry.download(name, "candidate", tmp_path / "cache")
    assert not (tmp_path / "cache" / name / "v1").exists()
    assert [p.name for p in (tmp_path / "cache" / name).iterdir()] == []

    # Tampering with the manifest as well is caught by the digest kept in the registry database.
    write_manifest(stored)
    with pytest.raises(ArtifactIntegrityError, match="registered"):
        registry.download(name, "candidate", tmp_path / "cache")


# ------------------------------------------------------------------------------------------ CLI


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


# ------------------------------------------------------------------------------------------ storage


def test_tracking_uri_env_is_honoured(
    mlflow_template_db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    db = _copy_db(mlflow_template_db, tmp_path / "elsewhere")
    uri = f"sqlite:///{db}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    reg = Registry()
    assert reg.tracking_uri == uri
    reg.register("tagger", make_model(tmp_path / "m"), metrics={"test_top1": 0.7})
    version = MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version_by_alias(
        "tagger", "candidate"
    )
    assert version.version == 1
    assert reg.artifact_root == db.parent / "artifacts"


def test_default_is_sqlite_under_home_with_local_artifacts(
    mlflow_template_db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    _copy_db(mlflow_template_db, home / "mlflow")  # skip a second migration; the file is what matters
    monkeypatch.setenv("SNAP2CAPTION_HOME", str(home))
    monkeypatch.chdir(tmp_path)
    reg = Registry()
    assert reg.tracking_uri == f"sqlite:///{home / 'mlflow' / 'mlflow.db'}"
    experiment = reg._client.get_experiment(reg.ensure_experiment("some-training"))
    assert experiment.artifact_location == (home / "mlflow" / "artifacts" / "some-training").as_uri()
    info = reg.register("detector", make_model(tmp_path / "m"), metrics={"test_map50_95": 0.72})
    assert Path(info.source.removeprefix("file://")).is_relative_to(home / "mlflow" / "artifacts")
    assert not (tmp_path / "mlruns").exists()
    assert GATES["detector"].metric == "test_map50_95"


def test_mlflow_is_quiet(registry: Registry) -> None:
    # Set (with setdefault) before MLflow is imported: no telemetry thread, no progress bars.
    assert os.environ.get("MLFLOW_DISABLE_TELEMETRY") == "true"
    assert os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR") == "false"
    assert os.environ.get("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT") == "true"
