"""Fixtures shared by every test folder."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import ServiceProcess


@pytest.fixture()
def start_service(tmp_path: Path) -> Iterator[Callable[..., ServiceProcess]]:
    """Start ``snap2caption serve <name>`` processes, ready on free loopback ports, stopped at teardown.

    Call as ``start_service("etl", env={...})``; more keywords go to ``ServiceProcess``. Logs land in
    ``tmp_path/<name>-<n>.log``; teardown stops (SIGTERM, then SIGKILL) whatever is still running.
    """
    started: list[ServiceProcess] = []

    def start(name: str, ready_timeout_s: float = 30.0, **kwargs: Any) -> ServiceProcess:
        service = ServiceProcess(name, tmp_path / f"{name}-{len(started)}.log", **kwargs)
        started.append(service)
        return service.start(ready_timeout_s)

    yield start
    for service in reversed(started):
        try:
            service.stop(timeout_s=15)
        except Exception:
            service.kill()
