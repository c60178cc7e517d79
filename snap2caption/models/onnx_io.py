"""ONNX files as self-describing model files: metadata in ``metadata_props``, sessions, int8 variants.

Every ONNX file this project writes carries what a runtime needs besides the graph (class names, input
size, normalisation, letterbox, ...) as JSON strings in the model's ``metadata_props``, so a service can
check that the file it loaded is the one it expects. ONNX Runtime reads them back without the ``onnx``
package (:func:`session_metadata`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import onnxruntime

    from snap2caption.models.providers import OrtProviders

METADATA_FORMAT_KEY = "snap2caption.format"


def set_metadata(path: str | Path, metadata: Mapping[str, Any]) -> None:
    """Write ``metadata`` into the ``metadata_props`` of the ONNX file at ``path`` (in place).

    Strings are stored as they are, anything else as JSON; existing keys of the same name are replaced.
    """
    import onnx

    model = onnx.load(str(path))
    values = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    kept = [p for p in model.metadata_props if p.key not in values]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in values.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))


def read_metadata(path: str | Path) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file as a dict of strings (JSON values left encoded)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


def session_options(threads: int = 1, *, spin: bool = False) -> onnxruntime.SessionOptions:
    """CPU session options: ``threads`` intra-op threads, one inter-op thread, no arena, and the intra-op
    threads sleeping between ops unless ``spin``.

    Sleeping is the default because the cores are shared (other services, other models): a spinning thread
    burns time another process needs, and each session has a pool of its own, so even a second session of
    the same process (the caption encoder's, spinning after its call) takes a core from the one running
    next. ``spin`` pays off for a session called many times in a row with ops too small to hide a wake-up
    each, a decoder step, on cores the process has to itself: :func:`decoder_session_options`.
    """
    import onnxruntime as ort

    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    # No memory arena: it keeps the largest batch's buffers for good. Measured on the starter captioner
    # (batches of 1-16): peak RSS 363 MB without it vs 548 MB with it, the same speed within noise
    # (b16 607 vs 585 ms, b1 45.5 vs 43.3 ms, then 746 vs 780 and 52.2 vs 53.7 in a second round).
    options.enable_cpu_mem_arena = False
    return options


def decoder_session_options(threads: int = 1) -> onnxruntime.SessionOptions:
    """Options of an autoregressive decoder's session: as :func:`session_options`, spinning when it has
    several threads. One thread (the services' default on shared cores, ``snap2caption.serving.threads``)
    has no pool to spin; several are what a service is given when it has the cores to itself, and then
    sleeping between ops costs a wake-up per op, which a decoder step of a few hundred small ops pays in
    full: the paper-size int8 GPT-2 step at 2 threads took 5.9-6.2 ms sleeping and 4.3 ms spinning (quiet
    machine, ~20 tokens of past)."""
    return session_options(threads, spin=threads > 1)


def ort_session(
    path: str | Path,
    *,
    threads: int = 1,
    options: onnxruntime.SessionOptions | None = None,
    providers: OrtProviders | None = None,
) -> onnxruntime.InferenceSession:
    """An ONNX Runtime session on the execution providers ``providers`` chooses (TensorRT, CUDA, CPU).

    Args:
        path: The ONNX file.
        threads: Intra-op threads (ignored when ``options`` is given).
        options: Session options to use as they are (e.g. a service's own).
        providers: Provider settings; None: :meth:`OrtProviders.from_env` (``SNAP2CAPTION_ORT_PROVIDERS``,
            default ``auto``). ``session.get_providers()`` says what the session got.

    Raises:
        ProviderUnavailable: A provider asked for by name that is not installed or did not start.
    """
    import onnxruntime as ort

    from snap2caption.models.providers import OrtProviders, check_session_providers

    settings = providers or OrtProviders.from_env()
    chosen = settings.session_providers(ort.get_available_providers())
    session = ort.InferenceSession(
        str(path), sess_options=options or session_options(threads), providers=chosen
    )
    asked = [name for name, _ in chosen]
    check_session_providers(settings.request, asked, session.get_providers(), str(path))
    return session


def cpu_session(
    path: str | Path, *, threads: int = 1, options: onnxruntime.SessionOptions | None = None
) -> onnxruntime.InferenceSession:
    """An ONNX Runtime session on the CPU execution provider, whatever the settings (training's feature
    extraction, which hands its tensors to torch on the CPU)."""
    from snap2caption.models.providers import OrtProviders

    return ort_session(path, threads=threads, options=options, providers=OrtProviders("cpu"))


def session_metadata(session: onnxruntime.InferenceSession) -> dict[str, str]:
    """The ``metadata_props`` of the model a session runs."""
    return dict(session.get_modelmeta().custom_metadata_map)
