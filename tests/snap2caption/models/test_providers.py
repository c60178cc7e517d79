"""Execution-provider choice: the pure selection on made-up provider lists, and real CPU sessions.

No GPU here: the CUDA and TensorRT branches are checked through what the selection asks ONNX Runtime for
(fake lists of available providers) and through the error a request for CUDA gives on this machine.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from snap2caption.errors import ProviderUnavailable
from snap2caption.models.onnx_io import (
    cpu_session,
    decoder_session_options,
    ort_session,
    session_options,
)
from snap2caption.models.providers import (
    CPU,
    CUDA,
    TENSORRT,
    OrtProviders,
    check_session_providers,
    parse_request,
    select_providers,
)

GPU_BUILD = [TENSORRT, CUDA, CPU]  # what onnxruntime-gpu lists
CPU_BUILD = ["AzureExecutionProvider", CPU]  # what the CPU package lists
NO_CUDA = pytest.mark.skipif(CUDA in ort.get_available_providers(), reason="this onnxruntime has CUDA")


@pytest.fixture(scope="module")
def add_one(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-node ONNX file: y = x + 1 on (N, 3) float32."""
    import onnx
    from onnx import TensorProto, helper

    one = helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "one"], ["y"])],
        "add_one",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        initializer=[one],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path_factory.mktemp("onnx") / "add_one.onnx"
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize(
    ("request_", "available", "expected"),
    [
        ("auto", GPU_BUILD, [TENSORRT, CUDA, CPU]),
        ("auto", [CUDA, CPU], [CUDA, CPU]),
        ("auto", CPU_BUILD, [CPU]),
        ("AUTO", [CPU, CUDA], [CUDA, CPU]),  # auto's own order, whatever order ONNX Runtime lists them in
        ("cpu", GPU_BUILD, [CPU]),
        ("cuda", GPU_BUILD, [CUDA, CPU]),
        ("tensorrt", GPU_BUILD, [TENSORRT, CUDA, CPU]),
        ("tensorrt,cpu", GPU_BUILD, [TENSORRT, CPU]),
        ("cuda, tensorrt", GPU_BUILD, [CUDA, TENSORRT, CPU]),  # an ordered list keeps its order
        ("CUDAExecutionProvider", GPU_BUILD, [CUDA, CPU]),
        ("cpu,cuda", GPU_BUILD, [CPU, CUDA]),
    ],
)
def test_selection_from_the_request_and_what_is_installed(
    request_: str, available: list[str], expected: list[str]
) -> None:
    assert select_providers(request_, available) == expected


@pytest.mark.parametrize(
    ("request_", "expected"),
    [
        ("auto", [CUDA, CPU]),
        ("tensorrt", [CUDA, CPU]),  # what follows TensorRT in its list
        ("tensorrt,cpu", [CPU]),
        ("cpu", [CPU]),
    ],
)
def test_graphs_with_changing_shapes_leave_tensorrt_out(request_: str, expected: list[str]) -> None:
    assert select_providers(request_, GPU_BUILD, tensorrt=False) == expected
    chosen = OrtProviders(request_, tensorrt=False).session_providers(GPU_BUILD)
    assert [name for name, _ in chosen] == expected


