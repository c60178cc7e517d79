"""``write_if_changed``: atomic writes that leave unchanged files (and their mtime) alone."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from snap2caption.data.files import write_if_changed


def test_writes_new_files_into_new_folders(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "labels.txt"
    assert write_if_changed(path, b"0 0.5 0.5 0.1 0.1\n") is True
    assert path.read_bytes() == b"0 0.5 0.5 0.1 0.1\n"
    assert path.stat().st_mode & 0o777 == 0o644
    assert os.listdir(path.parent) == ["labels.txt"]  # no temporary file left


def test_same_bytes_leave_the_file_untouched_and_other_bytes_replace_it(tmp_path: Path) -> None:
    path = tmp_path / "report.json"
    write_if_changed(path, b"{}")
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))  # an mtime no write now could give
    before = path.stat()
    assert write_if_changed(path, b"{}") is False
    assert (path.stat().st_mtime_ns, path.stat().st_ino) == (before.st_mtime_ns, before.st_ino)
    assert write_if_changed(path, b"[]") is True  # same size, other bytes
    assert path.read_bytes() == b"[]" and path.stat().st_mtime_ns != before.st_mtime_ns


def test_a_failed_write_leaves_no_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "captions.json"
    path.mkdir()  # the rename over it fails, as a full disk or a lost mount would fail it
    with pytest.raises(IsADirectoryError):
        write_if_changed(path, b"{}")
    assert os.listdir(tmp_path) == ["captions.json"] and path.is_dir()
