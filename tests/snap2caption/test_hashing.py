"""``sha256_file``: the one file hash of the code base."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from snap2caption.hashing import sha256_file


@pytest.mark.parametrize("size", [0, 1, (1 << 20) + 7])  # empty, tiny, and more than one read block
def test_sha256_file_is_the_sha256_of_the_bytes(tmp_path: Path, size: int) -> None:
    data = bytes(i % 251 for i in range(size))
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
    assert sha256_file(str(path)) == sha256_file(path)


def test_sha256_file_of_a_missing_file_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        sha256_file(tmp_path / "missing")
