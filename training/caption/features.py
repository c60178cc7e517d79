"""Cached encoder features: with a frozen encoder, each image goes through it once, not once per epoch.

Layout under the cache folder (a DVC output of the ``caption-features`` stage)::

    <root>/<encoder name>/<split>-<key[:16]>.safetensors   "features": (N, C, h, w), fp16 or fp32
    <root>/<encoder name>/<split>-<key[:16]>.json          the key's parts and the image ids, in row order

The key hashes everything the numbers depend on: the encoder's weights (a hash of its state dict, so a
randomly initialised encoder never matches another one), its preprocessing, the split's manifest (sha256)
and the stored dtype. A cache entry whose key or image ids differ is never used; writing a new entry for a
split removes that split's older entries for the same encoder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm import tqdm

from snap2caption.models.backbones import ImageEncoder
from training.caption.data import SplitData, image_loader

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
DTYPES = {"float16": torch.float16, "float32": torch.float32}
Runtime = Literal["torch", "onnxruntime"]


def encoder_fingerprint(encoder: ImageEncoder) -> str:
    """sha256 over the encoder's name and every tensor of its state dict (names, shapes, dtypes, bytes)."""
    digest = hashlib.sha256(encoder.name.encode())
    for name, tensor in encoder.state_dict().items():
        value = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{tuple(tensor.shape)}:{value.dtype}".encode())
        digest.update(value.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class FeatureKey:
    """What a split's cached features depend on.

    Attributes:
        encoder: Encoder name.
        encoder_sha256: :func:`encoder_fingerprint` of its weights.
        preprocess: ``Preprocess.to_dict()`` of the pixels it was fed.
        manifest_sha256: sha256 of the split's manifest.
        split: Split name.
        dtype: Stored dtype (``float16`` / ``float32``).
    """

    encoder: str
    encoder_sha256: str
    preprocess: dict[str, Any]
    manifest_sha256: str
    split: str
    dtype: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "encoder": self.encoder,
            "encoder_sha256": self.encoder_sha256,
            "preprocess": self.preprocess,
            "manifest_sha256": self.manifest_sha256,
            "split": self.split,
            "dtype": self.dtype,
        }

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True).encode()).hexdigest()

    def paths(self, root: str | os.PathLike[str]) -> tuple[Path, Path]:
        """``(tensor file, index file)`` of this key under ``root``."""
        stem = Path(root) / self.encoder / f"{self.split}-{self.digest[:16]}"
        return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


def load_cached(root: str | os.PathLike[str], key: FeatureKey, split: SplitData) -> Tensor | None:
    """The cached (N, C, h, w) features for ``key``, or None when missing or not an exact match."""
    tensor_path, index_path = key.paths(root)
    if not tensor_path.is_file() or not index_path.is_file():
        return None
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        features = load_file(str(tensor_path))["features"]
    except (OSError, ValueError, KeyError) as exc:
        logger.warning("feature cache %s unreadable (%s); recomputing", tensor_path, exc)
        return None
    if index.get("key") != key.as_dict() or index.get("image_ids") != split.image_ids:
        logger.warning("feature cache %s does not match its key or image ids; recomputing", tensor_path)
        return None
    if features.shape[0] != len(split) or features.dtype != DTYPES[key.dtype]:
        logger.warning("feature cache %s has the wrong shape or dtype; recomputing", tensor_path)
        return None
    return features


def _onnx_runner(encoder: ImageEncoder, folder: Path) -> Callable[[Tensor], Tensor]:
    """The encoder exported to ONNX and run by ONNX Runtime on the CPU: (B, 3, H, W) -> (B, C, h, w).

    EfficientNet's depthwise convolutions run about 3x faster there than in eager PyTorch on a CPU
    (measured here: 54 vs 162 ms per 224-px image on one thread); the outputs agree to ~3e-5.
    """
    from snap2caption.models.onnx_export import export_onnx
    from snap2caption.models.onnx_io import cpu_session

    crop = encoder.preprocess.crop
    path = export_onnx(
        encoder,
        folder / "encoder.onnx",
        torch.zeros(1, 3, crop, crop),
        input_name="pixels",
        output_name="grid",
        metadata={"snap2caption.format": "caption_encoder_features"},
    )
    session = cpu_session(path, threads=torch.get_num_threads())
    return lambda pixels: torch.from_numpy(session.run(None, {"pixels": pixels.numpy()})[0])


