"""Caption training data: ETL manifests -> (image, caption) pairs -> token batches.

The ETL (``snap2caption data etl``) writes ``manifests/{train,val,test}.parquet`` with one row per image
(``image_id``, ``path`` relative to the dataset folder, ``captions``). Training sees every (image, caption)
pair once per epoch, in an order fixed by ``(seed, epoch)`` alone, so a run resumed at step ``s`` sees the
same batches from ``s`` on as an uninterrupted one. Images enter either as pixels (decoded and preprocessed
with the model's own :class:`~snap2caption.imaging.Preprocess`, exactly as serving does) or as cached
encoder features (:mod:`training.caption.features`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from snap2caption.hashing import sha256_file
from snap2caption.imaging import Preprocess, decode_file
from snap2caption.models.caption.tokenizer import CaptionTokenizer
from training.caption.attention import (
    MAX_PHRASES,
    phrase_targets,
    read_boxes,
    separator_ids,
    token_targets,
)
from training.caption.attention import prefix_order as order_by_prefix

SPLITS = ("train", "val", "test")


def manifest_path(data_dir: str | os.PathLike[str], split: str) -> Path:
    """``<data_dir>/manifests/<split>.parquet``."""
    return Path(data_dir) / "manifests" / f"{split}.parquet"


@dataclass
class SplitData:
    """One split of an ETL output: image ids, absolute image paths and reference captions, in manifest order.

    Attributes:
        name: ``train``, ``val`` or ``test``.
        data_dir: The dataset folder.
        image_ids: Image ids.
        paths: Absolute paths of the resized images.
        captions: Reference captions of each image (the ETL normalised them).
        manifest_sha256: Hash of the manifest file: what cached features and run tags are keyed by.
    """

    name: str
    data_dir: Path
    image_ids: list[str]
    paths: list[Path]
    captions: list[list[str]]
    manifest_sha256: str

    @classmethod
    def load(cls, data_dir: str | os.PathLike[str], split: str) -> SplitData:
        """Read ``manifests/<split>.parquet``.

        Raises:
            FileNotFoundError: No such manifest (the ETL has not run on ``data_dir``).
            ValueError: The split has no images.
        """
        import pyarrow.parquet as pq

        path = manifest_path(data_dir, split)
        if not path.is_file():
            raise FileNotFoundError(
                f"no manifest {path}: run `snap2caption data etl ... --out {data_dir}` (or `dvc repro etl`)"
            )
        table = pq.read_table(path, columns=["image_id", "path", "captions"]).to_pydict()
        if not table["image_id"]:
            raise ValueError(f"{path} lists no images")
        root = Path(data_dir).resolve()
        return cls(
            name=split,
            data_dir=root,
            image_ids=[str(i) for i in table["image_id"]],
            paths=[root / p for p in table["path"]],
            captions=[list(c) for c in table["captions"]],
            manifest_sha256=sha256_file(path),
        )

    def __len__(self) -> int:
        return len(self.image_ids)

    def head(self, n: int) -> SplitData:
        """The first ``n`` images (all of them when ``n`` is 0 or too large); manifest order is stable."""
        if n <= 0 or n >= len(self):
            return self
        return SplitData(
            self.name,
            self.data_dir,
            self.image_ids[:n],
            self.paths[:n],
            self.captions[:n],
            self.manifest_sha256,
        )

    def references(self) -> dict[str, list[str]]:
        """Image id -> reference captions, as the metrics take them."""
        return dict(zip(self.image_ids, self.captions, strict=True))


class ImageDataset(Dataset[Tensor]):
    """Images of a split, decoded with the safe decoder and preprocessed: item ``i`` is (3, H, W) float32."""

    def __init__(self, paths: Sequence[Path], preprocess: Preprocess) -> None:
        self.paths = list(paths)
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Tensor:
        image = decode_file(self.paths[index]).image
        return torch.from_numpy(self.preprocess(image))  # (3, H, W)


def image_loader(
    paths: Sequence[Path], preprocess: Preprocess, batch_size: int, num_workers: int
) -> DataLoader[Tensor]:
    """Batches of (B, 3, H, W) pixels in order (for feature extraction and evaluation)."""
    return DataLoader(
        ImageDataset(paths, preprocess),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        generator=torch.Generator(),  # never draws from the global RNG (dropout's)
    )


Pair = tuple[Tensor, str, Tensor | None]


class CaptionPairs(Dataset[Pair]):
    """Every (image, caption) pair of a split; item ``i`` is ``(image input, caption, attention targets)``.

    The image input is row ``j`` of precomputed ``features`` (C, h, w), or the preprocessed pixels
    (3, H, W) of the image file when ``features`` is None. The attention targets are None until
    :meth:`add_attention_targets`.

    Args:
        split: The split.
        captions_per_image: Captions per image to use (the first ones in manifest order); 0 = all.
        features: (N, C, h, w) encoder features, one row per image of ``split`` in order; or None.
        preprocess: Pixel preprocessing (required without ``features``).
    """

    def __init__(
        self,
        split: SplitData,
        captions_per_image: int = 0,
        *,
        features: Tensor | None = None,
        preprocess: Preprocess | None = None,
    ) -> None:
        if features is None and preprocess is None:
            raise ValueError("CaptionPairs needs features or a preprocess")
        if features is not None and features.shape[0] != len(split):
            raise ValueError(f"{features.shape[0]} feature rows for {len(split)} images")
        self.split = split
        self.features = features
        self.images = ImageDataset(split.paths, preprocess) if preprocess is not None else None
        keep = captions_per_image or None
        self.pairs = [(i, c) for i, caps in enumerate(split.captions) for c in caps[:keep]]
        self.attention: Tensor | None = None

    def add_attention_targets(
        self, preprocess: Preprocess, grid: tuple[int, int], *, prefix_order: bool = False
    ) -> int:
        """Compute each pair's per-phrase attention targets from the manifest's boxes
        (:mod:`training.caption.attention`); returns how many pairs got targets.

        With ``prefix_order``, each caption whose phrases all name boxes is first rewritten with its phrases
        in the order the column-major prefix visits their boxes (:func:`~training.caption.attention.
        prefix_order`): the training target then changes, not only its attention targets.
        """
        images = read_boxes(self.split.data_dir, self.split.name, self.split.image_ids)
        matches = None
        if prefix_order:
            ordered = [
                order_by_prefix(c, images[i][1], images[i][0], preprocess, grid) for i, c in self.pairs
            ]
            self.pairs = [(i, o[0] if o else c) for (i, c), o in zip(self.pairs, ordered, strict=True)]
            matches = [o[1] if o else None for o in ordered]
        self.attention = phrase_targets(
            [c for _, c in self.pairs],
            [images[i] for i, _ in self.pairs],
            preprocess,
            grid,
            MAX_PHRASES,
            matches,
        )
        return int((self.attention.flatten(1).sum(1) > 0).sum())

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> Pair:
        image, caption = self.pairs[index]
        targets = self.attention[index] if self.attention is not None else None
        if self.features is not None:
            return self.features[image], caption, targets  # (C, h, w), stored dtype
        assert self.images is not None
        return self.images[image], caption, targets  # (3, H, W)


@dataclass
class CaptionBatch:
    """A collated micro-batch.

    Attributes:
        images: (B, C, h, w) float32 encoder features, or (B, 3, H, W) pixels.
        input_ids: (B, T) ``<bos> tokens <eos> <pad>..``.
        attention_mask: (B, T) 1 on real tokens.
        is_features: Whether ``images`` holds features (else pixels).
        attention_targets: (B, T, P) where each caption position should look among the prefix cells
            (:func:`training.caption.attention.token_targets`), or None.
    """

    images: Tensor
    input_ids: Tensor
    attention_mask: Tensor
    is_features: bool
    attention_targets: Tensor | None = None

    @property
    def n_targets(self) -> int:
        """Predicted tokens in the batch (every real token after BOS): the loss's denominator."""
        return int(self.attention_mask[:, 1:].sum())

    def to(self, device: torch.device) -> CaptionBatch:
        return CaptionBatch(
            self.images.to(device, non_blocking=True),
            self.input_ids.to(device, non_blocking=True),
            self.attention_mask.to(device, non_blocking=True),
            self.is_features,
            None if self.attention_targets is None else self.attention_targets.to(device, non_blocking=True),
        )


