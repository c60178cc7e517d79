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
    from snap2caption.http import run

    overrides: dict[str, Any] = {k: v for k, v in {"host": host, "port": port}.items() if v is not None}
    run("services.etl.app:create_app", Settings(**overrides))


@serve.command("captioner")
@click.option(
    "--host", default=None, help="Bind address [default: SNAP2CAPTION_CAPTIONER_HOST or 127.0.0.1]."
)
@click.option("--port", type=int, default=None, help="Port [default: SNAP2CAPTION_CAPTIONER_PORT or 8001].")
@click.option(
    "--workers",
    type=int,
    default=None,
    help="uvicorn worker processes [default: SNAP2CAPTION_CAPTIONER_WORKERS or 1].",
)
def captioner(host: str | None, port: int | None, workers: int | None) -> None:
    """The captioner: POST /v1/caption (settings from SNAP2CAPTION_CAPTIONER_*, model from the registry)."""
    from services.captioner.config import Settings
    from snap2caption.http import run

    overrides: dict[str, Any] = {
        k: v for k, v in {"host": host, "port": port, "workers": workers}.items() if v is not None
    }
    run("services.captioner.app:create_app", Settings(**overrides))


@serve.command("detector")
@click.option("--host", default=None, help="Bind address [default: SNAP2CAPTION_DETECTOR_HOST or 127.0.0.1].")
@click.option("--port", type=int, default=None, help="Port [default: SNAP2CAPTION_DETECTOR_PORT or 8002].")
@click.option(
    "--workers",
    type=int,
    default=None,
    help="uvicorn worker processes [default: SNAP2CAPTION_DETECTOR_WORKERS or 1].",
)
def detector(host: str | None, port: int | None, workers: int | None) -> None:
    """The detector: POST /v1/detect and /v1/tags (settings from SNAP2CAPTION_DETECTOR_*, models from the
    registry)."""
    from services.detector.config import Settings
    from snap2caption.http import run

    overrides: dict[str, Any] = {
        k: v for k, v in {"host": host, "port": port, "workers": workers}.items() if v is not None
    }
    run("services.detector.app:create_app", Settings(**overrides))


@serve.command("gateway")
@click.option("--host", default=None, help="Bind address [default: SNAP2CAPTION_GATEWAY_HOST or 127.0.0.1].")
@click.option("--port", type=int, default=None, help="Port [default: SNAP2CAPTION_GATEWAY_PORT or 8000].")
def gateway(host: str | None, port: int | None) -> None:
    """The public API gateway: POST /v1/analyze and /v1/analyze/batch in front of the captioner and detector
    (settings from SNAP2CAPTION_GATEWAY_*)."""
    from services.gateway.config import Settings
    from snap2caption.http import run

    overrides: dict[str, Any] = {k: v for k, v in {"host": host, "port": port}.items() if v is not None}
    run("services.gateway.app:create_app", Settings(**overrides))
