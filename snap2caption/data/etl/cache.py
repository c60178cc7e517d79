"""``out/.etl_cache.json``: what earlier runs hashed, decoded and wrote, so a re-run skips it."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from snap2caption.data.files import write_if_changed
from snap2caption.imaging.decode import DecodeLimits

log = logging.getLogger(__name__)

CACHE_NAME = ".etl_cache.json"
_CACHE_VERSION = 1


class EtlCache:
    """Per source file (by absolute path) its stat, sha256 and decode result; per resized output (by path
    under ``out``) the source sha256, the resize parameters and its stat.
    """

    def __init__(self, path: Path, limits: DecodeLimits) -> None:
        self.path = path
        self.limits = [int(limits.max_bytes), int(limits.max_pixels)]
        self.sources: dict[str, dict[str, Any]] = {}
        self.outputs: dict[str, dict[str, Any]] = {}
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError):
            log.warning("etl: cache %s unreadable; starting afresh", path)
            return
        if not isinstance(doc, dict) or doc.get("version") != _CACHE_VERSION:
            return
        self.sources = doc.get("sources", {})
        self.outputs = doc.get("outputs", {})
        if doc.get("limits") != self.limits:
            # Decode results depend on the caps: keep the hashes, forget the verdicts.
            for entry in self.sources.values():
                entry.pop("image", None)
                entry.pop("error", None)

    def save(self, sources: set[str], outputs: set[str]) -> None:
        """Write the entries still in use (sorted, so unchanged content keeps the file untouched)."""
        doc = {
            "version": _CACHE_VERSION,
            "limits": self.limits,
            # Unreadable files (no sha256) are left out, so the next run tries them again.
            "sources": {k: self.sources[k] for k in sorted(sources) if self.sources.get(k, {}).get("sha256")},
            "outputs": {k: self.outputs[k] for k in sorted(outputs) if k in self.outputs},
        }
        write_if_changed(self.path, json.dumps(doc, sort_keys=True, separators=(",", ":")).encode())
