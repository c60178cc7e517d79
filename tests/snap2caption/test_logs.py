"""The one log format, and the HTTP client libraries kept quiet at INFO."""

from __future__ import annotations

import subprocess
import sys


def _run(level: str) -> str:
    """Log through httpx's logger in a fresh interpreter (the root handler is process-wide)."""
    code = (
        "import logging; from snap2caption.logs import configure_logging; "
        f"configure_logging({level!r}); "
        "logging.getLogger('httpx').info('HTTP Request: POST /v1/analyze'); "
        "logging.getLogger('httpx').warning('retrying'); "
        "logging.getLogger('snap2caption.x').info('ours')"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr


def test_http_client_request_lines_are_hidden_at_info_but_warnings_show() -> None:
    err = _run("INFO")
    assert "HTTP Request" not in err
    assert "WARNING httpx rid=- retrying" in err
    assert "INFO snap2caption.x rid=- ours" in err


def test_debug_shows_the_http_client_request_lines() -> None:
    assert "INFO httpx rid=- HTTP Request: POST /v1/analyze" in _run("DEBUG")
