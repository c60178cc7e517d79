"""Which ONNX Runtime execution providers a session runs on: TensorRT, CUDA or the CPU, chosen once, here.

Every ONNX Runtime session of the project (caption encoder and decoder, detector, tagger) is opened by
:func:`snap2caption.models.onnx_io.ort_session` with an :class:`OrtProviders`, which this module turns into
the ``providers`` list ONNX Runtime takes:

- ``auto`` (default): TensorRT, then CUDA, then the CPU, among what the installed ``onnxruntime`` offers
  (``onnxruntime.get_available_providers()``): the CPU package offers the CPU alone, ``onnxruntime-gpu``
  (the ``gpu`` extra) CUDA and TensorRT too;
- ``cpu``, ``cuda`` (CUDA, then the CPU for the nodes CUDA lacks) or ``tensorrt`` (TensorRT, CUDA, CPU);
- an ordered list, ``tensorrt,cpu``: exactly those, the CPU always last (ONNX Runtime's own fallback).

A provider asked for by name that this ``onnxruntime`` lacks, or that the session did not get (e.g.
``onnxruntime-gpu`` on a machine without a usable CUDA), is :class:`~snap2caption.errors.ProviderUnavailable`
at load time, never a silent fallback to the CPU; only ``auto`` falls back, and says so in the log.

The TensorRT provider keeps its engines (and timing cache) in a cache folder, so a service builds an
engine once per model and GPU and later loads it in seconds: ``trt_cache_dir``, default
``$SNAP2CAPTION_HOME/trt-cache`` (never inside an artifact folder, whose files its manifest fixes). The
caption decoder never runs on TensorRT (``tensorrt=False``): its KV cache grows by one position per token,
a new input shape at every step, for which TensorRT would build engine after engine; it runs on what follows
TensorRT in the list (CUDA, then the CPU).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from snap2caption.errors import ProviderUnavailable

logger = logging.getLogger(__name__)

TENSORRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
# Short names, in the order `auto` prefers them.
PROVIDER_NAMES = {"tensorrt": TENSORRT, "cuda": CUDA, "cpu": CPU}
# What each single name stands for: a GPU provider with the ones ONNX Runtime falls back to behind it.
SHORTHANDS = {"cpu": (CPU,), "cuda": (CUDA, CPU), "tensorrt": (TENSORRT, CUDA, CPU)}
ENV_PREFIX = "SNAP2CAPTION_ORT_"


def parse_request(value: str) -> tuple[str, ...]:
    """``auto``, ``cpu``, ``cuda``, ``tensorrt`` or an ordered comma-separated list -> ONNX Runtime names.

    ``auto`` stays ``("auto",)``; full ONNX Runtime names (``CUDAExecutionProvider``) are accepted too; the
    CPU is appended to a list that lacks it.

    Raises:
        ValueError: An empty value, an unknown name, a name given twice, or ``auto`` inside a list.
    """
    names = [n.strip() for n in value.split(",") if n.strip()]
    if not names:
        raise ValueError("providers must name at least one execution provider (or be 'auto')")
    if [n.lower() for n in names] == ["auto"]:
        return ("auto",)
    if len(names) == 1 and names[0].lower() in SHORTHANDS:
        return SHORTHANDS[names[0].lower()]
    by_full_name = {full.lower(): full for full in PROVIDER_NAMES.values()}
    out: list[str] = []
    for name in names:
        full = PROVIDER_NAMES.get(name.lower()) or by_full_name.get(name.lower())
        if full is None:
            known = ", ".join(["auto", *PROVIDER_NAMES])
            raise ValueError(f"unknown execution provider {name!r} in providers={value!r} ({known})")
        if full in out:
            raise ValueError(f"execution provider {name!r} is named twice in providers={value!r}")
        out.append(full)
    return (*out, CPU) if CPU not in out else tuple(out)


def select_providers(request: str, available: Sequence[str], *, tensorrt: bool = True) -> list[str]:
    """The providers a session asks for, best first: the pure choice, from the request and what is installed.

    Args:
        request: ``auto``, ``cpu``, ``cuda``, ``tensorrt`` or an ordered list (:func:`parse_request`).
        available: ``onnxruntime.get_available_providers()``.
        tensorrt: False: leave TensorRT out (a graph with shapes that change at every call); the rest of
            the request stands.

    Raises:
        ValueError: A request :func:`parse_request` refuses.
        ProviderUnavailable: A provider asked for by name that ``available`` lacks.
    """
    wanted = parse_request(request)
    if wanted == ("auto",):
        wanted = tuple(p for p in (TENSORRT, CUDA, CPU) if p in available)
    if not tensorrt:
        wanted = tuple(p for p in wanted if p != TENSORRT)
    if not wanted:
        return [CPU]
    missing = [p for p in wanted if p not in available and p != CPU]  # ONNX Runtime always has the CPU
    if missing:
        raise ProviderUnavailable(
            f"ONNX Runtime execution provider(s) {', '.join(missing)} asked for (providers={request!r}) "
            f"but this onnxruntime has only {', '.join(available) or 'none'}; install the `gpu` extra "
            "(onnxruntime-gpu instead of onnxruntime) on a machine with CUDA, or set providers=auto or cpu"
        )
    return list(wanted)


@dataclass(frozen=True)
class OrtProviders:
    """The execution-provider settings of ONNX Runtime sessions.

    Attributes:
        request: ``auto``, ``cpu``, ``cuda``, ``tensorrt`` or an ordered list (``tensorrt,cuda,cpu``).
        device_id: The GPU the CUDA and TensorRT providers run on.
        trt_cache_dir: TensorRT engine and timing cache folder; None: ``$SNAP2CAPTION_HOME/trt-cache``.
        trt_fp16: Let TensorRT build fp16 engines (faster, not bit-identical to fp32).
        tensorrt: False for a graph whose shapes change at every call (the caption decoder): TensorRT
            left out of whatever the request names.
    """

    request: str = "auto"
    device_id: int = 0
    trt_cache_dir: Path | None = None
    trt_fp16: bool = False
    tensorrt: bool = True

    def __post_init__(self) -> None:
        parse_request(self.request)  # refuse a bad value when the settings are made, not at the first load
        if self.device_id < 0:
            raise ValueError(f"device_id must be >= 0, got {self.device_id}")

    @classmethod
    def from_env(cls) -> OrtProviders:
        """The process-wide settings: ``SNAP2CAPTION_ORT_PROVIDERS`` (``auto``), ``..._DEVICE_ID`` (0),
        ``..._TRT_CACHE_DIR`` and ``..._TRT_FP16`` (false); what a library call without settings uses."""
        env = os.environ
        cache = env.get(f"{ENV_PREFIX}TRT_CACHE_DIR")
        return cls(
            request=env.get(f"{ENV_PREFIX}PROVIDERS", "auto"),
            device_id=int(env.get(f"{ENV_PREFIX}DEVICE_ID", "0")),
            trt_cache_dir=Path(cache) if cache else None,
            trt_fp16=env.get(f"{ENV_PREFIX}TRT_FP16", "false").lower() in ("1", "true", "yes"),
        )

    def cache_dir(self) -> Path:
        """The TensorRT cache folder (not created)."""
        if self.trt_cache_dir is not None:
            return self.trt_cache_dir
        from snap2caption.registry import snap2caption_home

        return snap2caption_home() / "trt-cache"

    def session_providers(self, available: Sequence[str]) -> list[tuple[str, dict[str, Any]]]:
        """``providers`` for ``onnxruntime.InferenceSession``: each chosen provider with its options.

        Raises:
            ProviderUnavailable: A provider asked for by name is not installed.
        """
        chosen = select_providers(self.request, available, tensorrt=self.tensorrt)
        return [(name, self.options(name)) for name in chosen]

    def options(self, provider: str) -> dict[str, Any]:
        """The provider options of ``provider``."""
        if provider == TENSORRT:
            cache = self.cache_dir()
            cache.mkdir(parents=True, exist_ok=True)
            return {
                "device_id": self.device_id,
                # Engines are built once per model, shape profile and GPU, then loaded from here.
                "trt_engine_cache_enable": True,
                "trt_engine_cache_path": str(cache),
                "trt_timing_cache_enable": True,
                "trt_timing_cache_path": str(cache),
                "trt_fp16_enable": self.trt_fp16,
            }
        if provider == CUDA:
            # Grow the arena by what is asked, not by powers of two: the batches vary from 1 to 16.
            return {"device_id": self.device_id, "arena_extend_strategy": "kSameAsRequested"}
        return {}


def check_session_providers(request: str, asked: Sequence[str], got: Sequence[str], what: str) -> None:
    """After a session is made: a provider asked for by name that the session lacks is an error.

    ``onnxruntime-gpu`` lists CUDA and TensorRT as available even where their libraries or the GPU are
    missing; the session then runs on what is left. With ``auto`` that is logged; otherwise refused.

    Args:
        request: The request the providers were chosen from.
        asked: The provider names the session was given.
        got: ``session.get_providers()``.
        what: The model file, for the messages.

    Raises:
        ProviderUnavailable: A provider named in ``request`` that the session did not get.
    """
    lost = [p for p in asked if p not in got]
    if not lost:
        return
    if parse_request(request) == ("auto",):
        logger.warning("%s: providers %s could not start; running on %s", what, lost, list(got))
        return
    raise ProviderUnavailable(
        f"{what}: ONNX Runtime could not start execution provider(s) {', '.join(lost)} "
        f"(providers={request!r}; the session got {', '.join(got)}): is a CUDA GPU with its libraries "
        "(and TensorRT for tensorrt) present? Set providers=auto to fall back to the CPU"
    )
