"""Flickr30K ``results.csv``: ``image_name| comment_number| comment``, five rows per image.

The separator is ``|`` followed by a space, and the comment is free text, so this is not read with
the ``csv`` module (comments hold quotes that csv would interpret). The real file has malformed rows:
row 19,999 reads ``2199200615.jpg| 4   A dog runs ...`` with its second separator missing. Such rows
are logged and skipped; they never stop a run. The official ``results_20130124.token`` layout
(``1000092795.jpg#0<TAB>caption``) is read too. :func:`write_flickr30k_csv` writes the Kaggle layout.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePosixPath

from snap2caption.data.files import read_annotation_file, write_if_changed
from snap2caption.data.records import SourceDataset, SourceRecord
from snap2caption.errors import BadRequest

log = logging.getLogger(__name__)

_HEADER = ["image_name", "comment_number", "comment"]
_TOKEN_ROW = re.compile(r"^(?P<name>[^\t#]+)#(?P<num>\d+)\t(?P<comment>.*)$")
_MAX_ROW_WARNINGS = 20  # then one summary line, so a badly broken file does not flood the log


def _parse_row(line: str, token_format: bool) -> tuple[str, int, str] | None:
    """``(image_name, comment_number, comment)``, or ``None`` when the row is malformed."""
    if token_format:
        match = _TOKEN_ROW.match(line)
        if match is None:
            return None
        return match["name"].strip(), int(match["num"]), match["comment"]
    fields = line.split("|", 2)
    if len(fields) != 3:
        return None
    name, number, comment = (f.strip() for f in fields)
    if not name or not number.isdigit():
        return None
    return name, int(number), comment


def _read_file(path: Path, rows: dict[str, list[tuple[int, str]]]) -> int:
    """Add the rows of one file to ``rows`` (image name -> [(comment number, comment)]); count skips."""
    data = read_annotation_file(path, "Flickr30K")
    lines = data.removeprefix(b"\xef\xbb\xbf").splitlines()
    first = next((i for i, raw in enumerate(lines) if raw.strip()), None)
    if first is None:
        raise BadRequest(f"Flickr30K annotation file {path} is empty")
    head = lines[first].decode("utf-8", errors="replace")
    if [f.strip() for f in head.split("|")] == _HEADER:
        token_format, start = False, first + 1
    elif _TOKEN_ROW.match(head):
        token_format, start = True, first
    else:
        raise BadRequest(
            f"{path} is not a Flickr30K results.csv: expected the header "
            f"'image_name| comment_number| comment', got {head[:80]!r}"
        )
    skipped = 0
    for line_no, raw in enumerate(lines[start:], start=start + 1):
        if not raw.strip():
            continue
        try:
            parsed = _parse_row(raw.decode("utf-8"), token_format)
        except UnicodeDecodeError:
            parsed = None
        if parsed is None:
            skipped += 1
            if skipped <= _MAX_ROW_WARNINGS:
                log.warning("flickr30k: %s line %d is malformed, skipped: %r", path.name, line_no, raw[:120])
            continue
        name, number, comment = parsed
        rows.setdefault(name, []).append((number, comment))
    if skipped > _MAX_ROW_WARNINGS:
        log.warning("flickr30k: %s: %d malformed lines skipped in all", path.name, skipped)
    return skipped


def read(images_dir: Path, annotation_paths: Sequence[Path]) -> SourceDataset:
    """Read Flickr30K caption files and group their rows by image.

    Args:
        images_dir: The folder holding the ``*.jpg`` files (``flickr30k_images/``).
        annotation_paths: One or more ``results.csv`` (or ``results_20130124.token``) files.

    Returns:
        One record per image, in order of first appearance, captions ordered by comment number,
        image id = the file stem (``1000092795``), no split (the ETL computes one).

    Raises:
        BadRequest: No file given, or a file is missing, empty, or without the results.csv header.
    """
    if not annotation_paths:
        raise BadRequest("Flickr30K needs at least one results.csv file")
    rows: dict[str, list[tuple[int, str]]] = {}
    skipped = sum(_read_file(path, rows) for path in annotation_paths)
    records = [
        SourceRecord(
            image_id=PurePosixPath(name).stem,
            file_name=name,
            # sorted() is stable: repeated comment numbers keep their file order.
            captions=[comment for _, comment in sorted(comments, key=lambda nc: nc[0])],
        )
        for name, comments in rows.items()
    ]
    log.info(
        "flickr30k: %d images, %d captions, %d malformed rows skipped",
        len(records),
        sum(len(r.captions) for r in records),
        skipped,
    )
    return SourceDataset(source="flickr30k", records=records)


# ------------------------------------------------------------------------------------------ writing


def flickr30k_comment(caption: str) -> str:
    """Format a caption as the Kaggle ``results.csv`` stores it: punctuation spaced off, ending in `` .``.

    The real file is tokenised text (``"Two men , one in a gray shirt , ..."``) with a space before the
    final period; we reproduce that rather than a cleaned form so readers are tested on the real thing.

    Args:
        caption: Any caption (whitespace is collapsed).

    Returns:
        The comment field, e.g. ``"a red circle , a blue square ."``.

    Raises:
        ValueError: If the caption contains ``|``, which the format cannot represent.
    """
    if "|" in caption:
        raise ValueError(f"caption contains '|', which results.csv cannot hold: {caption!r}")
    text = " ".join(caption.split())
    text = re.sub(r"\s*([,;:])\s*", r" \1 ", text)
    text = " ".join(text.split())
    ending = "."
    if text and text[-1] in ".!?":
        ending = text[-1]
        text = text[:-1].rstrip()
    return f"{text} {ending}" if text else ending


def write_flickr30k_csv(records: Iterable[SourceRecord], path: str | os.PathLike[str]) -> None:
    """Write the Kaggle Flickr30K ``results.csv``: ``image_name| comment_number| comment`` rows.

    Separators are a pipe and a space, comments are numbered from 0 per image, and each comment is
    formatted by :func:`flickr30k_comment` (space before the final period), as in the real file.

    Args:
        records: Images in order; ``image_name`` is the base name of each ``file_name``.
        path: Output file.
    """
    lines = ["image_name| comment_number| comment"]
    for record in records:
        name = record.file_name.rpartition("/")[2]
        for number, caption in enumerate(record.captions):
            lines.append(f"{name}| {number}| {flickr30k_comment(caption)}")
    write_if_changed(path, ("\n".join(lines) + "\n").encode())
