"""snap2caption.imaging.transforms: same pixels as torchvision's transforms, and a config that round-trips."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from snap2caption.imaging import (
    IMAGENET_PREPROCESS,
    TAGGER_PREPROCESS,
    Preprocess,
    resize_max_side,
    scaled_size,
)

torch = pytest.importorskip("torch")
T = pytest.importorskip("torchvision.transforms")
ResNet50_Weights = pytest.importorskip("torchvision.models").ResNet50_Weights

# Landscape, portrait, odd sizes whose centre-crop offsets land on .5 (Python's round-half-even),
# a short side already at the target (torchvision skips the resize), and an extreme panorama.
SIZES = [(640, 480), (480, 640), (333, 257), (257, 333), (301, 256), (256, 256), (232, 250), (1000, 231)]


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("size", SIZES)
def test_imagenet_preset_matches_torchvision_resnet50_v2(size: tuple[int, int]) -> None:
    img = noise(*size)
    expected = ResNet50_Weights.IMAGENET1K_V2.transforms()(img).numpy()  # (3, 224, 224)
    actual = IMAGENET_PREPROCESS(img)
    assert actual.shape == expected.shape == (3, 224, 224)
    assert actual.dtype == np.float32
    np.testing.assert_allclose(actual, expected, atol=1e-5)


@pytest.mark.parametrize("size", SIZES)
def test_tagger_preset_matches_torchvision_resize_crop_and_x_minus_127_over_128(
    size: tuple[int, int],
) -> None:
    img = noise(*size, seed=1)
    pipeline = T.Compose(
        [T.Resize(256, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224), T.PILToTensor()]
    )
    expected = ((pipeline(img).float() - 127.0) / 128.0).numpy()
    np.testing.assert_allclose(TAGGER_PREPROCESS(img), expected, atol=1e-6)


def test_batch_stacks_the_single_results() -> None:
    imgs = [noise(*size, seed=i) for i, size in enumerate(SIZES[:3])]
    out = TAGGER_PREPROCESS.batch(imgs)
    assert out.shape == (3, 3, 224, 224)
    assert out.flags.c_contiguous
    for i, img in enumerate(imgs):
        np.testing.assert_array_equal(out[i], TAGGER_PREPROCESS(img))
    assert TAGGER_PREPROCESS.batch([]).shape == (0, 3, 224, 224)


def test_non_rgb_input_is_refused() -> None:
    with pytest.raises(ValueError, match="RGB"):
        TAGGER_PREPROCESS(Image.new("RGBA", (300, 300)))


@pytest.mark.parametrize("preset", [TAGGER_PREPROCESS, IMAGENET_PREPROCESS])
def test_round_trips_through_json(preset: Preprocess) -> None:
    again = Preprocess.from_dict(json.loads(json.dumps(preset.to_dict())))
    assert again == preset
    assert again.mean == preset.mean and isinstance(again.mean, tuple)


def test_from_dict_refuses_unknown_and_missing_keys() -> None:
    data = TAGGER_PREPROCESS.to_dict()
    with pytest.raises(ValueError, match="did you mean 'resize_short'"):
        Preprocess.from_dict({**data, "resize_shrot": 256})
    del data["std"]
    with pytest.raises(ValueError, match="missing std"):
        Preprocess.from_dict(data)


@pytest.mark.parametrize(
    "changes",
    [
        {"interpolation": "lanczos"},
        {"crop": 300},
        {"crop": 0},
        {"std": (1.0, 0.0, 1.0)},
        {"mean": (1.0, 2.0)},
    ],
)
def test_invalid_configs_are_refused(changes: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Preprocess.from_dict({**TAGGER_PREPROCESS.to_dict(), **changes})


@pytest.mark.parametrize(
    ("size", "max_side", "expected"),
    [
        ((1000, 500), 512, (512, 256)),
        ((500, 1000), 512, (256, 512)),
        ((333, 111), 100, (100, 33)),
        ((1, 5000), 512, (1, 512)),  # the short side never rounds to 0
        ((300, 200), 512, (300, 200)),  # never upscaled
        ((512, 512), 512, (512, 512)),
    ],
)
def test_resize_max_side(size: tuple[int, int], max_side: int, expected: tuple[int, int]) -> None:
    assert scaled_size(*size, max_side) == expected
    img = noise(*size)
    out = resize_max_side(img, max_side)
    assert out.size == expected
    if expected == size:
        assert out is img  # nothing to do: no copy


def test_resize_max_side_is_high_quality() -> None:
    # A fine checkerboard must average to grey, not alias into stripes as nearest-neighbour would.
    board = np.indices((800, 800)).sum(axis=0) % 2 * 255
    out = np.asarray(resize_max_side(Image.fromarray(board.astype(np.uint8)).convert("RGB"), 100))
    assert out.std() < 3 and abs(out.mean() - 127.5) < 3
