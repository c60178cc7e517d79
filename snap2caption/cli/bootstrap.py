"""``snap2caption bootstrap``: build and promote the starter models the services need, where none exist.

The services serve what ``models:/<name>@production`` names. On a fresh machine the registry is empty, so
this builds, from the project's own synthetic data, offline and on 2 CPU cores in under 10 minutes:

- ``tagger``: the pretrained ImageNet EfficientNet-Lite0 packaged as an artifact (ONNX, model card);
- ``captioner``: the ``starter`` caption model, its encoder's features cached first, then trained with
  one thread until the budget's deadline;
- ``detector``: the ``starter`` YOLOv8n, trained after the tagger on the other core, to the same deadline.

Each step is its own ``snap2caption`` command in a child process (what a user would run, and
Ultralytics' process-wide state stays out of this one), registered as ``candidate`` and promoted through
the registry's quality gate. Models that already have a production version are left alone. These starter
models are trained on synthetic shapes scenes: they caption and detect those, not everyday photos (the
tagger is a real ImageNet classifier).

Settings (:class:`BootstrapSettings`, ``SNAP2CAPTION_BOOTSTRAP_*``): the budget, ``MINUTES`` (default 9;
``--minutes``, or ``up --bootstrap-minutes``), ``CAPTIONER_STEPS`` (a fixed amount of caption training
instead of the budget's), and a quality floor per starter model. The registry's gates
compare a candidate with the production version, so on an empty registry they pass anything; the floors
stop a build that learned (next to) nothing, e.g. a caption model whose budget ran out before its first
step, from becoming production. A short budget gives a weaker starter model, never an untrained one.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from snap2caption.launcher import Command, LaunchError, Step, command_argv, load_settings, run_lanes

if TYPE_CHECKING:
    from snap2caption.registry import Registry

# Two lanes, one core each, from the start of the build to one deadline, ``minutes`` later: lane 0 packages
# the tagger (~25 s) and then trains the detector; lane 1 caches the caption encoder's features (one thread,
# 105-115 s for the 6,000 scenes) and then trains the captioner. Each training starts with the time left
# to the deadline as its budget, less what it does after training (the captioner's evaluations and
# artifact are its ``reserve_min``; the detector's test and export take ~20 s), so the build ends near the
# deadline on a fast machine or a slow one. One core each trains more than two threads for half the time
# each (small matmuls scale poorly across threads); with the features cached first, the captioner's budget
# is all training. Measured: in two fixed stages (1.5 minutes for the tagger and the features, then both
# trainings for the rest) an 8.5-minute budget took 598 s on a slower CPU (the features 136 s, the
# captioner's evaluations ~100 s for a 60 s reserve), and the tagger's core idled while features were cached.
# The captioner's phases after training now take ~40 s (each held-out image encoded once, by ONNX Runtime).
_CAPTIONER_RESERVE_MIN = 0.75
_DETECTOR_AFTER_MIN = 0.4
_MIN_TRAIN_MIN = 1.0


class BootstrapSettings(BaseSettings):
    """What ``bootstrap`` (and ``up``) build, from ``SNAP2CAPTION_BOOTSTRAP_*`` variables.

    The floors are the least test score a starter candidate needs to become production (the metric of its
    registry gate). Defaults sit far below what the default budget reaches on 2 cores (measured: captioner
    CIDEr-D 2.11, detector mAP50-95 0.50, tagger top-1 1.0) and far above an untrained model (CIDEr-D
    0.0003 after 0 steps).
    """

    model_config = SettingsConfigDict(env_prefix="SNAP2CAPTION_BOOTSTRAP_", extra="ignore")

    minutes: float = Field(
        default=9.0,
        ge=1.0,
        description="Budget: the builds end about this long after they start (the tagger then the detector "
        "on one core, the caption features then the captioner on the other; each training gets at least "
        f"{_MIN_TRAIN_MIN:.0f} min).",
    )
    captioner_steps: int = Field(
        default=0,
        ge=0,
        description="Train the captioner exactly this many optimizer steps instead of until its time budget "
        "runs out: the same starter captioner on any machine, however loaded (0: the budget decides).",
    )
    min_captioner_cider_d: float = Field(
        default=0.5, ge=0, description="Floor of the captioner's test CIDEr-D."
    )
    min_detector_map50_95: float = Field(
        default=0.1, ge=0, description="Floor of the detector's test mAP50-95."
    )
    min_tagger_top1: float = Field(
        default=0.5, ge=0, description="Floor of the tagger's top-1 on the labelled photos."
    )

    def floor(self, name: str, metric: str) -> tuple[float, str]:
        """The floor of model ``name`` on its gate ``metric`` (``test_cider_d``) and its variable's name."""
        field = f"min_{name}_{metric.removeprefix('test_')}"
        return float(getattr(self, field)), f"SNAP2CAPTION_BOOTSTRAP_{field.upper()}"


