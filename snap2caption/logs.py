"""Structured logging: one line per event, key=value pairs, the request id when there is one."""

from __future__ import annotations

import contextvars
import logging
import sys

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get() or "-"
        return True


def configure_logging(level: str = "INFO") -> None:
    """Send logs to stderr as ``time level logger request_id message``; idempotent."""
    root = logging.getLogger()
    if any(getattr(h, "_snap2caption", False) for h in root.handlers):
        root.setLevel(level.upper())
        return
    handler = logging.StreamHandler(sys.stderr)
    handler._snap2caption = True  # type: ignore[attr-defined]
    handler.addFilter(_RequestIdFilter())
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s rid=%(request_id)s %(message)s")
    )
    root.addHandler(handler)
    root.setLevel(level.upper())
