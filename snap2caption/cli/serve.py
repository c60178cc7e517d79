"""``snap2caption serve ...``: run one service under uvicorn."""

from __future__ import annotations

from typing import Any

import click


@click.group()
def serve() -> None:
    """Run a service (etl, captioner, detector, gateway) on loopback by default."""


@serve.command("etl")
@click.option("--host", default=None, help="Bind address [default: SNAP2CAPTION_ETL_HOST or 127.0.0.1].")
@click.option("--port", type=int, default=None, help="Port [default: SNAP2CAPTION_ETL_PORT or 8003].")
def etl(host: str | None, port: int | None) -> None:
    """The ETL service: dataset build jobs over REST (settings from SNAP2CAPTION_ETL_*)."""
    from services.etl.config import Settings
    from snap2caption.service import run

    overrides: dict[str, Any] = {k: v for k, v in {"host": host, "port": port}.items() if v is not None}
    run("services.etl.app:create_app", Settings(**overrides))
