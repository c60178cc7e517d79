"""Image encoders: weight loading, one-pass grid + logits, freezing, shapes, no downloads."""

from __future__ import annotations

import socket
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from snap2caption.models.backbones import (
    ColourGridEncoder,
    DetailGridEncoder,
    EfficientNetLite0Encoder,
    ImageEncoder,
    WeightsMismatchError,
    build_encoder,
    efficientnet_lite0_weights_path,
    load_state_file,
    remap_by_order,
)


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Any attempt to open a connection (a hub download) fails the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("an encoder tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    yield


@pytest.fixture(scope="module")
def package_state() -> dict[str, torch.Tensor]:
    return load_state_file(efficientnet_lite0_weights_path())


@pytest.fixture(scope="module")
def effnet() -> EfficientNetLite0Encoder:
    encoder = build_encoder("efficientnet_lite0")
    assert isinstance(encoder, EfficientNetLite0Encoder)
    return encoder


def test_package_weights_map_one_to_one_by_order(
    package_state: dict[str, torch.Tensor], effnet: EfficientNetLite0Encoder
) -> None:
    timm_state = effnet.model.state_dict()
    mapped = remap_by_order(package_state, timm_state)

    assert list(mapped) == list(timm_state)
    assert len(package_state) == len(timm_state) == 296
    for (src_key, src), (dst_key, dst) in zip(package_state.items(), timm_state.items(), strict=True):
        assert src.shape == dst.shape, (src_key, dst_key)
        assert src_key.rsplit(".", 1)[-1] == dst_key.rsplit(".", 1)[-1]
    assert next(iter(package_state)) == "_conv_stem.weight"
    assert next(iter(mapped)) == "conv_stem.weight"


@pytest.mark.usefixtures("no_network")
def test_pretrained_efficientnet_holds_the_package_weights(package_state: dict[str, torch.Tensor]) -> None:
    encoder = build_encoder("efficientnet_lite0", pretrained=True)
    assert isinstance(encoder, EfficientNetLite0Encoder)
    assert torch.equal(encoder.model.conv_stem.weight, package_state["_conv_stem.weight"])
    assert torch.equal(encoder.model.classifier.bias, package_state["_fc.bias"])


def test_mismatched_state_dicts_are_refused(
    package_state: dict[str, torch.Tensor], effnet: EfficientNetLite0Encoder
) -> None:
    items = list(package_state.items())
    with pytest.raises(WeightsMismatchError, match="has 295 tensors, the model has 296"):
        effnet.load_weights(OrderedDict(items[:-1]), by_order=True)

    shifted = OrderedDict([items[1], items[0], *items[2:]])  # stem weight and BN weight swapped
    with pytest.raises(WeightsMismatchError, match=r"pairs differ.*_bn0\.weight"):
        effnet.load_weights(shifted, by_order=True)

    with pytest.raises(WeightsMismatchError, match="missing keys"):
        effnet.load_weights(package_state)  # EfficientNet-PyTorch names without by_order

    wrong_shape = dict(effnet.state_dict())
    wrong_shape["model.classifier.bias"] = torch.zeros(10)
    with pytest.raises(WeightsMismatchError, match=r"model.classifier.bias: \(10,\) != \(1000,\)"):
        effnet.load_weights(wrong_shape)


def test_loads_timm_naming_and_refuses_non_tensor_files(
    effnet: EfficientNetLite0Encoder, tmp_path: Path
) -> None:
    effnet.load_weights(effnet.model.state_dict())  # timm's own keys, without the "model." prefix

    path = tmp_path / "bad.pt"
    torch.save({"weight": torch.zeros(1), "note": "not a tensor"}, path)
    with pytest.raises(WeightsMismatchError, match="not a flat state dict"):
        load_state_file(path)
    with pytest.raises(FileNotFoundError):
        load_state_file(tmp_path / "missing.safetensors")


def test_forward_with_logits_is_forward_plus_classifier(effnet: EfficientNetLite0Encoder) -> None:
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        grid, logits = effnet.forward_with_logits(pixels)
        assert logits is not None
        assert torch.allclose(grid, effnet(pixels))
        assert torch.allclose(logits, effnet.classify(effnet(pixels)))
        assert torch.allclose(logits, effnet.model(pixels), atol=1e-5)  # timm's own full forward
        full = effnet(torch.zeros(1, 3, 224, 224))
    assert grid.shape == (2, 1280, 2, 2)
    assert logits.shape == (2, 1000)
    assert full.shape == (1, 1280, 7, 7)
    assert effnet.out_channels == 1280


def _trainable(encoder: ImageEncoder) -> set[str]:
    return {name for name, p in encoder.named_parameters() if p.requires_grad}


def test_frozen_encoder_has_no_trainable_params_and_keeps_eval_mode() -> None:
    encoder = build_encoder("tiny")  # trainable="none" by default
    assert _trainable(encoder) == set()
    encoder.train()
    assert encoder.training
    assert not any(m.training for m in encoder.modules() if m is not encoder)


def test_trainable_last_unfreezes_only_the_last_stage() -> None:
    encoder = build_encoder("tiny", trainable="last").train()
    assert _trainable(encoder) == {"body.6.weight", "body.7.weight", "body.7.bias"}
    assert encoder.get_submodule("body.7").training
    assert not encoder.get_submodule("body.1").training  # frozen BatchNorm keeps its running stats

    encoder.set_trainable("all")
    assert _trainable(encoder) == {name for name, _ in encoder.named_parameters()}
    assert encoder.get_submodule("body.1").training
    with pytest.raises(ValueError, match="trainable must be one of"):
        encoder.set_trainable("some")  # type: ignore[arg-type]


def test_tiny_encoder_shapes_and_preprocess() -> None:
    encoder = build_encoder("tiny")
    pixels = torch.from_numpy(encoder.preprocess.batch([Image.new("RGB", (90, 70), "red")] * 2))
    assert pixels.shape == (2, 3, 64, 64)
    grid, logits = encoder.forward_with_logits(pixels)
    assert grid.shape == (2, encoder.out_channels, 8, 8)
    assert logits is None

    with_head = build_encoder("tiny", num_classes=5)
    _, logits = with_head.forward_with_logits(pixels)
    assert logits is not None and logits.shape == (2, 5)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_pretrained_from_a_local_file(tmp_path: Path, suffix: str) -> None:
    source = build_encoder("tiny", num_classes=3)
    state = {key: value.contiguous() for key, value in source.state_dict().items()}
    path = tmp_path / f"tiny{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)

    loaded = build_encoder("tiny", pretrained=str(path), num_classes=3)
    pixels = torch.randn(1, 3, 64, 64)
    assert torch.equal(loaded(pixels), source.eval()(pixels))


@pytest.mark.usefixtures("no_network")
def test_resnet50_random_init_shapes_without_network() -> None:
    encoder = build_encoder("resnet50")
    with torch.no_grad():
        grid, logits = encoder.forward_with_logits(torch.randn(1, 3, 64, 64))
    assert grid.shape == (1, 2048, 2, 2)
    assert logits is not None and logits.shape == (1, 1000)
    assert _trainable(encoder) == set()
    assert encoder.preprocess(Image.fromarray(np.zeros((300, 400, 3), np.uint8))).shape == (3, 224, 224)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown encoder"):
        build_encoder("vgg16")
    with pytest.raises(ValueError, match="no pretrained weights"):
        build_encoder("tiny", pretrained=True)
    with pytest.raises(ValueError, match="fixed 1000-class"):
        build_encoder("efficientnet_lite0", num_classes=10)


def test_colour_grid_appends_each_cells_sub_cell_colours() -> None:
    torch.manual_seed(0)
    encoder = build_encoder("tiny", trainable="last", colour_cells=2)
    assert isinstance(encoder, ColourGridEncoder)
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        grid = encoder(pixels)
        base = encoder.base(pixels)
    assert encoder.name == "tiny+colour2" and encoder.out_channels == 32 + 12
    assert grid.shape == (2, 44, 8, 8) and torch.equal(grid[:, :32], base)
    # Cell (row 1, column 5) covers pixels 8..15 x 40..47; its sub-cell (1, 0) pixels 12..15 x 40..43.
    colours = grid[:, 32:].reshape(2, 3, 4, 8, 8)[:, :, 2, 1, 5]  # (B, 3): channel index c * 4 + 1 * 2 + 0
    torch.testing.assert_close(colours, pixels[:, :, 12:16, 40:44].mean(dim=(2, 3)))
    last = _trainable(build_encoder("tiny", trainable="last"))
    assert last and _trainable(encoder) == {f"base.{name}" for name in last}


def test_detail_grid_folds_the_finer_map_into_each_cell() -> None:
    torch.manual_seed(0)
    encoder = build_encoder("tiny", trainable="last", detail_stride=4, colour_cells=2)
    assert isinstance(encoder, ColourGridEncoder) and isinstance(encoder.base, DetailGridEncoder)
    detailed = encoder.base
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        grid = detailed(pixels)
        base = detailed.base
        finer = base.body[:6](pixels)  # (2, 16, 16, 16): the second conv's output, stride 4
        assert torch.equal(grid[:, :32], base(pixels))
    assert detailed.name == "tiny+detail4" and detailed.out_channels == 32 + 4 * 16
    assert encoder.name == "tiny+detail4+colour2" and encoder.out_channels == 32 + 64 + 12
    assert grid.shape == (2, 96, 8, 8)
    # Cell (row 3, column 6) holds finer cells rows 6..7 x columns 12..13; finer cell (1, 0) of channel c
    # is channel 32 + c * 4 + 1 * 2 + 0.
    torch.testing.assert_close(grid[:, 32 + 2 :: 4][:, :16, 3, 6], finer[:, :, 7, 12])
    last = _trainable(build_encoder("tiny", trainable="last"))
    assert _trainable(encoder) == {f"base.base.{name}" for name in last}


@pytest.mark.parametrize(("stride", "channels", "side"), [(16, 112, 14), (8, 40, 28)])
def test_efficientnet_detail_maps_come_from_the_same_pass(stride: int, channels: int, side: int) -> None:
    encoder = build_encoder("efficientnet_lite0")
    pixels = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        grid, detail = encoder.forward_detail(pixels, stride)
        torch.testing.assert_close(grid, encoder(pixels))
    assert detail.shape == (1, channels, side, side)
    folded = build_encoder("efficientnet_lite0", detail_stride=stride)
    assert folded.out_channels == 1280 + (32 // stride) ** 2 * channels


def test_a_detail_stride_the_backbone_lacks_is_refused() -> None:
    with pytest.raises(ValueError, match="finer maps at strides"):
        build_encoder("tiny", detail_stride=8)
