"""The torch-free ONNX Runtime captioner: the NumPy decode loop gives the torch loop's captions, and the
process never imports torch."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch

from snap2caption.errors import ProviderUnavailable
from snap2caption.models import onnx_io
from snap2caption.models.caption.artifact import load_caption_model
from snap2caption.models.caption.decoding import DecodingConfig
from snap2caption.models.caption.export import export_for_serving
from snap2caption.models.caption.ort import OrtCaptioner
from snap2caption.models.providers import OrtProviders
from tests.snap2caption.models.caption.conftest import saved_tiny


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _, folder = saved_tiny(tmp_path_factory.mktemp("caption") / "artifact")
    export_for_serving(folder)
    return folder


SETTINGS = {
    "greedy": DecodingConfig(max_new_tokens=12, num_beams=1),
    "greedy, penalties": DecodingConfig(
        max_new_tokens=12, repetition_penalty=1.4, no_repeat_ngram_size=2, min_new_tokens=4
    ),
    "beam 3": DecodingConfig(max_new_tokens=12, num_beams=3),
    "beam 3, penalties": DecodingConfig(
        max_new_tokens=10, num_beams=3, length_penalty=0.6, repetition_penalty=1.3, no_repeat_ngram_size=2
    ),
    "greedy, limited repeats": DecodingConfig(max_new_tokens=12, limit_repeats=True, repeatable_bigrams=[]),
    "beam 3, limited repeats": DecodingConfig(
        max_new_tokens=12, num_beams=3, limit_repeats=True, repeatable_bigrams=[]
    ),
}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_numpy_loop_captions_equal_the_torch_loop(artifact: Path, name: str) -> None:
    settings = SETTINGS[name]
    model, _ = load_caption_model(artifact)
    model.config.decoding = settings
    runtime = OrtCaptioner(artifact)
    runtime.decoding = settings
    pixels = (
        np.random.default_rng(1).standard_normal((5, *runtime.preprocess.output_shape)).astype(np.float32)
    )
    with torch.inference_mode():
        want = model.generate(torch.from_numpy(pixels))
    got = runtime.generate(pixels)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    assert [c.text for c in got] == [c.text for c in want]
    assert [c.confidence for c in got] == pytest.approx([c.confidence for c in want], abs=1e-4)
    assert any(c.n_tokens > 0 for c in got)


def test_greedy_decoding_runs_the_decoder_once_per_token_it_chooses(artifact: Path) -> None:
    """N tokens cost the prompt call and N - 1 one-token steps, in both loops: a step after the last token
    would compute logits for a token that is never chosen (5 % of a 20-token caption's time)."""
    settings = DecodingConfig(max_new_tokens=6, min_new_tokens=6, num_beams=1)  # exactly 6, EOS held off
    runtime = OrtCaptioner(artifact)
    runtime.decoding = settings
    model, _ = load_caption_model(artifact)
    model.config.decoding = settings
    shape = (2, *runtime.preprocess.output_shape)
    pixels = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    for name, decoder in (("onnx", runtime), ("torch", model)):
        positions: list[int] = []
        step = decoder.step

        def counted(embeds: Any, cache: Any, _step: Any = step, **kwargs: Any) -> Any:
            positions.append(int(embeds.shape[1]))  # noqa: B023 (called within this iteration)
            return _step(embeds, cache, **kwargs)

        decoder.step = counted  # type: ignore[method-assign]
        with torch.inference_mode():
            captions = decoder.generate(pixels if name == "onnx" else torch.from_numpy(pixels))
        assert [len(c.token_ids) for c in captions] == [6, 6], name
        assert positions == [runtime.prefix_len + 1, 1, 1, 1, 1, 1], name


def test_settings_are_checked_like_the_torch_model(artifact: Path) -> None:
    runtime = OrtCaptioner(artifact)
    pixels = np.zeros((1, *runtime.preprocess.output_shape), np.float32)
    with pytest.raises(ValueError, match="max_new_tokens must be <="):
        runtime.generate(pixels, max_new_tokens=runtime.max_new_tokens_limit + 1)
    with pytest.raises(ValueError, match="num_beams"):
        runtime.generate(pixels, num_beams=0)


def test_both_sessions_report_their_execution_providers(
    artifact: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CPU here, chosen explicitly; a provider this machine lacks fails the load, never falls back; the
    decoder is never offered TensorRT (its KV cache changes shape at every step)."""
    asked: dict[str, OrtProviders] = {}
    real = onnx_io.ort_session

    def recording(path: Path, **kwargs: Any) -> Any:
        asked[Path(path).name] = kwargs["providers"]
        return real(path, **kwargs)

    monkeypatch.setattr(onnx_io, "ort_session", recording)
    cpu = ["CPUExecutionProvider"]
    assert OrtCaptioner(artifact, providers=OrtProviders("cpu")).providers == {"encoder": cpu, "decoder": cpu}
    assert asked == {
        "encoder.onnx": OrtProviders("cpu"),
        "decoder.onnx": OrtProviders("cpu", tensorrt=False),
    }
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(ProviderUnavailable, match="CUDAExecutionProvider asked for"):
            OrtCaptioner(artifact, providers=OrtProviders("cuda"))


def test_int8_decoder_stays_close_to_float(artifact: Path) -> None:
    fp32, int8 = OrtCaptioner(artifact), OrtCaptioner(artifact, int8=True)
    int8_bytes = (artifact / "onnx" / "decoder.int8.onnx").stat().st_size
    assert int8_bytes < (artifact / "onnx" / "decoder.onnx").stat().st_size
    pixels = np.random.default_rng(2).standard_normal((3, *fp32.preprocess.output_shape)).astype(np.float32)
    (prefix,) = fp32.encoder.run(None, {"pixels": pixels})
    bos = np.broadcast_to(fp32.wte[fp32.special.bos], (3, 1, prefix.shape[2]))
    prompt = np.concatenate([prefix, bos], axis=1)
    a, _ = fp32.step(prompt, None)
    b, _ = int8.step(prompt, None)
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.98
    assert not np.array_equal(a, b)  # it really is another network


def test_an_export_that_does_not_fit_the_config_is_refused(artifact: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    shutil.copytree(artifact, other)
    config = (other / "config.json").read_text()
    (other / "config.json").write_text(config.replace('"prefix_len": ', '"prefix_len": 1', 1))
    with pytest.raises(ValueError, match=r"does not fit config\.json"):
        OrtCaptioner(other)


def test_the_onnx_runtime_never_imports_torch(artifact: Path) -> None:
    code = (
        "import sys, numpy as np\n"
        "from snap2caption.models.caption.ort import OrtCaptioner\n"
        f"r = OrtCaptioner({str(artifact)!r}, int8=True)\n"
        "r.generate(np.zeros((2, *r.preprocess.output_shape), np.float32), num_beams=2)\n"
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'timm') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.parametrize(
    "overrides",
    [
        # the paper config's mapping (nn.TransformerEncoder, whose eval fast path the exporter cannot trace)
        ("model.mapping.type=transformer", "model.mapping.num_layers=2", "model.mapping.num_heads=2"),
        # the starter's cell coordinates (a constant the exported encoder has to carry)
        ("model.mapping.coords=2",),
        # the starter's prefix order, column by column (a gather the exported encoder has to carry)
        ("model.mapping.coords=2", "model.mapping.order=columns"),
    ],
    ids=["transformer", "cell coordinates", "columns order"],
)
def test_other_mappings_export_and_caption_alike(tmp_path: Path, overrides: tuple[str, ...]) -> None:
    model, folder = saved_tiny(tmp_path / "artifact", *overrides)
    export_for_serving(folder, int8=False)
    runtime = OrtCaptioner(folder)
    pixels = (
        np.random.default_rng(3).standard_normal((2, *runtime.preprocess.output_shape)).astype(np.float32)
    )
    with torch.inference_mode():
        want = model.generate(torch.from_numpy(pixels), max_new_tokens=8)
    got = runtime.generate(pixels, max_new_tokens=8)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    assert [c.confidence for c in got] == pytest.approx([c.confidence for c in want], abs=1e-4)
    assert torch.backends.mha.get_fastpath_enabled()  # restored after the export