@pytest.mark.parametrize(
    ("request_", "available", "missing"),
    [
        ("cuda", CPU_BUILD, "CUDAExecutionProvider"),
        ("tensorrt", [CUDA, CPU], "TensorrtExecutionProvider"),
        ("tensorrt", CPU_BUILD, "TensorrtExecutionProvider, CUDAExecutionProvider"),
        ("cuda,cpu", CPU_BUILD, "CUDAExecutionProvider"),
    ],
)
def test_a_provider_asked_for_by_name_must_be_installed(
    request_: str, available: list[str], missing: str
) -> None:
    with pytest.raises(ProviderUnavailable, match=f"provider\\(s\\) {missing} asked for") as raised:
        select_providers(request_, available)
    assert raised.value.code == "provider_unavailable"
    assert "gpu` extra" in raised.value.message


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "at least one"),
        ("gpu", "unknown execution provider 'gpu'"),
        ("auto,cpu", "unknown execution provider 'auto'"),
        ("cuda,CUDAExecutionProvider", "named twice"),
    ],
)
def test_bad_requests_are_refused(value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_request(value)
    with pytest.raises(ValueError, match=message):
        OrtProviders(value)


def test_provider_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = OrtProviders("tensorrt", device_id=1, trt_cache_dir=tmp_path / "trt", trt_fp16=True)
    chosen = dict(settings.session_providers(GPU_BUILD))
    assert list(chosen) == [TENSORRT, CUDA, CPU]
    trt = chosen[TENSORRT]
    assert trt["trt_engine_cache_enable"] is True and trt["trt_fp16_enable"] is True
    assert trt["trt_engine_cache_path"] == str(tmp_path / "trt") and (tmp_path / "trt").is_dir()
    assert trt["device_id"] == chosen[CUDA]["device_id"] == 1
    assert chosen[CPU] == {}
    # The default cache is under SNAP2CAPTION_HOME, never inside an artifact folder.
    monkeypatch.setenv("SNAP2CAPTION_HOME", str(tmp_path / "home"))
    assert OrtProviders().cache_dir() == tmp_path / "home" / "trt-cache"


def test_settings_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert OrtProviders.from_env() == OrtProviders()  # auto, device 0, default cache, no fp16
    monkeypatch.setenv("SNAP2CAPTION_ORT_PROVIDERS", "tensorrt,cuda")
    monkeypatch.setenv("SNAP2CAPTION_ORT_DEVICE_ID", "2")
    monkeypatch.setenv("SNAP2CAPTION_ORT_TRT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("SNAP2CAPTION_ORT_TRT_FP16", "true")
    assert OrtProviders.from_env() == OrtProviders("tensorrt,cuda", 2, tmp_path, True)


def test_a_cpu_session_reports_the_cpu_provider(add_one: Path) -> None:
    for session in (ort_session(add_one, providers=OrtProviders("cpu")), cpu_session(add_one)):
        assert session.get_providers() == [CPU]
        (y,) = session.run(None, {"x": np.zeros((2, 3), np.float32)})
        assert y.tolist() == [[1.0] * 3] * 2


def test_auto_takes_the_best_installed_provider(add_one: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SNAP2CAPTION_ORT_PROVIDERS", raising=False)
    session = ort_session(add_one)  # the default: SNAP2CAPTION_ORT_PROVIDERS unset, so auto
    expected = select_providers("auto", ort.get_available_providers())
    assert session.get_providers()[0] == expected[0]
    assert session.get_providers()[-1] == CPU


@NO_CUDA
def test_asking_for_cuda_without_it_fails_at_load_time(
    add_one: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ProviderUnavailable, match="CUDAExecutionProvider asked for"):
        ort_session(add_one, providers=OrtProviders("cuda"))
    monkeypatch.setenv("SNAP2CAPTION_ORT_PROVIDERS", "tensorrt")  # the process-wide setting alike
    with pytest.raises(ProviderUnavailable, match="TensorrtExecutionProvider"):
        ort_session(add_one)


def test_a_provider_that_did_not_start_is_an_error_unless_auto(caplog: pytest.LogCaptureFixture) -> None:
    """onnxruntime-gpu lists CUDA even where it cannot start; the session then runs on the CPU."""
    check_session_providers("cuda", [CUDA, CPU], [CUDA, CPU], "m.onnx")  # got what it asked for
    with pytest.raises(ProviderUnavailable, match=r"m\.onnx: ONNX Runtime could not start .*CUDAExecution"):
        check_session_providers("cuda", [CUDA, CPU], [CPU], "m.onnx")
    with caplog.at_level(logging.WARNING, logger="snap2caption.models.providers"):
        check_session_providers("auto", [TENSORRT, CUDA, CPU], [CUDA, CPU], "m.onnx")
    assert "TensorrtExecutionProvider" in caplog.text and "could not start" in caplog.text


def test_only_a_decoder_with_a_pool_spins_between_ops() -> None:
    """Sessions sleep between ops (shared cores; a spinning pool takes a core from the next session); a
    decoder's session with several threads spins (a step of small ops pays a wake-up for each otherwise),
    with one it has no pool to spin."""
    spinning = "session.intra_op.allow_spinning"
    for threads in (1, 2):
        options = session_options(threads)
        assert options.intra_op_num_threads == threads and not options.enable_cpu_mem_arena
        assert options.get_session_config_entry(spinning) == "0"
        decoder = decoder_session_options(threads)
        assert decoder.intra_op_num_threads == threads and not decoder.enable_cpu_mem_arena
        assert decoder.get_session_config_entry(spinning) == ("1" if threads > 1 else "0")
    assert session_options(2, spin=True).get_session_config_entry(spinning) == "1"
    with pytest.raises(ValueError, match="threads must be >= 1"):
        session_options(0)
