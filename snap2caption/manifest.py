"""The hash manifest of a model folder: ``MANIFEST.json`` lists the size and sha256 of every other file.

Every model artifact (caption, detector, tagger) is a plain folder of files (safetensors, ONNX, JSON, a
model card) that carries one. The models write it when they save, the registry checks it at registration
and after every download, and the loaders check it before they read a byte. This module is the one
writer and the one checker, so all of them agree by construction.

Format (sorted keys, two-space indent, a final newline; paths POSIX-style, relative to the folder)::

    {"files": {"config.json": {"bytes": 912, "sha256": "..."}, "onnx/encoder.onnx": {...}, ...}}

A model folder is self-contained and holds no pickles: symbolic links and files with a pickle suffix are
refused when the manifest is written and when it is checked.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

from snap2caption.errors import ArtifactIntegrityError
from snap2caption.hashing import sha256_file

MANIFEST_NAME = "MANIFEST.json"

# Files that hold (or usually hold) pickles. A model folder with one gets no manifest and never
# verifies, so neither the registry nor a loader hands it on.
PICKLE_SUFFIXES = frozenset({".pkl", ".pickle", ".pt", ".pth", ".ckpt", ".bin", ".joblib"})


def write_manifest(model_dir: str | os.PathLike[str]) -> str:
    """Write ``MANIFEST.json`` listing the sha256 and size of every file in ``model_dir``.

    Call it again after adding files to a model folder (an ONNX export, a model card).

    Args:
        model_dir: The model folder; subfolders are included.

    Returns:
        The sha256 of the manifest file written (what the registry stores to vouch for it).

    Raises:
        ArtifactIntegrityError: Not a folder, or the folder holds a symlink or a pickle-type file.
    """
    root = Path(model_dir)
    if not root.is_dir():
        raise ArtifactIntegrityError(f"{root} is not a directory")
    files = {
        rel: {"sha256": sha256_file(path), "bytes": path.stat().st_size} for rel, path in _model_files(root)
    }
    data = (json.dumps({"files": files}, indent=2, sort_keys=True) + "\n").encode()
    (root / MANIFEST_NAME).write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def verify_manifest(
    model_dir: str | os.PathLike[str],
    *,
    expected_sha256: str | None = None,
    required: Collection[str] = (),
) -> str:
    """Check every file in ``model_dir`` against its ``MANIFEST.json``.

    The folder must hold exactly the files the manifest lists (an extra file is refused too: a loader
    could pick it up), each with the listed size and sha256.

    Args:
        model_dir: The model folder.
        expected_sha256: When given, the manifest file itself must have this sha256 (the value the
            registry stored at registration), so a file and its manifest entry cannot be swapped together.
        required: Files the manifest must list (a model's own, e.g. its weights and config), so that a
            folder cut down and re-hashed is refused here rather than half-loaded.

    Returns:
        The sha256 of the manifest file.

    Raises:
        ArtifactIntegrityError: Anything missing, extra, altered, or not a valid manifest.
    """
    root = Path(model_dir)
    manifest_path = root / MANIFEST_NAME
    if not manifest_path.is_file():
        raise ArtifactIntegrityError(f"{root}: no readable {MANIFEST_NAME} (write one with write_manifest)")
    data = manifest_path.read_bytes()
    manifest_sha = hashlib.sha256(data).hexdigest()
    if expected_sha256 is not None and manifest_sha != expected_sha256:
        raise ArtifactIntegrityError(
            f"{root}: {MANIFEST_NAME} sha256 {manifest_sha[:12]}… differs from the registered "
            f"{expected_sha256[:12]}…"
        )
    listed = _parse(root, data)
    unlisted = sorted(set(required) - set(listed))
    if unlisted:
        raise ArtifactIntegrityError(f"{root}: {MANIFEST_NAME} does not list {unlisted}")

    present = dict(_model_files(root))
    missing = sorted(set(listed) - set(present))
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        raise ArtifactIntegrityError(
            f"{root}: {', '.join(missing)} {verb} listed in {MANIFEST_NAME} but missing"
        )
    extra = sorted(set(present) - set(listed))
    if extra:
        raise ArtifactIntegrityError(f"{root}: files not in the manifest: {extra}")
    for rel, entry in listed.items():
        path = present[rel]
        size, sha = path.stat().st_size, sha256_file(path)
        if size != entry["bytes"] or sha != entry["sha256"]:
            raise ArtifactIntegrityError(
                f"{root}: {rel} was modified after saving ({size} bytes, sha256 {sha[:12]}…; "
                f"{MANIFEST_NAME} says {entry['bytes']} bytes, {str(entry['sha256'])[:12]}…)"
            )
    return manifest_sha


def _parse(root: Path, data: bytes) -> dict[str, dict[str, Any]]:
    """The ``files`` map of a manifest, each entry checked to be ``{"bytes", "sha256"}``."""
    try:
        listed = json.loads(data)["files"]
        if not isinstance(listed, dict):
            raise TypeError("'files' is not an object")
        for rel, entry in listed.items():
            if not isinstance(entry, dict) or not {"bytes", "sha256"} <= entry.keys():
                raise TypeError(f"entry {rel!r} is not {{'bytes', 'sha256'}}")
    except (ValueError, KeyError, TypeError) as exc:
        raise ArtifactIntegrityError(f"{root}: {MANIFEST_NAME} is not a valid manifest: {exc}") from exc
    return listed


def _model_files(root: Path) -> Iterator[tuple[str, Path]]:
    """Yield ``(posix relative path, path)`` for every file under ``root`` except the manifest."""
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            # A link could point anywhere on the machine; a model folder is self-contained.
            raise ArtifactIntegrityError(f"{root}: symbolic link {rel!r} is not allowed in a model folder")
        if path.is_dir() or rel == MANIFEST_NAME:
            continue
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise ArtifactIntegrityError(
                f"{root}: {rel!r} looks like a pickle ({path.suffix}); use safetensors, ONNX or JSON"
            )
        yield rel, path
