"""bench/gpu_decode.py: its CPU smoke shapes end to end, and a clear refusal of CUDA where there is none.

Its GPU numbers need a CUDA device (none here): nothing in these tests stands for them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.bench.conftest import load_script, read_result


def test_cpu_smoke_run_writes_its_result(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], one_thread: None
) -> None:
    """Both decoders time, and the float32 static tokens agree with the Hugging Face step's."""
    out = tmp_path / "gpu_decode.json"
    args = ["--device", "cpu", "--tokens", "5", "--repeats", "1", "--batches", "2", "--out", str(out)]
    results = load_script("gpu_decode").main(args)
    printed = capsys.readouterr().out
    assert "HF generate eager fp32" in printed and "ratio static / HF" in printed
    assert f"result: {out}" in printed
    assert results["agreement"] == 1.0
    assert all(results[k] > 0 for k in ("hf_b1_ms", "static_b1_ms", "hf_2_ips", "static_2_ips"))
    figures = read_result(out, "gpu_decode")
    assert figures == results  # floats survive JSON exactly
    config = json.loads(out.read_text())["config"]
    assert (config["device_name"], config["shapes"], config["cuda_graphs"]) == ("cpu", "smoke", False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_cuda_without_a_gpu_is_refused_before_anything_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "never.json"
    with pytest.raises(SystemExit) as raised:
        load_script("gpu_decode").main(["--device", "cuda", "--out", str(out)])
    assert raised.value.code == 2
    assert "--device cuda: torch sees no CUDA device" in capsys.readouterr().err
    assert not out.exists()  # no result pretends to be a GPU measurement
