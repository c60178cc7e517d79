"""What a backfill reads: the images of a folder or of a Parquet manifest, each named by a stable key."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from snap2caption.errors import BadRequest, NotFound

MANIFEST_PATH_COLUMN = "path"


@dataclass(frozen=True)
class ImageRef:
    """One image to do.

    Attributes:
        key: Its name in the output: the path relative to the input folder, or the manifest's ``path``
            value as written there. A run skips the keys the output already holds.
        file: Where to read it (absolute, so every Ray worker finds it on a shared file system).
    """

    key: str
    file: str


def list_images(source: Path, root: Path | None = None) -> list[ImageRef]:
    """The images of ``source``, sorted by key.

    Args:
        source: A folder (every regular file under it, hidden ones excepted: the decoder, not the
            extension, judges what is an image) or a ``.parquet`` manifest with a ``path`` column (the
            ETL's manifests have one).
        root: Folder that a manifest's relative paths start from; default the manifest's own folder.

    Raises:
        NotFound: ``source`` does not exist.
        BadRequest: A manifest without a ``path`` column, or ``root`` given with a folder.
    """
    source = source.expanduser().resolve()
    if source.is_dir():
        if root is not None:
            raise BadRequest("--root applies to a manifest input, not a folder")
        files = (p for p in source.rglob("*") if p.is_file() and not p.name.startswith("."))
        refs = [ImageRef(p.relative_to(source).as_posix(), str(p)) for p in files]
    elif source.is_file() and source.suffix == ".parquet":
        schema = pq.read_schema(source)
        if MANIFEST_PATH_COLUMN not in schema.names:
            raise BadRequest(f"{source} has no {MANIFEST_PATH_COLUMN!r} column (columns: {schema.names})")
        base = (root or source.parent).expanduser().resolve()
        paths = pq.read_table(source, columns=[MANIFEST_PATH_COLUMN]).column(0).to_pylist()
        refs = [ImageRef(str(p), str(base / str(p))) for p in dict.fromkeys(paths) if p]
    else:
        raise NotFound(f"input {source} is neither a folder nor a .parquet manifest")
    return sorted(refs, key=lambda ref: ref.key)