def budget_option(*names: str) -> Any:
    """The budget as a click option (``bootstrap --minutes``, ``up --bootstrap-minutes``) over the setting."""
    return click.option(
        *names,
        "minutes",
        type=float,
        default=None,
        help="Starter-model budget in minutes [$SNAP2CAPTION_BOOTSTRAP_MINUTES, default 9].",
    )


@dataclass(frozen=True)
class BuildStep:
    """One command toward a starter model: the one that registers its candidate, or work it needs first.

    ``command`` may be a function called when the step starts (a training sized to the time left).
    """

    name: str  # its log is bootstrap-<name>.log
    model: str  # the registered model it builds
    command: Command
    lane: int  # the steps of a lane run one after another, the lanes side by side
    registers: bool = True

    def argv(self) -> tuple[str, ...]:
        """The command, as it would start now."""
        return command_argv(self.command)


def starter_steps(
    root: Path, data: Path, settings: BootstrapSettings, *, deadline: float | None = None
) -> list[BuildStep]:
    """The commands that build each starter candidate, under ``root`` (runs, features and exports).

    Args:
        root: Where the builds put their runs, features and exports.
        data: The ETL output.
        settings: The budget.
        deadline: ``time.monotonic()`` by which the builds should end; default ``settings.minutes`` from
            now. The trainings' budgets are what is left of it when they start.
    """
    exe = (sys.executable, "-m", "snap2caption")
    end = time.monotonic() + settings.minutes * 60 if deadline is None else deadline

    def minutes_left(after_training: float) -> float:
        return round(max(_MIN_TRAIN_MIN, (end - time.monotonic()) / 60 - after_training), 2)

    features = str(root / "captioner" / "features")

    def captioner() -> tuple[str, ...]:
        if settings.captioner_steps:
            length: tuple[str, ...] = (
                f"train.max_steps={settings.captioner_steps}",
                "train.time_budget_min=0",
            )
        else:
            budget = minutes_left(0.0)
            reserve = min(_CAPTIONER_RESERVE_MIN, budget / 3)
            length = (f"train.time_budget_min={budget}", f"train.reserve_min={reserve:.2f}")
        return (
            *exe, "train", "caption", "--config", "starter", "--data", str(data),
            "--out", str(root / "captioner"), "--features", features, "--no-progress", *length,
            "train.threads=1", "train.metrics_scorer=python",
        )  # fmt: skip

    def detector() -> tuple[str, ...]:
        return (
            *exe, "train", "detector", "--config", "starter", "--out", str(root / "detector"),
            f"data={data}", f"time_budget_min={minutes_left(_DETECTOR_AFTER_MIN)}", "threads=1", "workers=1",
        )  # fmt: skip

    tagger = (*exe, "export", "tagger", "--out", str(root / "tagger"), "--register")
    caption_features = (
        *exe, "train", "caption-features", "--config", "starter", "--data", str(data),
        "--out", features, "--no-progress", "train.threads=1",
    )  # fmt: skip
    return [
        BuildStep("tagger", "tagger", tagger, 0),
        BuildStep("detector", "detector", detector, 0),
        BuildStep("captioner-features", "captioner", caption_features, 1, registers=False),
        BuildStep("captioner", "captioner", captioner, 1),
    ]


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
    log_dir: Path,
    settings: BootstrapSettings,
    *,
    tracking_uri: str | None = None,
    only: list[str] | None = None,
) -> list[str]:
    """Build, register and promote every starter model that has no production version.

    Args:
        data: The ETL output the models train on.
        out: Where the builds put their runs and exports.
        log_dir: Each build's output goes to ``log_dir/bootstrap-<name>.log``.
        settings: The budget and the starter floors.
        tracking_uri: MLflow URI; default the embedded registry.
        only: Build only these models.

    Returns:
        The names built.

    Raises:
        LaunchError: A build failed, or a candidate is below its floor or failed its gate (one line, naming
            the log).
    """
    from snap2caption.registry import Registry

    minutes = settings.minutes
    names = [s.model for s in starter_steps(out, data, settings) if only is None or s.model in only]
    todo = missing_models(list(dict.fromkeys(names)), tracking_uri)
    if not todo:
        click.echo("== models: every service model has a production version")
        return []
    out.mkdir(parents=True, exist_ok=True)
    registry = Registry(tracking_uri)
    click.echo(
        f"== models: building starter {', '.join(todo)} (synthetic shapes data, ~{minutes:.1f} min budget, "
        f"logs {log_dir}/bootstrap-*.log)"
    )
    started = time.monotonic()
    steps = [
        s for s in starter_steps(out, data, settings, deadline=started + minutes * 60) if s.model in todo
    ]
    logs = {step.name: log_dir / f"bootstrap-{step.name}.log" for step in steps}
    lanes = [
        [Step(s.name, _announced(s), logs[s.name]) for s in steps if s.lane == lane]
        for lane in sorted({s.lane for s in steps})
    ]
    seconds = run_lanes(lanes, "models")
    for step in (s for s in steps if s.registers):
        _check_floor(registry, step.model, settings, logs[step.name])
        result = registry.promote(step.model)
        if not result.promoted:
            raise LaunchError(
                "models",
                f"{step.model}: the candidate did not pass its gate: {result.message}",
                logs[step.name],
            )
        click.echo(
            f"   {step.model}: v{result.candidate.version} -> production ({result.message}; "
            f"built in {sum(seconds.get(s.name, 0.0) for s in steps if s.model == step.model):.0f} s)"
        )
    click.echo(f"   built {', '.join(todo)} in {time.monotonic() - started:.0f} s")
    return todo