class CaptionCollator:
    """Stack image inputs (features upcast to float32) and tokenize captions with the model's tokenizer."""

    def __init__(self, tokenizer: CaptionTokenizer, max_tokens: int, is_features: bool) -> None:
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.is_features = is_features
        self.separators: set[int] | None = None  # phrase ends, once pairs bring attention targets

    def __call__(self, items: Sequence[Pair]) -> CaptionBatch:
        images = torch.stack([image for image, _, _ in items]).float()
        input_ids, attention_mask = self.tokenizer.batch_encode([c for _, c, _ in items], self.max_tokens)
        targets = [t for _, _, t in items if t is not None]
        per_token = None
        if targets and len(targets) == len(items):
            if self.separators is None:
                self.separators = separator_ids(self.tokenizer)
            per_token = token_targets(input_ids, torch.stack(targets), self.separators, self.tokenizer.eos_id)
        return CaptionBatch(images, input_ids, attention_mask, self.is_features, per_token)


def epoch_batches(n_pairs: int, effective_batch: int, seed: int, epoch: int) -> list[list[int]]:
    """One epoch's effective batches: a permutation fixed by ``(seed, epoch)``, a partial last batch dropped.

    Raises:
        ValueError: Fewer pairs than one effective batch.
    """
    if n_pairs < effective_batch:
        raise ValueError(f"{n_pairs} training pairs cannot fill one batch of {effective_batch}")
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n_pairs, generator=generator).tolist()
    n_batches = n_pairs // effective_batch
    return [order[b * effective_batch : (b + 1) * effective_batch] for b in range(n_batches)]


def pair_loader(
    pairs: CaptionPairs,
    collate: CaptionCollator,
    batches: Sequence[Sequence[int]],
    micro_batch: int,
    num_workers: int,
) -> Iterable[CaptionBatch]:
    """Micro-batches of the given effective batches, in order (each cut into ``micro_batch``-sized parts)."""
    micro = [list(b[i : i + micro_batch]) for b in batches for i in range(0, len(b), micro_batch)]
    loader = DataLoader(
        pairs,
        batch_sampler=micro,
        collate_fn=collate,
        num_workers=num_workers if pairs.features is None else 0,  # features are in memory already
        generator=torch.Generator(),  # never draws from the global RNG, so resumed dropout matches
        persistent_workers=False,
    )
    return cast(Iterable[CaptionBatch], loader)  # collate_fn turns the items into CaptionBatch
