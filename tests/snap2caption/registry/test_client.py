"""The registry client against a real MLflow SQLite registry: register, download, where it keeps things."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from snap2caption.errors import ArtifactIntegrityError
from snap2caption.manifest import MANIFEST_NAME, write_manifest
from snap2caption.registry import GATES, ModelNotFoundError, Registry, RegistryError
from tests.snap2caption.registry.helpers import copy_db, files_of, make_model

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


# ------------------------------------------------------------------------------------------ storage


def test_tracking_uri_env_is_honoured(
    mlflow_template_db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    db = copy_db(mlflow_template_db, tmp_path / "elsewhere")
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
    copy_db(mlflow_template_db, home / "mlflow")  # skip a second migration; the file is what matters
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
