"""How many threads a model service's runtime uses.

Torch's pools are process-wide and set here once, at startup; ONNX Runtime takes its thread count per
session (``snap2caption.models.onnx_io.session_options``), from the same service setting.

Default: one intra-op thread per service process. On the 2 shared cores this project runs on, several
service processes (captioner, detector, gateway) and their batcher threads compete for the same cores,
and torch with 2 intra-op threads in each process was measured about 10x slower than with 1: OpenMP
workers spin-wait for cores another process holds. More threads pay off only on a machine whose cores
one process has to itself; raise the service's ``THREADS`` setting there (or run more batches at once
with the batcher's ``concurrency``, each single-threaded).
"""

from __future__ import annotations

import logging
import os
import sys

logger = logging.getLogger(__name__)


def configure_torch_threads(intra_op: int, inter_op: int = 1) -> None:
    """Set torch's thread pools for this process; call once, before the first model call.

    Args:
        intra_op: Threads inside one op (matmul, conv): ``torch.set_num_threads``.
        inter_op: Threads running independent ops in parallel (TorchScript / autograd only); torch
            accepts this once per process, before any parallel work, so a later call keeps the first.
    """
    if intra_op < 1 or inter_op < 1:
        raise ValueError(f"thread counts must be >= 1, got intra_op={intra_op}, inter_op={inter_op}")
    if "torch" not in sys.modules:
        # Nothing here runs torch yet (the ONNX runtimes never do): importing it only to size its pools
        # would cost ~480 MB of memory. Should it be imported later, its pools start from this variable.
        os.environ["OMP_NUM_THREADS"] = str(intra_op)
        logger.info("torch not loaded; OMP_NUM_THREADS=%d for it if it ever is", intra_op)
        return
    import torch

    torch.set_num_threads(intra_op)
    try:
        torch.set_num_interop_threads(inter_op)
    except RuntimeError:  # already set, or parallel work has started: keep what is there
        logger.debug("torch inter-op threads already fixed at %d", torch.get_num_interop_threads())
    logger.info(
        "torch threads: intra-op %d, inter-op %d", torch.get_num_threads(), torch.get_num_interop_threads()
    )
