"""``snap2caption registry ...``: list, show, promote and roll back registered models.

Exit codes: 0 done (or nothing to do), 1 error, 3 promotion refused by the quality gate.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from snap2caption.registry import ModelVersionInfo, Registry

GATE_REFUSED_EXIT = 3


@contextmanager
def _clean_errors() -> Iterator[None]:
    """Turn registry, model-folder and MLflow errors into one ``Error: ...`` line instead of a traceback."""
    from mlflow.exceptions import MlflowException

    from snap2caption.errors import ArtifactError
    from snap2caption.registry import RegistryError

    try:
        yield
    except (RegistryError, ArtifactError) as exc:
        raise click.ClickException(exc.message) from exc
    except MlflowException as exc:
        raise click.ClickException(f"MLflow: {exc.message}") from exc


def _registry(ctx: click.Context) -> Registry:
    # Built on first use so that `snap2caption registry --help` never imports MLflow.
    from snap2caption.registry import Registry

    obj = ctx.ensure_object(dict)
    if "registry" not in obj:
        obj["registry"] = Registry(obj.get("tracking_uri"))
    registry: Registry = obj["registry"]
    return registry


def _metrics_text(info: ModelVersionInfo, first: str | None) -> str:
    keys = sorted(info.metrics, key=lambda k: (k != first, k))
    return " ".join(f"{k}={info.metrics[k]:.4g}" for k in keys) or "-"


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows
    )


@click.group()
@click.option(
    "--tracking-uri",
    default=None,
    help="MLflow tracking URI [default: $MLFLOW_TRACKING_URI, else sqlite under $SNAP2CAPTION_HOME/mlflow]",
)
@click.pass_context
def registry(ctx: click.Context, tracking_uri: str | None) -> None:
    """Model registry: list versions, show an alias, promote the candidate, roll back production."""
    # An operator at a terminal wants a dead tracking server reported in seconds, not after MLflow's
    # default 7 retries with exponential backoff (minutes). Explicit settings still win.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    ctx.ensure_object(dict)["tracking_uri"] = tracking_uri


@registry.command("list")
@click.argument("name", required=False)
@click.pass_context
def list_(ctx: click.Context, name: str | None) -> None:
    """List versions of NAME (every registered model when NAME is left out)."""
    with _clean_errors():
        reg = _registry(ctx)
        names = [name] if name else reg.list_models()
        if not names:
            click.echo(f"no registered models at {reg.tracking_uri}")
            return
        for i, model in enumerate(names):
            gate = reg.gate_for(model)
            versions = reg.list_versions(model)
            if i:
                click.echo()
            header = model
            if gate:
                header += (
                    f"  (gate: {gate.metric}, {'higher' if gate.higher_is_better else 'lower'} is better)"
                )
            click.echo(header)
            if not versions:
                click.echo("  no versions")
                continue
            rows = [["VERSION", "ALIASES", "METRICS", "CREATED (UTC)", "RUN", "STATUS"]]
            rows += [
                [
                    f"v{v.version}",
                    ",".join(v.aliases) or "-",
                    _metrics_text(v, gate.metric if gate else None),
                    v.created.strftime("%Y-%m-%d %H:%M:%S"),
                    (v.run_id or "-")[:12],
                    v.status,
                ]
                for v in versions
            ]
            click.echo(_table(rows))


@registry.command()
@click.argument("ref", metavar="NAME@ALIAS|NAME/VERSION")
@click.pass_context
def show(ctx: click.Context, ref: str) -> None:
    """Show the version an alias (or number) names: metrics, tags, source."""
    from snap2caption.registry import parse_model_ref

    with _clean_errors():
        name, alias = parse_model_ref(ref)
        info = _registry(ctx).resolve(name, alias)
        lines = [
            ("model", f"{info.name} v{info.version} ({info.uri})"),
            ("aliases", ", ".join(info.aliases) or "-"),
            ("status", info.status),
            ("created", info.created.isoformat(timespec="seconds")),
            ("run", info.run_id or "-"),
            ("source", info.source),
        ]
        lines += [(f"metric {k}", f"{v:.6g}") for k, v in sorted(info.metrics.items())]
        lines += [(f"tag {k}", v) for k, v in sorted(info.tags.items())]
        if info.description:
            lines.append(("description", info.description))
        width = max(len(k) for k, _ in lines)
        for key, value in lines:
            click.echo(f"{key.ljust(width)}  {value}")


@registry.command()
@click.argument("name")
@click.option(
    "--margin", type=float, default=None, help="Absolute slack in the gate metric [default: per model]."
)
@click.option("--force", is_flag=True, help="Promote even if the gate fails (needs --reason; recorded).")
@click.option("--reason", default=None, help="Why; required with --force.")
@click.pass_context
def promote(ctx: click.Context, name: str, margin: float | None, force: bool, reason: str | None) -> None:
    """Move NAME@production to NAME@candidate if it passes the quality gate (exit 3 when refused)."""
    with _clean_errors():
        result = _registry(ctx).promote(name, margin=margin, force=force, reason=reason)
    if result.status == "refused":
        click.echo(f"{name}: {result.message}", err=True)
        ctx.exit(GATE_REFUSED_EXIT)
    click.echo(f"{name}: {result.message}")


@registry.command()
@click.argument("names", nargs=-1)
@click.option("--to", "target_uri", required=True, help="Tracking URI of the registry to push to.")
@click.option("--alias", default="production", show_default=True, help="The version to push, in the source.")
@click.option(
    "--promote/--no-promote",
    default=True,
    show_default=True,
    help="Promote the pushed version through the target's gate (else it stays its candidate).",
)
@click.pass_context
def push(ctx: click.Context, names: tuple[str, ...], target_uri: str, alias: str, promote: bool) -> None:
    """Copy NAME@ALIAS (every model that has ALIAS when no NAME is given) into another registry.

    E.g. the models `make up` built, into a compose stack's MLflow server: `snap2caption registry push --to
    http://127.0.0.1:5000`. The files are downloaded and verified, registered there with their metrics and
    provenance tags, and promoted through the target's gate (exit 3 when it refuses). A model whose
    production version there already holds the same files is left alone.
    """
    import tempfile

    from snap2caption.registry import PRODUCTION, ModelNotFoundError, Registry
    from snap2caption.registry.versions import REGISTRY_TAGS, TAG_MANIFEST_SHA256

    def production_there(name: str) -> ModelVersionInfo | None:
        try:
            return target.resolve(name, PRODUCTION)
        except ModelNotFoundError:
            return None

    def has_alias(name: str) -> bool:
        try:
            source.resolve(name, alias)
        except ModelNotFoundError:
            return False
        return True

    refused = False
    with _clean_errors():
        source = _registry(ctx)
        target = Registry(target_uri)
        todo = list(names) or [m for m in source.list_models() if has_alias(m)]
        if not todo:
            raise click.ClickException(f"no model has the alias {alias!r} at {source.tracking_uri}")
        for name in todo:
            info = source.resolve(name, alias)
            there = production_there(name)
            same_files = there is not None and there.tags.get(TAG_MANIFEST_SHA256) == info.tags.get(
                TAG_MANIFEST_SHA256
            )
            if there is not None and same_files:
                click.echo(f"{name}: v{info.version} is already {PRODUCTION} there as v{there.version}")
                continue
            # Provenance (run, config, dataset, commit) travels; what the target's own register and
            # promote write (manifest hash, who and when, promotion history) is written there afresh.
            tags = {k: v for k, v in info.tags.items() if k not in REGISTRY_TAGS}
            tags["pushed_from"] = f"{source.tracking_uri} {info.uri}"
            with tempfile.TemporaryDirectory(prefix="snap2caption-push-") as tmp:
                folder, _ = source.download(name, info.version, tmp)
                pushed = target.register(
                    name, folder, metrics=info.metrics, tags=tags, description=info.description or None
                )
            line = f"{name}: v{info.version} -> {target.tracking_uri} v{pushed.version}"
            if promote:
                result = target.promote(name)
                refused |= result.status == "refused"
                line += f"; {result.message}"
            click.echo(line)
    if refused:
        ctx.exit(GATE_REFUSED_EXIT)


@registry.command()
@click.argument("name")
@click.pass_context
def rollback(ctx: click.Context, name: str) -> None:
    """Point NAME@production back at the version before the current one."""
    with _clean_errors():
        info = _registry(ctx).rollback(name)
    click.echo(f"{name}: production is now v{info.version}")