def _announced(step: BuildStep) -> Callable[[], tuple[str, ...]]:
    """The step's command, printed when it starts (a training's budget is only known then)."""

    def command() -> tuple[str, ...]:
        argv = step.argv()
        click.echo(f"\r   {step.name}: {' '.join(argv[2:])}")
        return argv

    return command


def _check_floor(registry: Registry, name: str, settings: BootstrapSettings, log_path: Path) -> None:
    """Refuse a starter candidate scoring below its floor (see :class:`BootstrapSettings`)."""
    from snap2caption.registry import CANDIDATE

    gate = registry.gate_for(name)
    if gate is None:
        return
    candidate = registry.resolve(name, CANDIDATE)
    floor, variable = settings.floor(name, gate.metric)
    value = candidate.metrics.get(gate.metric, float("nan"))
    if not value >= floor:  # NaN (no metric) fails too
        more = (
            f"SNAP2CAPTION_BOOTSTRAP_CAPTIONER_STEPS (now {settings.captioner_steps})"
            if name == "captioner" and settings.captioner_steps
            else f"SNAP2CAPTION_BOOTSTRAP_MINUTES (now {settings.minutes})"
        )
        raise LaunchError(
            "models",
            f"{name} v{candidate.version}: {gate.metric} {value:.4f} is below the starter floor {floor} "
            f"({variable}); raise {more} to train a better one",
            log_path,
        )


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
    "--log-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="[$SNAP2CAPTION_HOME/log]",
)
@budget_option("--minutes")
@click.option("--only", multiple=True, type=click.Choice(["tagger", "captioner", "detector"]))
@click.option("--tracking-uri", default=None, help="MLflow URI [$MLFLOW_TRACKING_URI, else embedded SQLite].")
def bootstrap(
    data: Path,
    out: Path | None,
    log_dir: Path | None,
    minutes: float | None,
    only: tuple[str, ...],
    tracking_uri: str | None,
) -> None:
    """Build and promote the starter models that have no production version (offline, synthetic data)."""
    from snap2caption.registry import snap2caption_home

    if not (data / "manifests").is_dir():
        raise click.ClickException(
            f"{data} is not an ETL output (run `make data` or `snap2caption up` first)"
        )
    home = snap2caption_home()
    settings = load_settings(BootstrapSettings, minutes=minutes)
    build_starter_models(
        data, out or home / "bootstrap", log_dir or home / "log", settings, tracking_uri=tracking_uri,
        only=list(only) or None,
    )  # fmt: skip
