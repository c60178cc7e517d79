"""What every model's ``load`` shares: the artifact folder a reference names, verified, and the runtime
choice of the detector and the tagger (ONNX Runtime, PyTorch, or whichever fits).

("Runtime" is what runs a model in this process; "backend" is kept for the gateway's remote services.)
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Literal

from snap2caption.manifest import verify_manifest
from snap2caption.models.uri import resolve_model_dir

Runtime = Literal["onnx", "torch"]
RuntimeChoice = Literal["auto", "onnx", "torch"]


def artifact_folder(
    source: str | Path,
    required: Collection[str],
    *,
    verify: bool = True,
    tracking_uri: str | None = None,
    cache_dir: str | Path | None = None,
) -> Path:
    """The local folder of an artifact: a folder as it is, or a registry reference downloaded.

    Args:
        source: An artifact folder, or ``models:/NAME@ALIAS`` / ``models:/NAME/VERSION``.
        required: Files the model's manifest must list (its weights, its config).
        verify: Check every file against ``MANIFEST.json``.
        tracking_uri: MLflow tracking URI for registry references.
        cache_dir: Download cache for registry references.

    Raises:
        NotFound: A path that is not a folder.
        ArtifactIntegrityError: ``verify`` and the files do not match the manifest.
    """
    folder = resolve_model_dir(str(source), tracking_uri=tracking_uri, cache_dir=cache_dir)
    if verify:
        verify_manifest(folder, required=required)
    return folder


def resolve_runtime(choice: RuntimeChoice, folder: Path, onnx_file: str, *, int8: bool = False) -> Runtime:
    """``onnx`` or ``torch``: the choice itself, or for ``auto`` ONNX when the artifact has ``onnx_file``.

    Raises:
        ValueError: Not a runtime choice, or ``int8`` (an ONNX variant) with ``torch``.
    """
    if choice not in ("auto", "onnx", "torch"):
        raise ValueError(f"runtime must be 'auto', 'onnx' or 'torch', got {choice!r}")
    runtime: Runtime = choice if choice != "auto" else "onnx" if (folder / onnx_file).is_file() else "torch"
    if int8 and runtime == "torch":
        raise ValueError("int8 is an ONNX variant; use the onnx runtime")
    return runtime
