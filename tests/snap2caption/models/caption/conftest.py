"""What the caption model tests share: the presets, captions, a tokenizer, pixels and tiny models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from snap2caption.models.caption.artifact import save_caption_model
from snap2caption.models.caption.config import CaptionConfig
from snap2caption.models.caption.model import CaptionModel, build_caption_model
from snap2caption.models.caption.tokenizer import CaptionTokenizer

ROOT = Path(__file__).resolve().parents[4]
CONFIGS = ROOT / "training" / "configs" / "caption"
TINY = CONFIGS / "tiny.yaml"
# Three captions of different lengths, so batched decoding has rows that end at different steps.
TARGETS = [
    "a red circle",
    "two blue squares next to a green triangle",
    "a small yellow star above a large purple hexagon on the left",
]
# What the tiny artifacts' tokenizers are trained on.
CAPTIONS = ["a red circle left of a blue square", "two green triangles", "a yellow star above a cat"]


def saved_tiny(folder: Path, *overrides: str) -> tuple[CaptionModel, Path]:
    """A seeded, untrained ``tiny`` model (with ``overrides``), saved as an artifact in ``folder``."""
    torch.manual_seed(0)
    model, tokenizer = build_caption_model(CaptionConfig.from_yaml(TINY, overrides), captions=CAPTIONS * 2)
    model.eval()
    return model, save_caption_model(model, tokenizer, folder)


@pytest.fixture(scope="module")
def tok() -> CaptionTokenizer:
    return CaptionTokenizer.train(TARGETS, vocab_size=400, min_frequency=1)


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    return torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))  # (B, 3, H, W)


@pytest.fixture(scope="module")
def random_model(tok: CaptionTokenizer) -> CaptionModel:
    torch.manual_seed(0)
    return CaptionModel(CaptionConfig.from_yaml(TINY), tok).eval()
