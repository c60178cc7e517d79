"""The JSON result every bench script writes: the figures it prints, and what they were measured on.

One file per run, ``bench/results/<script>-<UTC timestamp>.json`` unless the script's ``--out`` says
otherwise, holding:

- ``script``, ``started_at`` and ``finished_at`` (UTC, ISO 8601), ``wall_s``;
- ``machine``: CPU model, logical core count, memory, OS;
- ``load_average``: the 1/5/15-minute load at the start and at the end (a busy machine makes slow numbers);
- ``versions``: Python, torch, ONNX Runtime (CPU or GPU package), snap2caption, the git commit and whether
  the tree had uncommitted changes;
- ``environment``: the variables that change what runs (``SNAP2CAPTION_ORT_*`` execution providers,
  ``OMP_NUM_THREADS``, ``CUDA_VISIBLE_DEVICES``), those that are set;
- ``config``: the script's arguments (and what else it chose, e.g. the device);
- ``figures``: the numbers it printed, by name (NaN and infinities as ``null``).

Versions come from package metadata, so recording them imports nothing heavy. Usage::

    add_out_argument(parser)                  # --out PATH
    record = BenchRecord("serving")           # at the start: the clock and the load average
    ...
    path = record.write(figures, config=vars(args), out=args.out)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"


def add_out_argument(parser: argparse.ArgumentParser) -> None:
    """``--out PATH``: where the JSON result goes (default ``bench/results/<script>-<timestamp>.json``)."""
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON result file [default: bench/results/<script>-<UTC timestamp>.json]",
    )


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gib() -> float | None:
    """Total memory in GiB (``/proc/meminfo``), or None where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024**2, 2)
    except OSError:
        pass
    return None


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    return {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_gib": memory_gib(),
        "os": platform.platform(),
        "hostname": platform.node(),
    }


def package_version(*names: str) -> str | None:
    """The installed version of the first of ``names`` that is installed (no import), else None."""
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def git_commit() -> dict[str, Any]:
    """The repository's commit and whether its tree has uncommitted changes (None outside a checkout)."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip()

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def versions() -> dict[str, Any]:
    """Python and the packages the numbers depend on."""
    return {
        "python": sys.version.split()[0],
        "torch": package_version("torch"),
        "onnxruntime": package_version("onnxruntime", "onnxruntime-gpu"),
        "onnxruntime_package": next(
            (n for n in ("onnxruntime-gpu", "onnxruntime") if package_version(n)), None
        ),
        "snap2caption": package_version("snap2caption"),
        "git": git_commit(),
    }


def environment() -> dict[str, str]:
    """The environment variables, of those that change what runs, that are set."""
    names = ("OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES")
    return {k: v for k, v in sorted(os.environ.items()) if k in names or k.startswith("SNAP2CAPTION_ORT_")}


def load_average() -> list[float] | None:
    """The 1, 5 and 15-minute load averages, or None where the OS has none."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def jsonable(value: Any) -> Any:
    """``value`` with paths as strings, tuples as lists and NaN / infinities as None (strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, str | int | bool):
        return value
    return str(value)


class BenchRecord:
    """One bench run: made at its start (clock, load average), written at its end with its figures.

    Args:
        script: The script's name (``serving``, ``system``, ...): the file name's prefix.
    """

    def __init__(self, script: str) -> None:
        self.script = script
        self.started_at = dt.datetime.now(dt.UTC)
        self._started = time.perf_counter()
        self.load_at_start = load_average()

    def default_path(self) -> Path:
        """``bench/results/<script>-<UTC start, basic ISO>.json``."""
        return RESULTS / f"{self.script}-{self.started_at.strftime('%Y%m%dT%H%M%SZ')}.json"

    def payload(self, figures: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
        """The whole result, as it is written."""
        return {
            "script": self.script,
            "started_at": self.started_at.isoformat(timespec="seconds"),
            "finished_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "wall_s": round(time.perf_counter() - self._started, 3),
            "machine": machine(),
            "load_average": {"start": self.load_at_start, "end": load_average()},
            "versions": versions(),
            "environment": environment(),
            "config": jsonable(config),
            "figures": jsonable(figures),
        }

    def write(
        self, figures: Mapping[str, Any], *, config: Mapping[str, Any], out: Path | None = None
    ) -> Path:
        """Write the result to ``out`` (default :meth:`default_path`), print where, and return the path."""
        path = out or self.default_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.payload(figures, config), indent=2, allow_nan=False) + "\n")
        print(f"result: {path}", flush=True)
        return path
