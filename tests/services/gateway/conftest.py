"""A throwaway PostgreSQL server for the gateway database tests, and a fresh database per test.

Skipped, saying why, when PostgreSQL's ``initdb``/``pg_ctl`` or the ``psycopg`` driver is not installed.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

import pytest

from tests.helpers import free_port


def _pg_binary(name: str) -> str | None:
    """A PostgreSQL server program: on PATH, else Debian's versioned folder (newest version first)."""
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), key=lambda p: int(p.parts[-3]))
    return shutil.which(name) or (str(found[-1]) if found else None)


def _unavailable(reason: str) -> NoReturn:
    """Skip on a developer's machine without PostgreSQL; fail in CI (``CI=true``), where the test command's
    setup installs it, so the Postgres tests can never be skipped there unnoticed."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"PostgreSQL tests cannot run: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """A PostgreSQL cluster on a free loopback port for the session: the URL of its ``postgres`` database."""
    initdb, pg_ctl = _pg_binary("initdb"), _pg_binary("pg_ctl")
    if initdb is None or pg_ctl is None:
        _unavailable("PostgreSQL's initdb/pg_ctl are not installed (apt-get install postgresql)")
    pytest.importorskip(
        "psycopg", reason="the psycopg driver is not installed (pip install 'psycopg[binary]')"
    )
    # PostgreSQL refuses to run as root: run the server as the `postgres` user then.
    run_as: list[str] = []
    owner: pwd.struct_passwd | None = None
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            _unavailable("running as root and there is no `postgres` user to run the server as")
        # util-linux's runuser is in /usr/sbin, which a non-login shell's PATH may leave out
        runuser = shutil.which("runuser") or shutil.which("runuser", path="/usr/sbin:/sbin")
        if runuser is None:
            _unavailable("running as root and runuser (util-linux) is not installed")
        run_as = [runuser, "-u", "postgres", "--"]
    root = Path(tempfile.mkdtemp(prefix="s2c-pg-"))  # not under pytest's root-only tmp folders
    if owner is not None:
        os.chown(root, owner.pw_uid, owner.pw_gid)
    data, port = root / "data", free_port()
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.PIPE, "check": True, "timeout": 60}
    subprocess.run([*run_as, initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "--no-sync"], **quiet)
    options = f"-h 127.0.0.1 -p {port} -k {root} -c fsync=off"
    subprocess.run(
        [*run_as, pg_ctl, "-D", str(data), "-o", options, "-l", str(root / "log"), "-w", "start"], **quiet
    )
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*run_as, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], **quiet)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture()
def new_postgres_database(postgres_server: str) -> Callable[[], str]:
    """Call to create an empty database on the session's server; returns its URL."""
    from sqlalchemy import create_engine

    def create() -> str:
        name = f"s2c_{uuid.uuid4().hex[:12]}"
        admin = create_engine(postgres_server, isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as conn:
                conn.exec_driver_sql(f"CREATE DATABASE {name}")
        finally:
            admin.dispose()
        return postgres_server.rsplit("/", 1)[0] + f"/{name}"

    return create
