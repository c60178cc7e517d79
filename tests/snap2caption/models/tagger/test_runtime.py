"""The tagger's runtimes: ONNX Runtime on real photos, the same top-5 tags as PyTorch, metadata, a
registrable artifact, and the one loader's runtime choice."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import skimage.data
from PIL import Image

from snap2caption.manifest import verify_manifest
from snap2caption.models import tagger as tagger_model
from snap2caption.models.onnx_io import read_metadata
from snap2caption.models.tagger.net import TaggerNet
from snap2caption.models.tagger.runtime import Tagger
from training.tagger.package import package_tagger
from training.tagger.photos import PHOTOS

CAT_CLASSES = range(281, 286)


@pytest.fixture(scope="module")
def net() -> TaggerNet:
    return TaggerNet.pretrained()


@pytest.fixture(scope="module")
def tagger(net: TaggerNet) -> Tagger:
    return Tagger.from_net(net)


@pytest.fixture(scope="module")
def packaged(net: TaggerNet, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, float]]:
    return package_tagger(tmp_path_factory.mktemp("tagger") / "artifact", net)


def test_onnx_tagger_top1_on_real_photos(packaged: tuple[Path, dict[str, float]]) -> None:
    onnx_tagger = tagger_model.load(packaged[0])
    assert onnx_tagger.runtime == "onnx"  # auto: the artifact has model.onnx
    cat, coffee = onnx_tagger.tag(
        [Image.fromarray(skimage.data.chelsea()), Image.fromarray(skimage.data.coffee())], top_k=5
    )
    assert cat[0].class_index in CAT_CLASSES and cat[0].hashtag == "#cat"
    assert coffee[0].class_index in (967, 968) and coffee[0].score > 0.9  # espresso (or cup)


def test_onnx_gives_the_same_top5_as_pytorch(tagger: Tagger, packaged: tuple[Path, dict[str, float]]) -> None:
    photos = [p.image() for p in PHOTOS]
    onnx_tags = tagger_model.load(packaged[0], "onnx", threads=2).tag(photos, top_k=5)
    torch_tags = tagger.tag(photos, top_k=5)
    assert [[t.class_index for t in tags] for tags in onnx_tags] == [
        [t.class_index for t in tags] for tags in torch_tags
    ]
    for a, b in zip(onnx_tags, torch_tags, strict=True):
        assert [t.score for t in a] == pytest.approx([t.score for t in b], abs=1e-4)


def test_artifact_metrics_card_and_metadata(packaged: tuple[Path, dict[str, float]]) -> None:
    folder, metrics = packaged
    verify_manifest(folder)
    assert metrics["test_top1"] == metrics["test_top1_torch"] == 1.0  # all three labelled photos right
    assert metrics["onnx_top5_same"] == 1.0 and metrics["onnx_max_abs_logit_diff"] < 1e-3
    card = (folder / "README.md").read_text()
    assert "not** ImageNet" in card and "scikit-image" in card
    meta = read_metadata(folder / "model.onnx")
    assert meta["snap2caption.format"] == "snap2caption.tagger"
    assert json.loads(meta["preprocess"])["crop"] == 224 and len(json.loads(meta["labels"])) == 1000
    assert json.loads(meta["input"])["shape"][0] == "batch"
    assert {p.name for p in folder.iterdir()} >= {
        "model.safetensors",
        "config.json",
        "model.onnx",
        "eval.json",
    }


def test_the_onnx_runtime_never_imports_torch(packaged: tuple[Path, dict[str, float]]) -> None:
    code = (
        "import sys\n"
        "from PIL import Image\n"
        "from snap2caption.models import tagger\n"
        f"t = tagger.load({str(packaged[0])!r})\n"
        "assert t.runtime == 'onnx' and len(t.tag([Image.new('RGB', (40, 30))])[0]) == 5\n"
        "heavy = [m for m in ('torch', 'timm', 'torchvision') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
