"""``snap2caption export ...``: Export models for serving (ONNX; TensorRT where installed)."""

from __future__ import annotations

import click


@click.group("export")
def export_group() -> None:
    """Export models for serving (ONNX; TensorRT where installed)."""
