"""The ETL's process pool, and the per-image work done in it (hash; validate, resize and store).

The work functions are top-level functions of plain, picklable arguments; the pool starts lazily,
only for stages with enough tasks to pay for it.
"""

from __future__ import annotations

import io
import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from snap2caption.data.files import write_if_changed
from snap2caption.errors import ImageError
from snap2caption.hashing import sha256_file
from snap2caption.imaging.decode import DecodeLimits, decode_image, probe_image
from snap2caption.monitoring.stats import decoded_stats

_MIN_POOL_TASKS = 16  # below this a process pool costs more to start than it saves


def hash_file(path: str) -> tuple[str | None, str | None]:
    """``(sha256 hex, None)`` or ``(None, reason)`` when the file cannot be read."""
    try:
        return sha256_file(path), None
    except OSError as exc:
        return None, f"cannot read: {exc.strerror or exc}"


@dataclass(frozen=True)
class DecodeTask:
    src: str
    dst: str
    max_side: int
    jpeg_quality: int
    limits: DecodeLimits


def decode_and_store(task: DecodeTask) -> dict[str, Any]:
    """Validate one image with the serving decoder, resize it and write it (only if its bytes changed).

    This is ``decode_file`` split in two: the same capped read, then ``probe_image`` for the stored
    size (the manifest keeps the original size, after EXIF) and ``decode_image`` with ``max_side``,
    which lets large JPEGs decode at a reduced DCT scale instead of at full size.

    Returns:
        ``{"image": {width, height, orientation, format, stats}, "out": {size, mtime_ns}}`` or
        ``{"error": [code, reason]}``; ``stats`` are the drift statistics (``ImageStats.to_dict()``) the
        services compute online with the same function.
    """
    try:
        with open(task.src, "rb") as fh:  # at most one byte past the cap, as decode_file reads
            data = fh.read(task.limits.max_bytes + 1)
        info = probe_image(data, task.limits)
        decoded = decode_image(data, task.limits, max_side=task.max_side)
    except ImageError as exc:
        return {"error": [exc.code, exc.message]}
    except FileNotFoundError:
        return {"error": ["missing_file", "file disappeared during the run"]}
    except OSError as exc:
        return {"error": ["unreadable_file", f"cannot read: {exc.strerror or exc}"]}
    except Exception as exc:  # one odd file must not end a run over 100k images
        return {"error": ["corrupt_image", f"decoder failed: {exc!r}"]}
    buffer = io.BytesIO()
    decoded.image.save(buffer, format="JPEG", quality=task.jpeg_quality)
    dst = Path(task.dst)
    write_if_changed(dst, buffer.getvalue())
    stat = dst.stat()
    swapped = decoded.orientation in (5, 6, 7, 8)  # EXIF rotations by 90 degrees swap the sides
    return {
        "image": {
            "width": info.height if swapped else info.width,
            "height": info.width if swapped else info.height,
            "orientation": decoded.orientation,
            "format": decoded.format,
            "stats": decoded_stats(decoded, info).to_dict(),
        },
        "out": {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns},
    }


def _pool_context() -> multiprocessing.context.BaseContext:
    # forkserver, not fork: the ETL service calls run_etl from a threaded server, and forking a
    # process with threads can deadlock. Preloading this module makes each worker start in ms.
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload([__name__])
        return ctx
    return multiprocessing.get_context("spawn")


class Runner:
    """Runs one stage's tasks, in a lazily started process pool when there are enough of them."""

    def __init__(
        self, workers: int, progress: bool, on_progress: Callable[[str, int, int], None] | None
    ) -> None:
        self.workers = workers
        self.progress = progress
        self.on_progress = on_progress
        self._pool: Executor | None = None

    def map(self, stage: str, fn: Callable[[Any], Any], tasks: Sequence[Any]) -> list[Any]:
        total = len(tasks)
        self.report(stage, 0, total)
        if not total:
            return []
        if self.workers > 1 and total >= _MIN_POOL_TASKS:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(self.workers, mp_context=_pool_context())
            # Chunks amortise the pickling round trips; several per worker keep the load balanced.
            chunksize = max(1, min(64, total // (self.workers * 8)))
            results_iter = self._pool.map(fn, tasks, chunksize=chunksize)
        else:
            results_iter = map(fn, tasks)
        results = []
        with tqdm(total=total, desc=stage, unit="img", disable=not self.progress, leave=False) as bar:
            for result in results_iter:
                results.append(result)
                bar.update(1)
                self.report(stage, len(results), total)
        return results

    def report(self, stage: str, done: int, total: int) -> None:
        if self.on_progress is not None:
            self.on_progress(stage, done, total)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
