"""Shared fixtures for the model tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.helpers import torch_threads


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """One intra-op thread: these tensors are small, and OpenMP spin-waits stall when the cores are shared."""
    with torch_threads(1):  # tiny tensors; processes share the cores
        yield
