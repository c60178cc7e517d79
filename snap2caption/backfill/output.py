"""The backfill's output folder: result and quarantine rows as Parquet parts, written whole or not at all.

::

    OUT/results/part-000000.parquet ...     one row per image done (RESULT_SCHEMA)
    OUT/quarantine/part-000000.parquet ...  one row per file the decoder refused (QUARANTINE_SCHEMA)
    OUT/summary.json                        the last run's counts, throughput, model versions, nodes

Each part is written to a hidden temporary file and renamed into place, so a reader (or the next run)
sees whole parts only; part numbers continue after the highest already there, so a resumed run never
overwrites. The keys in both folders are the images already done: a run skips them.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

RESULTS, QUARANTINE = "results", "quarantine"
SUMMARY = "summary.json"

TAG_TYPE = pa.struct([("name", pa.string()), ("score", pa.float32()), ("hashtag", pa.string())])
BOX_TYPE = pa.struct([("x1", pa.float32()), ("y1", pa.float32()), ("x2", pa.float32()), ("y2", pa.float32())])
OBJECT_TYPE = pa.struct([("label", pa.string()), ("score", pa.float32()), ("box", BOX_TYPE)])
RESULT_SCHEMA = pa.schema(
    [
        ("path", pa.string()),  # the image's key: relative to the input folder, or the manifest's path
        ("sha256", pa.string()),  # of the file's bytes
        ("format", pa.string()),
        ("width", pa.int32()),  # the original's, after EXIF orientation: the frame of the boxes
        ("height", pa.int32()),
        ("caption", pa.string()),  # null: not asked for
        ("caption_confidence", pa.float32()),  # calibrated probability that it is right (when calibrated)
        ("caption_in_domain", pa.bool_()),  # the captioner's domain answer (null: no domain model)
        ("alt_text", pa.string()),
        ("alt_text_source", pa.string()),  # caption | fallback
        ("tags", pa.list_(TAG_TYPE)),
        ("objects", pa.list_(OBJECT_TYPE)),  # empty when the detector is outside its domain (withheld)
        ("objects_in_domain", pa.bool_()),  # the detector's domain answer (null: no domain model)
        ("objects_withheld", pa.int32()),  # detections withheld because the image is outside its domain
        ("caption_model", pa.string()),  # NAME/VERSION of the model that wrote the column
        ("tags_model", pa.string()),
        ("objects_model", pa.string()),
    ]
)
QUARANTINE_SCHEMA = pa.schema([("path", pa.string()), ("sha256", pa.string()), ("reason", pa.string())])


def done_keys(out: Path) -> set[str]:
    """The keys of every image the output already holds, done or quarantined."""
    keys: set[str] = set()
    for folder in (RESULTS, QUARANTINE):
        for part in sorted((out / folder).glob("part-*.parquet")):
            keys.update(pq.read_table(part, columns=["path"]).column(0).to_pylist())
    return keys


def read_results(out: Path, folder: str = RESULTS) -> pa.Table:
    """Every row of ``out/<folder>`` as one table, sorted by path (empty with the schema when none)."""
    schema = RESULT_SCHEMA if folder == RESULTS else QUARANTINE_SCHEMA
    parts = sorted((out / folder).glob("part-*.parquet"))
    if not parts:
        return schema.empty_table()
    return pa.concat_tables(pq.read_table(p, schema=schema) for p in parts).sort_by("path")


def result_row(row: dict[str, Any]) -> dict[str, Any]:
    """A pipeline row (tags and objects as JSON text) -> a :data:`RESULT_SCHEMA` row."""
    out = {name: row.get(name) for name in RESULT_SCHEMA.names}
    out["path"] = row["key"]
    for column in ("tags", "objects"):
        out[column] = json.loads(row[column]) if row.get(column) else None
    # Ray Data carries a column whose values are all None as floats (NaN): back to null, and to the
    # column's own type otherwise.
    for column, kind in (("caption_in_domain", bool), ("objects_in_domain", bool), ("objects_withheld", int)):
        value = out[column]
        if value is None or (isinstance(value, float) and math.isnan(value)):
            out[column] = None
        else:
            out[column] = kind(value)
    return out


class PartWriter:
    """Writes rows of one schema into ``folder`` as numbered Parquet parts.

    Args:
        folder: The parts' folder (created).
        schema: Their schema.
    """

    def __init__(self, folder: Path, schema: pa.Schema) -> None:
        self.folder = folder
        self.schema = schema
        folder.mkdir(parents=True, exist_ok=True)
        numbers = [int(p.stem.removeprefix("part-")) for p in folder.glob("part-*.parquet")]
        self.next = max(numbers, default=-1) + 1

    def write(self, rows: Iterable[dict[str, Any]]) -> Path | None:
        """Write ``rows`` as the next part (nothing for no rows); returns its path."""
        table = pa.Table.from_pylist(list(rows), schema=self.schema)
        if table.num_rows == 0:
            return None
        final = self.folder / f"part-{self.next:06d}.parquet"
        tmp = self.folder / f".{final.name}.{os.getpid()}.tmp"
        pq.write_table(table, tmp)
        os.replace(tmp, final)  # atomic: a part is there whole or not at all
        self.next += 1
        return final
