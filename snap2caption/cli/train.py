"""``snap2caption train ...``: Train models: the caption model, the detector."""

from __future__ import annotations

import click


@click.group("train")
def train_group() -> None:
    """Train models: the caption model, the detector."""
