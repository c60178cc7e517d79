"""The runtime choice the detector and the tagger share."""

from __future__ import annotations

from pathlib import Path

import pytest

from snap2caption.models.runtime import resolve_runtime


def test_auto_prefers_onnx_when_the_artifact_has_it(tmp_path: Path) -> None:
    assert resolve_runtime("auto", tmp_path, "model.onnx") == "torch"
    (tmp_path / "model.onnx").write_bytes(b"")
    assert resolve_runtime("auto", tmp_path, "model.onnx") == "onnx"
    assert resolve_runtime("torch", tmp_path, "model.onnx") == "torch"
    assert resolve_runtime("onnx", tmp_path / "missing", "model.onnx") == "onnx"
    with pytest.raises(ValueError, match="runtime must be 'auto', 'onnx' or 'torch'"):
        resolve_runtime("tensorrt", tmp_path, "model.onnx")  # type: ignore[arg-type]
    assert resolve_runtime("auto", tmp_path, "model.onnx", int8=True) == "onnx"
    with pytest.raises(ValueError, match="int8 is an ONNX variant"):
        resolve_runtime("auto", tmp_path, "model.int8.onnx", int8=True)  # no such file: torch
