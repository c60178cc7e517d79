"""Reading and writing dataset files.

The format readers read annotation files through :func:`read_annotation_file`, so every way a file
can be unusable is the same ``BadRequest``. The format writers, the ETL and the feedback export all
write through :func:`write_if_changed`, so a re-run on unchanged inputs leaves every file (and its
mtime) as it was, which DVC and the ETL's cache rely on, and a reader never sees a half-written file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from snap2caption.errors import BadRequest


def read_annotation_file(path: Path, what: str) -> bytes:
    """The bytes of an annotation file, every way it can be unreadable turned into ``BadRequest``.

    Args:
        path: The annotation file.
        what: The format expected, for the error message ("COCO", "Flickr30K").

    Raises:
        BadRequest: The file is missing, a folder, or unreadable.
    """
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise BadRequest(f"{what} annotation file not found: {path}") from None
    except IsADirectoryError:
        raise BadRequest(f"{what} annotation path is a directory, not a file: {path}") from None
    except OSError as exc:
        raise BadRequest(f"cannot read {what} annotation file {path}: {exc.strerror or exc}") from None


def write_if_changed(path: str | os.PathLike[str], data: bytes) -> bool:
    """Atomically write ``data`` unless the file already holds exactly it (its mtime then stays).

    The bytes go to a temporary file beside the target, renamed over it; the folder is created when
    missing.

    Args:
        path: The file to write.
        data: Its whole content.

    Returns:
        Whether the file was written.
    """
    target = Path(path)
    try:
        if target.stat().st_size == len(data) and target.read_bytes() == data:
            return False
    except FileNotFoundError:
        target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        # mkstemp creates 0600; dataset files are shared data, readable like any other file.
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return True
