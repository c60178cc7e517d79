"""``snap2caption db ...``: the gateway database's schema revision, shown or moved explicitly.

Every opener (gateway, ``keys``, ``data feedback-export``) upgrades the database to the newest revision
by itself; these commands are for operators: check before a release, upgrade ahead of one, or
downgrade before running an older one (see ``services.gateway.migrations``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from snap2caption.cli.keys import database_option

if TYPE_CHECKING:
    from collections.abc import Callable

    from sqlalchemy import Engine


def _engine(database: str | None) -> Engine:
    from services.gateway.db import default_database_url, make_engine

    return make_engine(database or default_database_url(), migrate=False)


def _revision(engine: Engine) -> str:
    from services.gateway.migrations import current_revision

    with engine.connect() as conn:
        return current_revision(conn) or "(none)"


@click.group("db")
def db() -> None:
    """The gateway database's schema (API keys, inference log, feedback)."""


@db.command("current")
@database_option
def current(database: str | None) -> None:
    """Print the database's revision and the newest this version knows."""
    from services.gateway.migrations import head_revision

    engine = _engine(database)
    try:
        revision, head = _revision(engine), head_revision()
    finally:
        engine.dispose()
    if revision == head:
        click.echo(f"revision {revision} (the newest)")
    else:
        click.echo(f"revision {revision}; the newest is {head} (opening the database upgrades it)")


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True, help="Revision to upgrade to.")
@database_option
def upgrade(revision: str, database: str | None) -> None:
    """Upgrade the schema, moving the data; safe while gateways run or start."""
    from services.gateway.migrations import upgrade as run_upgrade

    _move(database, lambda engine: run_upgrade(engine, revision))


@db.command("downgrade")
@click.argument("revision")
@database_option
def downgrade(revision: str, database: str | None) -> None:
    """Downgrade the schema to REVISION ("base": no tables), e.g. before running an older release.

    Stop the gateways first: any newer one that opens the database upgrades it again.
    """
    from services.gateway.migrations import downgrade as run_downgrade

    _move(database, lambda engine: run_downgrade(engine, revision))


def _move(database: str | None, migrate: Callable[[Engine], None]) -> None:
    from alembic.util import CommandError

    from services.gateway.migrations import SchemaError

    engine = _engine(database)
    try:
        before = _revision(engine)
        try:
            migrate(engine)
        except (CommandError, SchemaError) as exc:
            raise click.ClickException(str(exc)) from exc
        click.echo(f"gateway database: revision {before} -> {_revision(engine)}")
    finally:
        engine.dispose()
