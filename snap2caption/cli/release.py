"""``snap2caption release ...``: release a model version through a canary beside production.

``start`` gives the version the registry's ``canary`` alias (served by the canary model service) and
records the release in the gateway database, which routes ``--share`` percent of the traffic to it;
``status`` compares canary with production from Prometheus; ``watch`` promotes or rolls back by itself
(exit 0 only when promoted, so a pipeline stops on a rollback); ``promote`` and ``rollback`` do it by
hand. Thresholds: ``SNAP2CAPTION_RELEASE_*`` (``services.gateway.canary.CanarySettings``).
"""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Any

import click

from snap2caption.cli.keys import database_option

if TYPE_CHECKING:
    from services.gateway.releases import ReleaseStore
    from snap2caption.registry import Registry

MODEL = click.argument("model", type=click.Choice(["captioner", "detector"]))
tracking_option = click.option(
    "--tracking-uri",
    default=None,
    help="MLflow tracking URI [default: $MLFLOW_TRACKING_URI, else sqlite under $SNAP2CAPTION_HOME/mlflow]",
)
prometheus_option = click.option(
    "--prometheus",
    "prometheus_url",
    default=None,
    help="Prometheus base URL [default: $SNAP2CAPTION_RELEASE_PROMETHEUS_URL, else http://127.0.0.1:9090].",
)


def _store(database: str | None) -> ReleaseStore:
    from services.gateway.db import default_database_url, make_engine
    from services.gateway.releases import ReleaseStore

    return ReleaseStore(make_engine(database or default_database_url()))


def _registry(tracking_uri: str | None) -> Registry:
    from snap2caption.registry import Registry

    return Registry(tracking_uri)


def _settings(prometheus_url: str | None) -> Any:
    from services.gateway.canary import CanarySettings

    settings = CanarySettings()
    if prometheus_url:
        settings.prometheus_url = prometheus_url
    return settings


@click.group("release")
def release() -> None:
    """Release a model version as a canary, then promote or roll it back."""


@release.command("start")
@MODEL
@click.option("--version", "version", type=int, required=True, help="Registry version to release.")
@click.option(
    "--share",
    type=click.FloatRange(0, 100, min_open=True),
    default=10.0,
    show_default=True,
    help="Percent of the traffic the canary gets.",
)
@database_option
@tracking_option
def start(model: str, version: int, share: float, database: str | None, tracking_uri: str | None) -> None:
    """Serve VERSION of MODEL as the canary to SHARE percent of the traffic."""
    from services.gateway.releases import ReleaseError
    from snap2caption.registry import RegistryError

    store, registry = _store(database), _registry(tracking_uri)
    running = store.get(model)
    if running is not None and running.running:
        raise click.ClickException(
            f"{model} v{running.version} is in canary already: promote or roll it back"
        )
    try:
        info = registry.start_canary(model, version)
        store.start(model, info.version, share, {"share": share})
    except (RegistryError, ReleaseError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"{model} v{info.version} is the canary for {share:g}% of the traffic")


@release.command("status")
@MODEL
@click.option("--json", "as_json", is_flag=True, help="The comparison as JSON.")
@database_option
@prometheus_option
def status(model: str, as_json: bool, database: str | None, prometheus_url: str | None) -> None:
    """Compare the running canary of MODEL with production over the window (no action taken)."""
    from services.gateway.canary import Prometheus, compare, judge

    settings = _settings(prometheus_url)
    running = _store(database).get(model)
    if running is None or not running.running:
        last = f" (last: v{running.version}, {running.state})" if running else ""
        raise click.ClickException(f"no canary of {model} is running{last}")
    comparison = judge(compare(Prometheus(settings.prometheus_url), running, settings), settings)
    if as_json:
        click.echo(
            json.dumps({**comparison.numbers(), "verdict": comparison.verdict, "reasons": comparison.reasons})
        )
    else:
        click.echo(comparison.summary())


@release.command("watch")
@MODEL
@database_option
@tracking_option
@prometheus_option
def watch(model: str, database: str | None, tracking_uri: str | None, prometheus_url: str | None) -> None:
    """Watch the canary of MODEL until it is promoted (exit 0) or rolled back (exit 1)."""
    from services.gateway.canary import watch as watch_canary
    from services.gateway.releases import ReleaseError

    settings = _settings(prometheus_url)
    try:
        final = watch_canary(
            _store(database),
            _registry(tracking_uri),
            model,
            settings,
            report=lambda c: click.echo(c.summary(), err=True),
        )
    except ReleaseError as exc:
        raise click.ClickException(str(exc)) from exc
    done = "promoted" if final.verdict == "promote" else "rolled back"
    click.echo(f"{model} v{final.version} {done}: {'; '.join(final.reasons)}")
    sys.exit(0 if final.verdict == "promote" else 1)


@release.command("promote")
@MODEL
@database_option
@tracking_option
def promote(model: str, database: str | None, tracking_uri: str | None) -> None:
    """Promote the running canary of MODEL to production now."""
    from services.gateway.canary import decide
    from services.gateway.releases import ReleaseError

    try:
        ended = decide(
            _store(database), _registry(tracking_uri), model, "promote", automatic=False, reason="by hand"
        )
    except ReleaseError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"{model} v{ended.version} promoted to production")


@release.command("rollback")
@MODEL
@database_option
@tracking_option
def rollback(model: str, database: str | None, tracking_uri: str | None) -> None:
    """End the running canary of MODEL; with none running, point production at the version before."""
    from services.gateway.canary import decide
    from snap2caption.registry import RollbackError

    store, registry = _store(database), _registry(tracking_uri)
    running = store.get(model)
    if running is not None and running.running:
        decide(store, registry, model, "rollback", automatic=False, reason="by hand")
        click.echo(f"{model} v{running.version} canary rolled back; production unchanged")
        return
    try:
        before = registry.resolve(model, "production")
        now = registry.rollback(model)
    except RollbackError as exc:
        raise click.ClickException(str(exc)) from exc
    store.record(
        model,
        int(before.version),
        "rollback",
        reason=f"production rolled back by hand to v{now.version}",
        numbers={"from": int(before.version), "to": int(now.version)},
    )
    click.echo(f"{model} production rolled back from v{before.version} to v{now.version}")
