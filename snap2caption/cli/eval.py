"""``snap2caption eval ...``: Evaluate models on a dataset split."""

from __future__ import annotations

import click


@click.group("eval")
def eval_group() -> None:
    """Evaluate models on a dataset split."""
