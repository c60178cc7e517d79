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


# Libraries that log every HTTP call at INFO: a line per backend call in the services' logs, and noise on
# the stderr of a one-shot command (`snap2caption analyze`); their warnings and errors still show.
_CHATTY_LOGGERS = ("httpx", "httpcore")


def configure_logging(level: str = "INFO") -> None:
    """Send logs to stderr as ``time level logger request_id message``; idempotent.

    The HTTP client libraries are held at WARNING unless ``level`` is DEBUG.
    """
    root = logging.getLogger()
    for name in _CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if level.upper() == "DEBUG" else logging.WARNING)
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
