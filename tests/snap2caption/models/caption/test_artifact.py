"""Caption model artifacts: rebuilt from its folder alone a model reproduces its captions; tampering fails."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from transformers import GPT2Config, GPT2LMHeadModel

from snap2caption.errors import ArtifactError, ArtifactIntegrityError
from snap2caption.manifest import verify_manifest, write_manifest
from snap2caption.models.caption.artifact import load_caption_model, save_caption_model
from snap2caption.models.caption.config import CaptionConfig
from snap2caption.models.caption.files import read_artifact_info
from snap2caption.models.caption.model import CaptionModel, build_caption_model
from snap2caption.models.caption.tokenizer import CaptionTokenizer
from tests.snap2caption.models.caption.conftest import CONFIGS, TINY

# peft calls a transformers method that warns about its own deprecation.
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
CAPTIONS = ["a red circle", "two blue squares next to a green triangle", "a small yellow star on the left"]


@pytest.fixture(scope="module")
def tok() -> CaptionTokenizer:
    return CaptionTokenizer.train(CAPTIONS, vocab_size=400, min_frequency=1)


@pytest.fixture(scope="module")
def model(tok: CaptionTokenizer) -> CaptionModel:
    torch.manual_seed(0)
    return CaptionModel(CaptionConfig.from_yaml(TINY), tok).eval()


@pytest.fixture()
def saved(tmp_path: Path, model: CaptionModel, tok: CaptionTokenizer) -> Path:
    return save_caption_model(model, tok, tmp_path / "artifact", extra={"data_version": "abc123"})


def decoded(model: CaptionModel, pixels: torch.Tensor, **kwargs: Any) -> list[tuple[list[int], str, float]]:
    return [(c.token_ids, c.text, c.confidence) for c in model.generate(pixels, **kwargs)]


def test_reload_reproduces_captions_exactly(
    saved: Path, model: CaptionModel, tok: CaptionTokenizer, pixels: torch.Tensor
) -> None:
    assert sorted(p.name for p in saved.iterdir()) == [
        "MANIFEST.json",
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    ]
    info = read_artifact_info(saved)
    assert info["extra"] == {"data_version": "abc123"}
    assert info["preprocess"] == model.preprocess.to_dict()
    assert info["model"]["decoder"]["vocab_size"] == len(tok)
    assert CaptionConfig.from_dict(info["model"]) == model.config

    loaded, loaded_tok = load_caption_model(saved)
    assert loaded_tok.describe() == tok.describe()
    assert loaded.preprocess == model.preprocess
    own, again = model.state_dict(), loaded.state_dict()
    assert own.keys() == again.keys() and all(torch.equal(own[k], again[k]) for k in own)
    for num_beams in (1, 3):
        assert decoded(loaded, pixels, num_beams=num_beams) == decoded(model, pixels, num_beams=num_beams)


@pytest.mark.parametrize(
    ("section", "key", "before"),
    [("encoder", "colour_cells", 0), ("mapping", "coords", 0), ("mapping", "order", "rows")],
)
def test_an_artifact_written_before_a_setting_existed_loads_as_it_was_built(
    saved: Path, model: CaptionModel, pixels: torch.Tensor, section: str, key: str, before: object
) -> None:
    """Today's defaults append colour cells and cell coordinates and take the prefix column by column; an
    older config.json without the key still means what the model was built with."""
    assert getattr(getattr(model.config, section), key) == before
    assert getattr(getattr(CaptionConfig(), section), key) != before
    info = json.loads((saved / "config.json").read_text())
    info["model"][section].pop(key, None)
    (saved / "config.json").write_text(json.dumps(info))
    write_manifest(saved)
    loaded, _ = load_caption_model(saved)
    assert loaded.config == model.config
    assert decoded(loaded, pixels) == decoded(model, pixels)


def test_lora_artifact_is_merged_and_loads_without_its_base(
    tmp_path: Path, tok: CaptionTokenizer, pixels: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    base_dir = tmp_path / "gpt2-base"
    GPT2LMHeadModel(
        GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=2)
    ).save_pretrained(base_dir)
    tok.save(base_dir)
    config = CaptionConfig.from_yaml(
        CONFIGS / "paper.yaml",
        [
            "encoder.name=tiny",
            "encoder.pretrained=false",
            "prefix_len=4",
            "mapping.hidden=64",
            "mapping.num_layers=1",
            "mapping.num_heads=2",
            "mapping.grid=4",
            f"decoder.pretrained={base_dir}",
            "decoder.n_positions=64",
            "tokenizer.max_caption_tokens=24",
            "decoding.max_new_tokens=12",
        ],
    )
    torch.manual_seed(0)
    model, paper_tok = build_caption_model(config)
    model.eval()
    for name, param in model.named_parameters():
        if "lora_B" in name:  # trained adapters: zero-initialised B would make merging trivial
            torch.nn.init.normal_(param, std=0.05)
    input_ids, mask = paper_tok.batch_encode(CAPTIONS, max_tokens=24)
    with torch.no_grad():
        logits = model(input_ids, mask, pixels=pixels).logits
    captions = [c.token_ids for c in model.generate(pixels, num_beams=2)]

    folder = save_caption_model(model, paper_tok, tmp_path / "artifact")
    assert model.lora_active  # the caller's model is left as it was
    assert read_artifact_info(folder)["lora_merged"] is True
    with safe_open(str(folder / "model.safetensors"), framework="pt") as fh:
        names = fh.keys()
    assert not [k for k in names if "lora_" in k or "base_layer" in k]

    # Offline and without the base checkpoint: nothing may be fetched.
    shutil.rmtree(base_dir)

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("load_caption_model must not call from_pretrained")

    monkeypatch.setattr(GPT2LMHeadModel, "from_pretrained", refuse)
    loaded, _ = load_caption_model(folder)
    assert not loaded.lora_active
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids, mask, pixels=pixels).logits, logits, atol=1e-5, rtol=0)
    assert [c.token_ids for c in loaded.generate(pixels, num_beams=2)] == captions


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json"])
def test_tampered_file_is_refused(saved: Path, name: str) -> None:
    path = saved / name
    data = bytearray(path.read_bytes())
    data[-2] ^= 0x01  # one bit, near the end (a weight, or JSON text)
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactIntegrityError, match=re.escape(f"{name} was modified after saving")):
        load_caption_model(saved)


def test_incomplete_artifact_is_refused(saved: Path, tmp_path: Path) -> None:
    (saved / "tokenizer.json").unlink()
    with pytest.raises(
        ArtifactIntegrityError, match=r"tokenizer\.json is listed in MANIFEST\.json but missing"
    ):
        load_caption_model(saved)
    (saved / "MANIFEST.json").unlink()
    with pytest.raises(ArtifactIntegrityError, match=r"no readable MANIFEST\.json"):
        load_caption_model(saved)
    foreign = tmp_path / "hf-model"
    foreign.mkdir()
    (foreign / "config.json").write_text('{"model_type": "gpt2"}', encoding="utf-8")
    with pytest.raises(ArtifactError, match=r"not a snap2caption\.caption_model artifact"):
        load_caption_model(foreign, verify=False)
    with pytest.raises(ArtifactError, match="cannot read"):
        load_caption_model(tmp_path / "nowhere", verify=False)


def test_a_file_added_without_rehashing_is_refused(saved: Path) -> None:
    # A loader could pick up a file the manifest does not vouch for (an ONNX export copied in by hand).
    (saved / "onnx").mkdir()
    (saved / "onnx" / "decoder.onnx").write_bytes(b"\x08\x07")
    with pytest.raises(ArtifactIntegrityError, match=r"not in the manifest: \['onnx/decoder\.onnx'\]"):
        load_caption_model(saved)


def test_manifest_covers_files_added_later(saved: Path) -> None:
    (saved / "model_card.md").write_text("# tiny\n", encoding="utf-8")
    write_manifest(saved)
    files = json.loads((saved / "MANIFEST.json").read_text(encoding="utf-8"))["files"]
    assert set(files) == {"model.safetensors", "config.json", "tokenizer.json", "model_card.md"}
    verify_manifest(saved)
    (saved / "model_card.md").write_text("# edited\n", encoding="utf-8")
    with pytest.raises(ArtifactIntegrityError, match=r"model_card\.md was modified"):
        verify_manifest(saved)


def test_mismatched_tokenizer_is_refused(model: CaptionModel, tmp_path: Path) -> None:
    other = CaptionTokenizer.train(["something else entirely"] * 3, vocab_size=270, min_frequency=1)
    with pytest.raises(ValueError, match="is not the model's"):
        save_caption_model(model, other, tmp_path / "x")
