"""``snap2caption keys ...``: create, list and revoke the gateway's API keys."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from services.gateway.auth import KeyStore

_DATABASE_HELP = (
    "SQLAlchemy URL of the gateway database "
    "[default: $SNAP2CAPTION_GATEWAY_DATABASE_URL, else sqlite at $SNAP2CAPTION_HOME/gateway.db]."
)
database_option = click.option(
    "--database", "database", default=None, envvar="SNAP2CAPTION_GATEWAY_DATABASE_URL", help=_DATABASE_HELP
)


def _store(database: str | None) -> KeyStore:
    from services.gateway.auth import KeyStore
    from services.gateway.db import default_database_url, make_engine

    return KeyStore(make_engine(database or default_database_url()))


@click.group("keys")
def keys() -> None:
    """Manage the gateway's API keys (the secret is shown once, at creation)."""


@keys.command("create")
@click.argument("name")
@database_option
def create(name: str, database: str | None) -> None:
    """Create a key for NAME and print its secret (shown this once only)."""
    try:
        key, secret = _store(database).create(name)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="NAME") from exc
    click.echo(f"created key {key.id} ({key.name}); the secret is shown only now:", err=True)
    click.echo(secret)


@keys.command("list")
@database_option
@click.option("--json", "as_json", is_flag=True, help="One JSON array instead of a table.")
def list_keys(database: str | None, as_json: bool) -> None:
    """List every key (never the secrets)."""
    found = _store(database).list()
    if as_json:
        click.echo(
            json.dumps(
                [
                    {
                        "id": k.id,
                        "name": k.name,
                        "prefix": k.prefix,
                        "created_at": k.created_at.isoformat(),
                        "revoked_at": k.revoked_at.isoformat() if k.revoked_at else None,
                    }
                    for k in found
                ],
                indent=1,
            )
        )
        return
    click.echo(f"{'ID':<12}  {'STATUS':<7}  {'CREATED (UTC)':<19}  {'PREFIX':<22}  NAME")
    for k in found:
        status = "revoked" if k.revoked else "active"
        created = k.created_at.strftime("%Y-%m-%d %H:%M:%S")
        click.echo(f"{k.id:<12}  {status:<7}  {created:<19}  {k.prefix:<22}  {k.name}")


@keys.command("revoke")
@click.argument("key_id")
@database_option
def revoke(key_id: str, database: str | None) -> None:
    """Revoke KEY_ID; the gateway refuses it within a second."""
    if not _store(database).revoke(key_id):
        raise click.ClickException(f"no active key {key_id!r}")
    click.echo(f"revoked key {key_id}")
