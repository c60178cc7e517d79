"""``snap2caption tune ...``: hyperparameter search with Ray Tune over the real trainers.

``tune caption`` and ``tune detector`` take the trainers' run options (``--config``, ``--data``, ``--name``,
``--experiment``, ``--tracking-uri``) and ``KEY=VALUE`` overrides for the base config every trial starts
from, and the search's own options; :func:`training.tune.search.search` does the work.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from snap2caption.cli.train import load_or_usage_error, run_overrides

if TYPE_CHECKING:
    from training.tune.search import Kind, SearchResult

F = TypeVar("F", bound=Callable[..., Any])


def search_options(kind: str, model: str, metric: str) -> Callable[[F], F]:
    """The options both searches take.

    Args:
        kind: ``caption`` or ``detector``, for the help text.
        model: The trainer's registered model name, for the help text.
        metric: The validation score compared, for the help text.
    """
    options = [
        click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]..."),
        click.option(
            "--config", "config_name", default="starter", show_default=True, help="Base preset or YAML path."
        ),
        click.option(
            "--data", type=click.Path(file_okay=False), default=None, help="ETL output [data/processed]."
        ),
        click.option("--name", default=None, help=f"Registered model name, for --register [{model}]."),
        click.option("--experiment", default=None, help="MLflow experiment [the model name]."),
        click.option(
            "--tracking-uri", default=None, help="MLflow URI [$MLFLOW_TRACKING_URI, else embedded SQLite]."
        ),
        click.option(
            "--out",
            type=click.Path(file_okay=False),
            default=None,
            help=f"Search folder [$SNAP2CAPTION_HOME/tune/{kind}-<UTC time>]; required with --resume.",
        ),
        click.option(
            "--samples",
            type=click.IntRange(min=1),
            default=8,
            show_default=True,
            help="Trials drawn from the space (the first is the base config; grid keys multiply them).",
        ),
        click.option(
            "--space",
            type=click.Path(exists=True, dir_okay=False),
            default=None,
            help="Search space YAML (config key: {loguniform|uniform|randint|choice|grid: [...]}) "
            "[the default space of the base config].",
        ),
        click.option(
            "--scheduler",
            type=click.Choice(["asha", "fifo"]),
            default="asha",
            show_default=True,
            help=f"asha: stop trials whose {metric} falls behind at a rung; fifo: run each to its end.",
        ),
        click.option(
            "--grace-evals",
            type=click.IntRange(min=1),
            default=1,
            show_default=True,
            help="Validations every trial gets before ASHA may stop it.",
        ),
        click.option(
            "--reduction-factor",
            type=click.IntRange(min=2),
            default=2,
            show_default=True,
            help="ASHA keeps the top 1/N at each rung.",
        ),
        click.option(
            "--max-concurrent",
            type=click.IntRange(min=0),
            default=0,
            show_default=True,
            help="Trials at once (0: as many as the CPUs fit).",
        ),
        click.option(
            "--cpus-per-trial", type=click.IntRange(min=1), default=1, show_default=True, help="Ray CPUs."
        ),
        click.option(
            "--gpus-per-trial", type=click.FloatRange(min=0), default=0.0, show_default=True, help="Ray GPUs."
        ),
        click.option("--seed", type=int, default=0, show_default=True, help="Seeds the sampling."),
        click.option(
            "--address",
            default=None,
            help="A Ray cluster to join (host:port, ray://...) [start a local Ray].",
        ),
        click.option("--dashboard", is_flag=True, help="Start Ray's dashboard with the local Ray [off]."),
        click.option(
            "--resume", is_flag=True, help="Continue the search in --out after a crash (Tuner.restore)."
        ),
        click.option(
            "--register",
            is_flag=True,
            help="Then train the best config fully and register it as candidate (the usual trainer path).",
        ),
    ]

    def decorate(command: F) -> F:
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


@click.group("tune")
def tune_group() -> None:
    """Hyperparameter search with Ray Tune: the caption model, the detector."""


@tune_group.command("caption")
@search_options("caption", "captioner", "validation CIDEr-D")
def tune_caption(**options: Any) -> None:
    """Search the caption model's hyperparameters on validation CIDEr-D.

    Every trial is the real `train caption` run (`train_caption`) of the base config plus the drawn
    parameters: learning rate, batch size x accumulation, prefix length, mapping network, and the decoder's
    size (from scratch) or its LoRA rank and alpha (pretrained). Each validation is reported to Tune; ASHA
    stops the weak trials early. Each trial is an MLflow child run of the search's run. Writes
    <out>/best.yaml (`snap2caption train caption --config <out>/best.yaml` trains it) and <out>/trials.json.

    Exit code 1: no trial reported a score.
    """
    _run("caption", **options)


@tune_group.command("detector")
@search_options("detector", "detector", "validation mAP50-95")
def tune_detector(**options: Any) -> None:
    """Search the detector's hyperparameters on validation mAP50-95 (reported per epoch).

    Every trial is the real `train detector` run (`train_detector`, Ultralytics) of the base config plus the
    drawn parameters: learning rate, batch and nominal batch, warm-up, mosaic, input size. Otherwise as
    `tune caption`; <out>/best.yaml is loadable by `snap2caption train detector --config`.

    Exit code 1: no trial reported a score.
    """
    _run("detector", **options)


def _run(
    kind: Kind,
    overrides: tuple[str, ...],
    config_name: str,
    out: str | None,
    space: str | None,
    register: bool,
    data: str | None,
    name: str | None,
    experiment: str | None,
    tracking_uri: str | None,
    **settings: Any,
) -> None:
    """Load the base config, run (or resume) the search, print its outcome, and train the best if asked."""
    import datetime as dt

    from snap2caption.config import ConfigError, read_yaml
    from snap2caption.registry import snap2caption_home
    from training.caption.config import CaptionRunConfig
    from training.detector.config import DetectorRunConfig

    run = run_overrides(data=data, name=name, experiment=experiment, tracking_uri=tracking_uri)
    config: CaptionRunConfig | DetectorRunConfig
    if kind == "caption":
        config = load_or_usage_error(CaptionRunConfig.load, config_name, [*overrides, *run])
    else:
        config = load_or_usage_error(DetectorRunConfig.load, config_name, [*overrides, *run])
    if settings["resume"] and out is None:
        raise click.UsageError("--resume needs --out: the search folder to continue")
    if out is None:
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
        out = str(snap2caption_home() / "tune" / f"{kind}-{stamp}")
    from training.tune.search import SearchSettings, search, train_best  # after the config: fails fast

    try:
        search_settings = SearchSettings(**settings)
        space_data = read_yaml(space) if space else None
        result = search(kind, config, out, search_settings, space=space_data)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc
    _echo(result)
    if result.best is None:
        raise click.ClickException("no trial reported a score: nothing to write or train")
    if register:
        trained = train_best(kind, result)
        if kind == "caption":
            from snap2caption.cli.train import echo_caption_summary

            echo_caption_summary(trained.summary)
        else:
            click.echo(
                f"detector: test mAP50-95 {trained.evaluation.map50_95:.4f}; artifact {trained.artifact_dir}"
            )
            if trained.version is not None:
                click.echo(f"registered {config.run.name} v{trained.version} as candidate")


def _echo(result: SearchResult) -> None:
    """The search's outcome: one line per trial (best first), the best and the baseline, where it wrote."""
    click.echo(f"{len(result.trials)} trials in {result.wall_s:.0f} s (MLflow run {result.parent_run_id}):")
    for t in result.trials:
        score = f"{result.metric} {t.score:.4f}" if t.score is not None else "no score"
        where = f" on node {t.node[:12]}" if t.node else ""
        line = f"  {t.trial_id} {t.status:8s} {score} after {t.evals} validations{where}  {t.params}"
        click.echo(line + (f"  error: {t.error}" if t.error else ""))
    if result.best is not None and result.best.score is not None:
        click.echo(f"best: trial {result.best.trial_id}, {result.metric} {result.best.score:.4f}")
    if result.baseline is not None and result.baseline.score is not None:
        click.echo(f"baseline (the base config): {result.metric} {result.baseline.score:.4f}")
    if result.best_config is not None:
        click.echo(f"best config: {result.best_config}")
    click.echo(f"trials: {Path(result.out) / 'trials.json'}")
