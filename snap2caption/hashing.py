"""The sha256 of a file: one helper for every place that hashes files (model manifests, the ETL,
dataset versions, training's manifest provenance)."""

from __future__ import annotations

import hashlib
import os


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes, read in blocks (a model file never sits in memory whole).

    Args:
        path: The file.

    Returns:
        The 64-character lowercase hex digest.

    Raises:
        OSError: The file cannot be opened or read.
    """
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()
