"""A tagger as an artifact folder (layout: :mod:`~snap2caption.models.tagger.config`): save the network,
rebuild it in PyTorch from safetensors + JSON alone (no pickle, no download)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from snap2caption.imaging.transforms import Preprocess
from snap2caption.models.backbones import build_encoder
from snap2caption.models.tagger.config import WEIGHTS_FILE, read_config, write_config
from snap2caption.models.tagger.net import TaggerNet


def save_tagger(net: TaggerNet, directory: str | os.PathLike[str]) -> Path:
    """Write ``model.safetensors`` (the encoder's weights) and ``config.json`` into ``directory``."""
    from safetensors.torch import save_file

    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().cpu().contiguous() for key, value in net.encoder.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    write_config(net.config(), folder)
    return folder


def load_net(directory: str | os.PathLike[str], device: str | torch.device = "cpu") -> TaggerNet:
    """Rebuild the network saved by :func:`save_tagger`, frozen, in eval mode, on ``device``.

    Raises:
        FileNotFoundError: A file is missing.
        ValueError: The config is invalid.
        WeightsMismatchError: The weights do not fit the configured backbone.
    """
    folder = Path(directory)
    config = read_config(folder)
    encoder = build_encoder(config.backbone, pretrained=folder / WEIGHTS_FILE, num_classes=config.num_classes)
    encoder.preprocess = Preprocess.from_dict(config.preprocess)
    return TaggerNet(encoder, config.labels, config.names).to(device)
