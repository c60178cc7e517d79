"""Training and export reach no network: the tiny run's child process has an audit hook that records and
blocks every non-loopback socket connect and DNS lookup (see conftest.py); it recorded nothing but its own
self-test."""

from __future__ import annotations

import json
from typing import Any


def test_train_and_export_attempt_no_network(tiny_run: Any) -> None:
    assert tiny_run.returncode == 0, tiny_run.output[-8000:]
    assert "SELFTEST-BLOCKED" in tiny_run.output  # the hook works: example.com was refused
    assert [(r["event"], r["host"]) for r in tiny_run.net_log] == [("socket.getaddrinfo", "example.com")]

    # It did the work: a trained artifact and an export with the int8 model, plots drawn with the local font.
    assert (tiny_run.artifact_dir / "MANIFEST.json").is_file()
    assert (tiny_run.export_dir / "model.int8.onnx").is_file()
    font_dir = tiny_run.home / "ultralytics" / "Ultralytics"
    assert (font_dir / "Arial.ttf").is_file()
    settings = json.loads((font_dir / "settings.json").read_text())
    assert settings["sync"] is False and settings["mlflow"] is False and settings["dvc"] is False
    assert any(p.name == "confusion_matrix.png" for p in tiny_run.work_dir.rglob("*.png"))
