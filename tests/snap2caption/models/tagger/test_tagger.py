"""The ImageNet tagger in PyTorch: readable names, tag merging, save/load, real photos from scikit-image."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from snap2caption.models import tagger as tagger_model
from snap2caption.models.backbones import build_encoder
from snap2caption.models.tagger.artifact import load_net, save_tagger
from snap2caption.models.tagger.config import CONFIG_FILE, TaggerConfig
from snap2caption.models.tagger.imagenet_names import (
    hashtag,
    imagenet_labels,
    imagenet_names,
    readable_label,
    readable_name,
)
from snap2caption.models.tagger.net import TaggerNet
from snap2caption.models.tagger.runtime import Tagger

CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.fixture(scope="module")
def real_net() -> TaggerNet:
    return TaggerNet.pretrained()


@pytest.fixture(scope="module")
def real_tagger(real_net: TaggerNet) -> Tagger:
    return Tagger.from_net(real_net)


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    return [Image.fromarray(skimage.data.chelsea()), Image.fromarray(skimage.data.coffee())]


def _tiny_net() -> TaggerNet:
    torch.manual_seed(0)
    encoder = build_encoder("tiny", num_classes=3)
    return TaggerNet(encoder, ["tabby, tabby cat", "tiger cat", "Great Dane"], ["cat", "cat", "dog"])


def test_readable_names_and_hashtags() -> None:
    labels = imagenet_labels()
    names = imagenet_names()
    assert len(labels) == len(names) == 1000
    assert labels[281] == "tabby, tabby cat"
    assert {names[i] for i in CAT_CLASSES} == {"cat"}
    assert {names[i] for i in range(151, 269)} == {"dog"}
    assert {names[i] for i in range(52, 69)} == {"snake"}
    assert (names[967], names[968], names[504]) == ("coffee", "cup", "mug")
    assert names[383] == "lemur"  # "Madagascar cat" is not a cat
    assert names[2] == "shark" and names[22] == "eagle" and names[817] == "car"
    assert readable_name(0, "tench, Tinca tinca") == "fish"
    assert readable_label("pay-phone, pay-station") == "pay phone"
    assert readable_label("Band_Aid") == "band aid"
    assert names[610] == "t-shirt" and hashtag(names[610]) == "#tshirt"
    assert hashtag("teddy bear") == "#teddybear"
    assert hashtag("jack-o'-lantern") == "#jackolantern"
    assert all(re.fullmatch(r"#[a-z0-9]+", hashtag(name)) for name in names)


def test_from_logits_merges_names_and_filters() -> None:
    tagger = Tagger.from_net(_tiny_net())
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]]))  # softmax gives these back

    first, second = tagger.from_logits(logits)
    assert [(t.name, t.class_index, t.label) for t in first] == [
        ("cat", 0, "tabby, tabby cat"),
        ("dog", 2, "Great Dane"),
    ]
    assert first[0].score == pytest.approx(0.5)  # the best cat class, not the sum of both
    assert first[1].hashtag == "#dog"
    assert [t.name for t in second] == ["dog", "cat"]

    assert tagger.from_logits(logits.numpy(), top_k=1)[0] == first[:1]
    assert [t.name for t in tagger.from_logits(logits, min_score=0.3)[1]] == ["dog"]
    assert first[0].to_dict() == {
        "label": "tabby, tabby cat",
        "name": "cat",
        "score": first[0].score,
        "hashtag": "#cat",
        "class_index": 0,
    }
    with pytest.raises(ValueError, match=r"logits must be \(N, 3\)"):
        tagger.from_logits(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="top_k"):
        tagger.from_logits(logits, top_k=0)


def test_tiny_tagger_batches_and_round_trips(tmp_path: Path) -> None:
    net = _tiny_net()
    tagger = Tagger.from_net(net)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (40 + 9 * i, 50, 3), dtype=np.uint8)) for i in range(3)]

    logits = tagger.logits(images, batch_size=2)
    assert logits.shape == (3, 3)
    assert len(tagger.tag(images)) == 3
    assert tagger.tag([]) == []

    folder = save_tagger(net, tmp_path / "tagger")
    loaded = load_net(folder)
    assert np.array_equal(Tagger.from_net(loaded).logits(images, batch_size=2), logits)
    assert loaded.config() == net.config()
    assert not any(p.requires_grad for p in loaded.parameters())
    # Without a manifest the folder is not an artifact yet: the one loader refuses it unless told not to.
    runtime = tagger_model.load(folder, "torch", verify=False)
    assert runtime.runtime == "torch" and np.array_equal(runtime.logits(images, batch_size=2), logits)
    with pytest.raises(ValueError, match="int8 is an ONNX variant"):
        tagger_model.load(folder, "torch", int8=True, verify=False)


def test_config_refuses_unknown_keys_and_headless_encoders(tmp_path: Path) -> None:
    path = save_tagger(_tiny_net(), tmp_path)
    config = json.loads((path / CONFIG_FILE).read_text())
    with pytest.raises(ValueError, match="did you mean 'labels'"):
        TaggerConfig.from_dict({**config, "lables": []})
    with pytest.raises(ValueError, match="2 labels and 3 names"):
        TaggerConfig.from_dict({**config, "labels": ["a", "b"]})
    with pytest.raises(ValueError, match="no classifier head"):
        TaggerNet(build_encoder("tiny"), [])


def test_real_tagger_top1_on_photos(real_tagger: Tagger, photos: list[Image.Image]) -> None:
    cat, coffee = real_tagger.tag(photos, top_k=5)

    assert cat[0].class_index in CAT_CLASSES
    assert (cat[0].name, cat[0].hashtag) == ("cat", "#cat")
    assert len({t.name for t in cat}) == len(cat) == 5  # the other cat breeds were merged into "cat"

    assert coffee[0].class_index == 967 and coffee[0].score > 0.9
    assert (coffee[0].label, coffee[0].name, coffee[0].hashtag) == ("espresso", "coffee", "#coffee")


def test_real_tagger_shared_pass_and_save_load(
    real_net: TaggerNet, real_tagger: Tagger, photos: list[Image.Image], tmp_path: Path
) -> None:
    pixels = torch.from_numpy(real_tagger.preprocess.batch(photos))
    with torch.inference_mode():
        grid, logits = real_net.encoder.forward_with_logits(pixels)  # what the caption encoder runs
    assert grid.shape == (2, 1280, 7, 7)
    assert logits is not None
    assert np.allclose(logits.numpy(), real_tagger.logits(photos), atol=1e-5)
    shared, direct = real_tagger.from_logits(logits), real_tagger.tag(photos)
    assert [[t.class_index for t in tags] for tags in shared] == [
        [t.class_index for t in tags] for tags in direct
    ]

    loaded = Tagger.from_net(load_net(save_tagger(real_net, tmp_path / "tagger")))
    assert loaded.labels == real_tagger.labels and loaded.names == real_tagger.names
    assert loaded.preprocess == real_tagger.preprocess == real_net.encoder.preprocess
    assert np.array_equal(loaded.logits(photos[:1]), real_tagger.logits(photos[:1]))