@contextlib.contextmanager
def encoder_runner(
    encoder: ImageEncoder, runtime: Runtime, device: torch.device
) -> Iterator[Callable[[Tensor], Tensor]]:
    """What computes the encoder's (B, C, h, w) grids from (B, 3, H, W) pixels, for any number of passes:
    eager PyTorch on ``device``, or ``onnxruntime`` (the encoder exported once, to a temporary folder kept
    for as long as this is open). The encoder is in eval mode meanwhile."""
    was_training = encoder.training
    encoder.eval()
    try:
        if runtime == "onnxruntime":
            with tempfile.TemporaryDirectory() as folder:
                yield _onnx_runner(encoder, Path(folder))
        else:
            yield lambda pixels: encoder(pixels.to(device))
    finally:
        encoder.train(was_training)


@torch.inference_mode()
def extract_features(
    encoder: ImageEncoder,
    split: SplitData,
    *,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    dtype: torch.dtype,
    runtime: Runtime = "torch",
    progress: bool = True,
    run: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Run the encoder over every image of a split, in manifest order.

    Args:
        encoder: The encoder (its eval-mode outputs are computed).
        split: The images.
        batch_size: Images per pass.
        num_workers: Decoding workers.
        device: Where a ``torch`` runtime runs.
        dtype: Stored dtype.
        runtime: ``torch``, or ``onnxruntime`` (CPU; the encoder is exported to a temporary ONNX file).
        progress: Show a tqdm bar.
        run: An open :func:`encoder_runner` to use instead of one for ``runtime`` (one ONNX export for
            several splits).

    Returns:
        (N, C, h, w) features on CPU in ``dtype``.
    """
    rows: list[Tensor] = []
    loader = image_loader(split.paths, encoder.preprocess, batch_size, num_workers)
    with contextlib.ExitStack() as stack:
        if run is None:
            run = stack.enter_context(encoder_runner(encoder, runtime, device))
        bar = stack.enter_context(
            tqdm(total=len(split), desc=f"features {split.name}", unit="img", disable=not progress)
        )
        for pixels in loader:
            rows.append(run(pixels).to("cpu", dtype))  # (B, C, h, w)
            bar.update(pixels.shape[0])
    return torch.cat(rows)


def cached_features(
    encoder: ImageEncoder,
    split: SplitData,
    root: str | os.PathLike[str],
    *,
    dtype: str = "float16",
    batch_size: int = 64,
    num_workers: int = 0,
    device: torch.device | None = None,
    runtime: Runtime = "torch",
    progress: bool = True,
) -> Tensor:
    """Features of a split from the cache, computed and stored first when missing or stale.

    Args:
        encoder: The (frozen) encoder whose features are wanted.
        split: The split.
        root: Cache folder.
        dtype: ``float16`` or ``float32``.
        batch_size: Images per encoder pass.
        num_workers: Decoding workers.
        device: Where the encoder runs (default: where its weights are).
        runtime: What runs the encoder: ``torch`` or ``onnxruntime`` (CPU). Not part of the key: both
            compute the same features (to ~3e-5, far below float16's rounding).
        progress: Show a tqdm bar.

    Returns:
        (N, C, h, w) features on CPU, stored dtype, rows in ``split`` order.
    """
    key = FeatureKey(
        encoder=encoder.name,
        encoder_sha256=encoder_fingerprint(encoder),
        preprocess=encoder.preprocess.to_dict(),
        manifest_sha256=split.manifest_sha256,
        split=split.name,
        dtype=dtype,
    )
    found = load_cached(root, key, split)
    if found is not None:
        logger.info("features %s: %s from cache %s", split.name, tuple(found.shape), key.paths(root)[0])
        return found
    started = time.perf_counter()
    device = device or next(encoder.parameters()).device
    features = extract_features(
        encoder,
        split,
        batch_size=batch_size,
        num_workers=num_workers,
        device=device,
        dtype=DTYPES[dtype],
        runtime=runtime if device.type == "cpu" else "torch",
        progress=progress,
    )
    tensor_path, index_path = key.paths(root)
    tensor_path.parent.mkdir(parents=True, exist_ok=True)
    for stale in tensor_path.parent.glob(f"{split.name}-*"):
        if stale not in (tensor_path, index_path):
            stale.unlink()
    # Index last: an interrupted write leaves no index, so the entry is never trusted.
    index_path.unlink(missing_ok=True)
    save_file({"features": features.contiguous()}, str(tensor_path))
    index = {"key": key.as_dict(), "image_ids": split.image_ids, "shape": list(features.shape)}
    index_path.write_text(json.dumps(index) + "\n", encoding="utf-8")
    logger.info(
        "features %s: %s in %.1f s -> %s",
        split.name,
        tuple(features.shape),
        time.perf_counter() - started,
        tensor_path,
    )
    return features
