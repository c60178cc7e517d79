"""Where the registry keeps its state: the home folder, the tracking URI, the SQLite file behind it.

``MLFLOW_TRACKING_URI`` when set, else SQLite at ``$SNAP2CAPTION_HOME/mlflow/mlflow.db``
(``SNAP2CAPTION_HOME`` defaults to ``./var``) with artifacts in ``$SNAP2CAPTION_HOME/mlflow/artifacts``.
"""

from __future__ import annotations

import os
import urllib.parse
from pathlib import Path


def snap2caption_home() -> Path:
    """The folder for embedded state (``$SNAP2CAPTION_HOME``, default ``./var``), absolute."""
    return Path(os.environ.get("SNAP2CAPTION_HOME", "var")).expanduser().resolve()


def default_tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` when set, else the embedded SQLite file under the home folder."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{snap2caption_home() / 'mlflow' / 'mlflow.db'}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for other schemes or in-memory databases)."""
    if not uri.startswith("sqlite:///"):
        return None
    raw = urllib.parse.unquote(uri[len("sqlite:///") :]).split("?", 1)[0]
    if not raw or raw == ":memory:":
        return None
    return Path(raw)
