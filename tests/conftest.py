"""Fixtures shared by every test folder."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.gateway_stack import image_server, stack  # noqa: F401 (session fixtures for every folder)
from tests.helpers import ServiceProcess


@pytest.fixture(scope="session")
def mlflow_template_db(pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated, empty MLflow SQLite database file to copy for each registry a test needs.

    MLflow's first migration takes seconds, so the file is kept in pytest's cache per MLflow version:
    only the first run on a machine pays for it, and an MLflow upgrade gets a fresh one.
    """
    import mlflow

    from snap2caption.registry import Registry

    cached = pytestconfig.cache.mkdir(f"mlflow-{mlflow.__version__}-empty-db") / "mlflow.db"
    if not cached.is_file():
        db = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
        Registry(f"sqlite:///{db}")
        tmp = cached.with_suffix(f".{os.getpid()}.tmp")
        shutil.copyfile(db, tmp)
        tmp.replace(cached)  # atomic: a concurrent run never copies half a file
    return cached


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
