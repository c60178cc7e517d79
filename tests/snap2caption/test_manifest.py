"""The one manifest of every model folder: its format, and what its check refuses."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from snap2caption.errors import ArtifactError, ArtifactIntegrityError
from snap2caption.manifest import MANIFEST_NAME, verify_manifest, write_manifest
from tests.snap2caption.registry.helpers import make_model


def test_format_is_the_one_existing_artifacts_hold(tmp_path: Path) -> None:
    # Caption, detector and tagger folders already written (and registered) carry exactly these bytes:
    # sorted keys, two-space indent, POSIX paths, a final newline. A change here orphans every one of them.
    (tmp_path / "onnx").mkdir()
    (tmp_path / "config.json").write_bytes(b"{}")
    (tmp_path / "onnx" / "model.onnx").write_bytes(b"\x08\x07onnx")
    sha = {
        name: hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()
        for name in ("config.json", "onnx/model.onnx")
    }
    expected = (
        "{\n"
        '  "files": {\n'
        '    "config.json": {\n'
        '      "bytes": 2,\n'
        f'      "sha256": "{sha["config.json"]}"\n'
        "    },\n"
        '    "onnx/model.onnx": {\n'
        '      "bytes": 6,\n'
        f'      "sha256": "{sha["onnx/model.onnx"]}"\n'
        "    }\n"
        "  }\n"
        "}\n"
    )
    digest = write_manifest(tmp_path)
    assert (tmp_path / MANIFEST_NAME).read_text(encoding="utf-8") == expected
    assert digest == hashlib.sha256(expected.encode()).hexdigest() == verify_manifest(tmp_path)


def test_manifest_detects_changed_extra_and_pickled_files(tmp_path: Path) -> None:
    folder = make_model(tmp_path / "m")
    digest = verify_manifest(folder)
    assert verify_manifest(folder, expected_sha256=digest) == digest
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


def test_listed_files_must_be_there_and_required_ones_listed(tmp_path: Path) -> None:
    folder = make_model(tmp_path / "m")
    verify_manifest(folder, required=("config.json", "onnx/model.onnx"))
    with pytest.raises(ArtifactIntegrityError, match=r"does not list \['weights\.safetensors'\]"):
        verify_manifest(folder, required=("config.json", "weights.safetensors"))

    (folder / "tokenizer.json").unlink()
    with pytest.raises(
        ArtifactIntegrityError, match=r"tokenizer\.json is listed in MANIFEST\.json but missing"
    ):
        verify_manifest(folder)


@pytest.mark.parametrize(
    "manifest",
    [
        b"not json",
        b'{"files": ["config.json"]}',
        b'{"files": {"config.json": {"bytes": 2}}}',
        b'{"sha256": {}}',
    ],
)
def test_an_invalid_manifest_is_refused(tmp_path: Path, manifest: bytes) -> None:
    (tmp_path / "config.json").write_bytes(b"{}")
    (tmp_path / MANIFEST_NAME).write_bytes(manifest)
    with pytest.raises(ArtifactIntegrityError, match="is not a valid manifest"):
        verify_manifest(tmp_path)


def test_a_path_outside_the_folder_is_never_read(tmp_path: Path) -> None:
    (tmp_path / "secret").write_bytes(b"outside")
    folder = tmp_path / "m"
    folder.mkdir()
    entry = {"bytes": 7, "sha256": hashlib.sha256(b"outside").hexdigest()}
    (folder / MANIFEST_NAME).write_text(json.dumps({"files": {"../secret": entry}}))
    with pytest.raises(ArtifactIntegrityError, match=r"\.\./secret is listed in MANIFEST\.json but missing"):
        verify_manifest(folder)


def test_symbolic_links_are_refused_both_ways(tmp_path: Path) -> None:
    folder = make_model(tmp_path / "m")
    (tmp_path / "weights.safetensors").write_bytes(b"elsewhere")
    (folder / "linked.safetensors").symlink_to(tmp_path / "weights.safetensors")
    with pytest.raises(ArtifactIntegrityError, match="symbolic link"):
        verify_manifest(folder)
    with pytest.raises(ArtifactIntegrityError, match="symbolic link"):
        write_manifest(folder)


def test_one_error_type_for_every_manifest_failure() -> None:
    # The registry, the loaders and the services' /readyz all report this code for a failed check.
    assert issubclass(ArtifactIntegrityError, ArtifactError)
    assert ArtifactIntegrityError.code == "artifact_integrity"
