"""Constants and settings shared by the ETL tests (importable, unlike conftest.py)."""

from __future__ import annotations

from pathlib import Path

SMALL_IMAGES = 8
BIG_IMAGES = 500  # enough that a job on one idle core decodes for a second or more
CORRUPT = "000000000003.jpg"


def etl_env(root: Path, db: Path, **settings: object) -> dict[str, str]:
    """Environment for ``snap2caption serve etl`` on a scratch data root and database."""
    env = {
        "SNAP2CAPTION_ETL_DATA_ROOT": str(root),
        "SNAP2CAPTION_ETL_DB_URL": f"sqlite:///{db}",
        "SNAP2CAPTION_ETL_JOB_WORKERS": "1",
        "SNAP2CAPTION_ETL_PROGRESS_INTERVAL_S": "0.1",
        "SNAP2CAPTION_LOG_LEVEL": "INFO",  # the restart test reads uvicorn's INFO lines in the log
    }
    env.update({f"SNAP2CAPTION_ETL_{key.upper()}": str(value) for key, value in settings.items()})
    return env
