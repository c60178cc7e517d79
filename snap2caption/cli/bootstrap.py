"""``snap2caption bootstrap``: build and promote the starter models the services need, where none exist.

The services serve what ``models:/<name>@production`` names. On a fresh machine the registry is empty, so
this builds, from the project's own synthetic data, offline and on 2 CPU cores in under 10 minutes:

- ``tagger``: the pretrained ImageNet EfficientNet-Lite0 packaged as an artifact (ONNX, model card);
- ``captioner``: the ``starter`` caption model with a shorter time budget and one thread;
- ``detector``: the ``starter`` YOLOv8n, trained at the same time on the other core.

Each model is trained by its own ``snap2caption`` command in a child process (what a user would run, and
Ultralytics' process-wide state stays out of this one), registered as ``candidate`` and promoted through
the registry's quality gate. Models that already have a production version are left alone. These starter
models are trained on synthetic shapes scenes: they caption and detect those, not everyday photos (the
tagger is a real ImageNet classifier).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import click

# The tagger is packaged first (about a minute, two threads); then the captioner and the detector train at the
# same time, one thread each, for the rest of the budget: on 2 cores each gets a whole core for ~7 minutes,
# which trains more than two threads for half the time each (small matmuls scale poorly across threads).
_TAGGER_MIN = 1.5


@dataclass(frozen=True)
class StarterModel:
    """One registered model the services need, and the command that builds its candidate."""

    name: str
    command: tuple[str, ...]
    stage: int  # models of one stage build concurrently, stages in order


def starter_models(root: Path, data: Path, minutes: float) -> list[StarterModel]:
    """The commands that build each starter candidate, under ``root`` (runs and exports)."""
    exe = (sys.executable, "-m", "snap2caption")
    train_min = round(max(1.0, minutes - _TAGGER_MIN), 2)
    return [
        StarterModel("tagger", (*exe, "export", "tagger", "--out", str(root / "tagger"), "--register"), 0),
        StarterModel(
            "captioner",
            (
                *exe, "train", "caption", "--config", "starter", "--data", str(data),
                "--out", str(root / "captioner"), "--no-progress",
                f"train.time_budget_min={train_min}", f"train.reserve_min={min(1.0, train_min / 3):.2f}",
                "train.threads=1", "train.metrics_backend=python",
            ),
            1,
        ),
        StarterModel(
            "detector",
            (
                *exe, "train", "detector", "--config", "starter", "--out", str(root / "detector"),
                f"data={data}", f"time_budget_min={train_min}", "threads=1", "workers=1",
            ),
            1,
        ),
    ]  # fmt: skip


def missing_models(names: list[str], tracking_uri: str | None = None) -> list[str]:
    """Which of ``names`` have no ``production`` version in the registry."""
    from snap2caption.registry import ModelNotFoundError, Registry

    registry = Registry(tracking_uri)
    missing = []
    for name in names:
        try:
            registry.resolve(name, "production")
        except ModelNotFoundError:
            missing.append(name)
    return missing


def build_starter_models(
    data: Path,
    out: Path,
    *,
    minutes: float = 8.5,
    tracking_uri: str | None = None,
    only: list[str] | None = None,
) -> list[str]:
    """Build, register and promote every starter model that has no production version.

    Returns:
        The names built.

    Raises:
        click.ClickException: A build failed (its output is in ``out/<name>.log``), or a candidate failed
            its gate.
    """
    from snap2caption.registry import Registry

    models = [m for m in starter_models(out, data, minutes) if only is None or m.name in only]
    todo = missing_models([m.name for m in models], tracking_uri)
    if not todo:
        click.echo("== models: every service model has a production version")
        return []
    out.mkdir(parents=True, exist_ok=True)
    registry = Registry(tracking_uri)
    click.echo(
        f"== models: building starter {', '.join(todo)} (synthetic shapes data, ~{minutes:.0f} min budget)"
    )
    for stage in sorted({m.stage for m in models}):
        group = [m for m in models if m.stage == stage and m.name in todo]
        if not group:
            continue
        started = time.monotonic()
        for model in group:
            click.echo(f"   {model.name}: {' '.join(model.command[2:])}")
        _run_with_progress(group, out)
        for model in group:
            result = registry.promote(model.name)
            if not result.promoted:
                raise click.ClickException(
                    f"{model.name}: the candidate did not pass its gate: {result.message}"
                )
            click.echo(f"   {model.name}: v{result.candidate.version} -> production ({result.message})")
        click.echo(f"   built {', '.join(m.name for m in group)} in {time.monotonic() - started:.0f} s")
    return todo


def _run_with_progress(group: list[StarterModel], out: Path) -> None:
    """Run a group of builds at once, each to ``out/<name>.log``, showing their last log lines as they go."""
    logs = {m.name: out / f"{m.name}.log" for m in group}
    processes: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for model in group:
            with logs[model.name].open("wb") as log:
                processes[model.name] = subprocess.Popen(model.command, stdout=log, stderr=subprocess.STDOUT)
        started = time.monotonic()
        width = shutil.get_terminal_size((100, 20)).columns
        tty = sys.stdout.isatty()
        last_report = 0.0
        while any(p.poll() is None for p in processes.values()):
            time.sleep(1.0)
            elapsed = time.monotonic() - started
            status = " | ".join(
                f"{name}: {'done' if p.poll() is not None else _last_line(logs[name])[:60]}"
                for name, p in processes.items()
            )
            if tty:
                click.echo("\r" + f"   {elapsed:4.0f}s {status}"[: width - 1].ljust(width - 1), nl=False)
            elif elapsed - last_report >= 30:  # a log file or CI: a line every 30 s
                last_report = elapsed
                click.echo(f"   {elapsed:4.0f}s {status}")
        if tty:
            click.echo("\r" + " " * (width - 1) + "\r", nl=False)
    finally:
        for p in processes.values():
            if p.poll() is None:  # Ctrl-C: do not leave a training behind
                p.terminate()
                p.wait(30)
    for name, p in processes.items():
        if p.returncode != 0:
            tail = "\n".join(logs[name].read_text(errors="replace").splitlines()[-15:])
            raise click.ClickException(f"building {name} failed (exit {p.returncode}); {logs[name]}:\n{tail}")


def _last_line(path: Path) -> str:
    try:
        with path.open("rb") as f:
            f.seek(max(0, path.stat().st_size - 2048))
            lines = f.read().decode(errors="replace").replace("\r", "\n").splitlines()
    except OSError:
        return ""
    return next((line.strip() for line in reversed(lines) if line.strip()), "")


@click.command()
@click.option(
    "--data",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("data/processed"),
    show_default=True,
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="[$SNAP2CAPTION_HOME/bootstrap]",
)
@click.option(
    "--minutes",
    type=click.FloatRange(min=1.0),
    default=8.5,
    show_default=True,
    help="Budget: the tagger gets 1.5 min, the rest goes to captioner and detector side by side.",
)
@click.option("--only", multiple=True, type=click.Choice(["tagger", "captioner", "detector"]))
@click.option("--tracking-uri", default=None, help="MLflow URI [$MLFLOW_TRACKING_URI, else embedded SQLite].")
def bootstrap(
    data: Path, out: Path | None, minutes: float, only: tuple[str, ...], tracking_uri: str | None
) -> None:
    """Build and promote the starter models that have no production version (offline, synthetic data)."""
    from snap2caption.registry import snap2caption_home

    if not (data / "manifests").is_dir():
        raise click.ClickException(
            f"{data} is not an ETL output (run `make data` or `snap2caption up` first)"
        )
    build_starter_models(
        data, out or snap2caption_home() / "bootstrap", minutes=minutes, tracking_uri=tracking_uri,
        only=list(only) or None,
    )  # fmt: skip
