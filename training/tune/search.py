"""A hyperparameter search with Ray Tune over the real trainers, tracked in MLflow as one parent run.

:func:`search` runs ``samples`` trials of the caption trainer (``train_caption``) or the detector trainer
(``train_detector``), each trial the base config plus the parameters Tune drew from the space
(:mod:`training.tune.space`); each validation of the real loop is reported to Tune
(:mod:`training.tune.report`), so ASHA stops the weak trials early on validation CIDEr-D or mAP50-95. Every
trial is an MLflow child run of the search's run; a trial that fails is listed with its error and the search
goes on. Ray starts a local instance unless ``address`` names a cluster.

Output folder (``out``)::

    <out>/search.json     the search: its MLflow run, space, settings (what ``resume`` reads back)
    <out>/ray/<name>/     Ray Tune's experiment (trial states, results): restored by ``resume``
    <out>/trials/<id>/    each trial's run folder (artifact, checkpoints, metrics.json)
    <out>/features/       the caption encoder's feature cache, computed once before the trials
    <out>/scheduler.jsonl ASHA's decisions: each trial's validation count, score, continue or stop
    <out>/best.yaml       the best trial's whole config (``train caption --config <out>/best.yaml``)
    <out>/trials.json     every trial: id, parameters, status, best score, error
    <out>/best/           with ``--register``: the full training of the best config (its run folder)

The first trial is the base config itself (``baseline``): every searched key at the base's own value, so a
search always measures its best against the config it started from, and ASHA has that reference at each
rung before the sampled trials reach it when trials run one at a time.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml

from snap2caption.config import ConfigError, from_dict
from snap2caption.registry import Registry
from training.caption.config import CaptionRunConfig
from training.detector.config import DetectorRunConfig
from training.provenance import dataset_version, git_commit
from training.tune.report import (
    PARENT_TAG,
    TRIAL_TAG,
    CaptionTrialCallback,
    ChildRun,
    DetectorTrialCallback,
    trial_tags,
)
from training.tune.space import caption_space, check_space, detector_space, overrides, to_tune

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from ray.tune import Callback as TuneCallback
    from ray.tune import ResultGrid

logger = logging.getLogger(__name__)

Kind = Literal["caption", "detector"]
SEARCH_FILE = "search.json"
BEST_FILE = "best.yaml"
SCHEDULER_FILE = "scheduler.jsonl"
# Longest $TMPDIR Ray's session files may go under (its socket paths must fit in 107 bytes).
MAX_RAY_TMPDIR = 40
TRIALS_FILE = "trials.json"
# What each trainer reports per validation, and which way is better.
METRIC = {"caption": "val_cider_d", "detector": "val_map50_95"}


@dataclass
class SearchSettings:
    """How a search runs (the ``snap2caption tune`` options).

    Attributes:
        samples: Trials drawn from the space (each ``grid`` key multiplies them).
        scheduler: ``asha`` stops trials whose validation score falls behind at a rung; ``fifo`` runs every
            trial to its end.
        max_evals: The validations a trial reports at most (caption: one per ``eval_every`` steps and one
            at the end; detector: one per epoch); 0: worked out from the base config. ASHA's ``max_t`` is
            one more, so that ASHA never cuts a trial at its last validation, before its test.
        grace_evals: Validations every trial gets before ASHA may stop it.
        reduction_factor: ASHA keeps the top ``1 / reduction_factor`` at each rung.
        cpus_per_trial: CPUs Ray reserves per trial (also a caption trial's torch threads when the base
            config leaves ``train.threads`` at 0).
        gpus_per_trial: GPUs Ray reserves per trial.
        max_concurrent: Trials running at once (0: as many as the cluster's resources fit).
        address: A Ray cluster to join (``ray://...`` or ``host:port``); None starts a local Ray.
        dashboard: Start Ray's dashboard with the local Ray (off: no extra ports).
        resume: Continue the search in ``out`` after a crash: finished trials are kept, unfinished ones rerun
            (from their own checkpoints when they wrote some), and the same MLflow parent run goes on.
        seed: Seeds the sampling of the space.
        baseline: Make the first trial the base config itself (it counts among ``samples``).
    """

    samples: int = 8
    scheduler: Literal["asha", "fifo"] = "asha"
    max_evals: int = 0
    grace_evals: int = 1
    reduction_factor: int = 2
    cpus_per_trial: int = 1
    gpus_per_trial: float = 0.0
    max_concurrent: int = 0
    address: str | None = None
    dashboard: bool = False
    resume: bool = False
    seed: int = 0
    baseline: bool = True

    def __post_init__(self) -> None:
        if self.samples < 1 or self.cpus_per_trial < 1 or self.grace_evals < 1 or self.reduction_factor < 2:
            raise ConfigError("samples, cpus_per_trial, grace_evals must be >= 1 and reduction_factor >= 2")
        if self.max_concurrent < 0 or self.max_evals < 0 or self.gpus_per_trial < 0:
            raise ConfigError("max_concurrent, max_evals and gpus_per_trial must be >= 0")


@dataclass
class TrialSummary:
    """One trial as the search ended it.

    Attributes:
        trial_id: Ray Tune's id (also the MLflow tag ``tune.trial_id`` and the folder under ``trials/``).
        params: The drawn parameters (config keys).
        status: ``finished``, ``stopped`` (by the scheduler) or ``failed``.
        score: The best validation score it reported (None when it reported none).
        evals: Validations it reported.
        error: Why it failed (one line).
        node: The Ray node it ran on (None when it reported nothing).
    """

    trial_id: str
    params: dict[str, Any]
    status: str
    score: float | None
    evals: int
    error: str | None = None
    node: str | None = None


def rank(trials: Sequence[TrialSummary]) -> tuple[list[TrialSummary], TrialSummary | None]:
    """Trials best first (higher score first; no score, then failed, last) and the best one.

    A trial that failed after it reported scores (at export, say) left no model to train again or register:
    it is listed with its score, never chosen.
    """
    ranked = sorted(trials, key=lambda t: (t.status == "failed", t.score is None, -(t.score or 0.0)))
    return ranked, next((t for t in ranked if t.score is not None and t.status != "failed"), None)


@dataclass
class SearchResult:
    """What a search produced.

    Attributes:
        out: The search folder.
        parent_run_id: The search's MLflow run.
        metric: The score compared (``val_cider_d`` or ``val_map50_95``).
        trials: Every trial, best first (failed last).
        best: The best trial that did not fail (None when none reported a score and ended well).
        baseline: The trial of the base config itself (None without ``settings.baseline``).
        best_config: ``<out>/best.yaml`` (None without a best trial).
        wall_s: Seconds this invocation took.
    """

    out: Path
    parent_run_id: str
    metric: str
    trials: list[TrialSummary]
    best: TrialSummary | None
    baseline: TrialSummary | None
    best_config: Path | None
    wall_s: float


# ============================================================================================== trials


def caption_trial(
    params: dict[str, Any], *, base: dict[str, Any], out: str, parent_run_id: str, threads: int
) -> None:
    """One caption trial (runs in a Ray worker): the base config plus ``params``, trained by the real
    ``train_caption`` into ``<out>/trials/<trial id>``, reporting each validation to Tune; resumed from its
    own newest checkpoint when an interrupted search runs it again. ``threads``: torch's threads when the
    base config leaves ``train.threads`` at 0 (auto would count every core, not the trial's share)."""
    from ray import tune

    from training.callbacks.checkpoint import latest_checkpoint
    from training.caption.run import train_caption

    run_out = Path(out) / "trials" / tune.get_context().get_trial_id()
    config = from_dict(CaptionRunConfig, base).with_overrides(
        [*overrides(params), ("run.out", str(run_out)), ("run.checkpoints", None), ("run.resume", None)]
    )
    if not config.train.threads:
        config = config.with_overrides([("train.threads", threads)])
    resume = latest_checkpoint(run_out / "checkpoints") is not None
    config = config.with_overrides([("run.resume", "latest")]) if resume else config
    train_caption(config, progress=False, extra_callbacks=[CaptionTrialCallback(parent_run_id)])


def detector_trial(params: dict[str, Any], *, base: dict[str, Any], out: str, parent_run_id: str) -> None:
    """One detector trial (runs in a Ray worker): the base config plus ``params``, trained by the real
    ``train_detector`` into ``<out>/trials/<trial id>``, reporting each epoch's mAP50-95 to Tune."""
    from ray import tune

    from training.detector.train import train_detector

    run_out = Path(out) / "trials" / tune.get_context().get_trial_id()
    config = from_dict(DetectorRunConfig, base).with_overrides(
        [*overrides(params), ("run.out", str(run_out / "model")), ("run.work_dir", str(run_out / "work"))]
    )
    provenance = json.loads((Path(out) / SEARCH_FILE).read_text())["provenance"]
    train_detector(
        config, callbacks=[DetectorTrialCallback()], tags={**provenance, **trial_tags(parent_run_id)}
    )


# ============================================================================================== search


def search(
    kind: Kind,
    config: CaptionRunConfig | DetectorRunConfig,
    out: str | os.PathLike[str],
    settings: SearchSettings,
    *,
    space: Mapping[str, Any] | None = None,
    callbacks: Sequence[TuneCallback] = (),
) -> SearchResult:
    """Run (or, with ``settings.resume``, continue) a search; write the best config and the trial list.

    Args:
        kind: ``caption`` or ``detector``.
        config: The base config every trial starts from (its ``run.register`` is ignored: trials never
            register).
        out: The search folder (see the module docstring).
        settings: How the search runs.
        space: The search space (config keys -> distributions); default :func:`caption_space` /
            :func:`detector_space` of ``config``. On resume, the saved one.
        callbacks: More Ray Tune callbacks (driver side).

    Raises:
        ConfigError: A key of the space is not a config key; ``resume`` without a search in ``out``.
    """
    import ray
    from ray import tune

    from training.tune.driver import TrialLog

    started = time.monotonic()
    out = Path(out).resolve()
    registry = Registry(config.run.tracking_uri)
    client = _client(registry)
    state = _open_search(kind, config, out, settings, space, registry, client)
    metric = METRIC[kind]
    shared = {"base": state["base"], "out": str(out), "parent_run_id": state["parent_run_id"]}
    if kind == "caption":
        trainable = tune.with_parameters(caption_trial, **shared, threads=settings.cpus_per_trial)
    else:
        trainable = tune.with_parameters(detector_trial, **shared)
    trainable = tune.with_resources(
        trainable, {"cpu": settings.cpus_per_trial, "gpu": settings.gpus_per_trial}
    )
    experiment = out / "ray" / f"{kind}-search"
    ours = _connect(settings)
    failed = True
    try:
        if settings.resume and tune.Tuner.can_restore(str(experiment)):
            # Finished and failed trials stay as they ended; unfinished ones run again.
            tuner = tune.Tuner.restore(str(experiment), trainable, resume_errored=False)
        else:
            tuner = tune.Tuner(
                trainable,
                param_space=to_tune(state["space"]),
                tune_config=tune.TuneConfig(
                    metric=metric,
                    mode="max",
                    scheduler=_scheduler(kind, state["base"], out, settings),
                    search_alg=_searcher(settings, state.get("baseline")),
                    num_samples=settings.samples,
                    # A trial's process is kept for the next one: torch and the trainers are imported
                    # once per worker, not once per trial (each trial seeds and builds its own model).
                    reuse_actors=True,
                ),
                run_config=tune.RunConfig(
                    name=experiment.name,
                    storage_path=str(experiment.parent),
                    failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
                    callbacks=[TrialLog(metric), *callbacks],
                    verbose=0,  # TrialLog says what happens, one line each
                ),
            )
        grid = tuner.fit()
        result = _summarise(kind, out, state, grid, registry, client, started)
        failed = False
    finally:
        client.set_terminated(state["parent_run_id"], "FAILED" if failed else "FINISHED")
        if ours:
            ray.shutdown()  # stops the local Ray this search started; leaves a cluster, disconnected
    return result


def train_best(kind: Kind, result: SearchResult, final_overrides: Sequence[Any] = ()) -> Any:
    """Train the best config fully and register it as ``candidate`` through the trainer's usual path (the
    registry's gate judges it at promotion), into ``<out>/best``; logged as a child of the search run.

    Args:
        kind: ``caption`` or ``detector``.
        result: The search's result (its ``best_config`` is trained).
        final_overrides: ``(key, value)`` overrides of the best config (e.g. a longer budget).

    Returns:
        The trainer's result (``RunResult`` or ``TrainResult``).

    Raises:
        RuntimeError: The search has no best trial.
    """
    if result.best_config is None:
        raise RuntimeError("no trial reported a score: nothing to train")
    best_id = result.best.trial_id if result.best else ""
    tags = {PARENT_TAG: result.parent_run_id, "mlflow.runName": "best", "tune.best_trial_id": best_id}
    finals = [*final_overrides, ("run.register", True)]
    if kind == "caption":
        from training.caption.run import train_caption

        config = CaptionRunConfig.load(result.best_config, finals)
        return train_caption(config, progress=False, extra_callbacks=[ChildRun(tags)])
    from training.detector.train import train_detector

    config_d = DetectorRunConfig.load(result.best_config, finals)
    provenance = json.loads((result.out / SEARCH_FILE).read_text())["provenance"]
    return train_detector(config_d, tags={**provenance, **tags})


# ============================================================================================= helpers


def _client(registry: Registry) -> MlflowClient:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=registry.tracking_uri, registry_uri=registry.registry_uri)


def _open_search(
    kind: Kind,
    config: CaptionRunConfig | DetectorRunConfig,
    out: Path,
    settings: SearchSettings,
    space: Mapping[str, Any] | None,
    registry: Registry,
    client: MlflowClient,
) -> dict[str, Any]:
    """The search's saved state (resume), or a new one: base config with absolute paths, the space, a
    parent MLflow run with the search's params and the code and data it ran on."""
    path = out / SEARCH_FILE
    if settings.resume:
        if not path.is_file():
            raise ConfigError(f"nothing to resume: no {SEARCH_FILE} in {out}")
        state: dict[str, Any] = json.loads(path.read_text())
        client.set_terminated(state["parent_run_id"], "RUNNING")
        client.set_tag(state["parent_run_id"], "resumed", "true")
        return state
    if space is None:
        space = caption_space(config) if isinstance(config, CaptionRunConfig) else detector_space(config)
    space = dict(space)
    check_space(space, type(config))
    base = config.with_overrides(_absolute_run(kind, config, out, registry)).to_dict()
    commit, dirty = git_commit()
    provenance = {
        "git_commit": commit,
        "git_dirty": str(dirty).lower(),
        "dataset_version": dataset_version(base["run"]["data"]),
        "dataset_path": base["run"]["data"],
    }
    tags = {
        **provenance,
        "snap2caption.model": config.run.name,
        "tune.kind": kind,
        "mlflow.runName": f"{kind}-search",
    }
    run = client.create_run(registry.ensure_experiment(config.run.experiment_name), tags=tags)
    params = {
        **{k: v for k, v in settings.__dict__.items() if k != "resume"},
        "metric": METRIC[kind],
        "preset": config.run.preset,
        **{f"space.{key}": json.dumps(value) for key, value in space.items()},
    }
    from mlflow.entities import Param

    client.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
    client.log_text(run.info.run_id, yaml.safe_dump(base, sort_keys=False), "base_config.yaml")
    state = {
        "kind": kind,
        "parent_run_id": run.info.run_id,
        "space": space,
        "base": base,
        # The base config's own value of every key the space draws: the first trial (settings.baseline).
        "baseline": (
            {key: _get_dotted(base, key) for key, spec in space.items() if isinstance(spec, Mapping)}
            if settings.baseline
            else None
        ),
        "provenance": provenance,
        "settings": settings.__dict__,
    }
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
    if kind == "caption":
        _warm_features(from_dict(CaptionRunConfig, base))
    return state


def _absolute_run(
    kind: Kind, config: CaptionRunConfig | DetectorRunConfig, out: Path, registry: Registry
) -> list[tuple[str, Any]]:
    """Run keys every trial shares, made absolute (a trial may run elsewhere): data, MLflow store, the
    caption feature cache; trials never register."""
    run = [
        ("run.data", str(Path(config.run.data).resolve())),
        ("run.tracking_uri", registry.tracking_uri),
        ("run.register", False),
    ]
    if kind == "caption":
        assert isinstance(config, CaptionRunConfig)
        features = Path(config.run.features).resolve() if config.run.features else out / "features"
        run += [("run.features", str(features)), ("run.mlflow", True)]
    return run


def _warm_features(config: CaptionRunConfig) -> None:
    """Compute the frozen encoder's features once, before the trials: they all read the one cache (the
    space does not vary the encoder) instead of racing to write it."""
    from training.caption import run

    if not run.uses_cached_features(config):
        return
    device = run.setup_device(config)
    splits = run.load_splits(config)
    model = run.build_model(config, splits, None, device)
    run.training_pairs(config, model, splits, device, progress=None, timings={})


def _get_dotted(data: Mapping[str, Any], key: str) -> Any:
    """``data["a"]["b"]`` for ``key`` ``a.b``."""
    value: Any = data
    for part in key.split("."):
        value = value[part]
    return value


def _connect(settings: SearchSettings) -> bool:
    """Join ``settings.address``, or start a local Ray (``address="local"``: never another user's Ray found
    on this machine) with every core and no dashboard unless asked; no usage stats.

    Trials get the driver's offline switches and registry settings (the variables Ray Train's workers get)
    and keep the driver's working directory (relative paths in configs, the git commit of the checkout).
    Ray's session files go under ``$RAY_TMPDIR`` (else ``$TMPDIR``, else ``/tmp``): a deep ``$TMPDIR``
    is replaced by ``/tmp``, since Ray's socket paths must fit in 107 bytes.

    Returns:
        Whether this call started Ray (and the search must shut it down).
    """
    import ray

    from snap2caption.registry import snap2caption_home
    from training.distributed.caption import PROPAGATED_ENV_PREFIXES

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = "0"
    env = {k: v for k, v in os.environ.items() if k.startswith(PROPAGATED_ENV_PREFIXES)}
    env |= {"SNAP2CAPTION_HOME": str(snap2caption_home().resolve()), "RAY_CHDIR_TO_TRIAL_DIR": "0"}
    options: dict[str, Any] = {"runtime_env": {"env_vars": env}, "logging_level": logging.WARNING}
    if settings.address:
        ray.init(address=settings.address, **options)
        return True
    if "RAY_TMPDIR" not in os.environ and len(os.environ.get("TMPDIR", "")) > MAX_RAY_TMPDIR:
        os.environ["RAY_TMPDIR"] = "/tmp"
    cpus = max(os.cpu_count() or 1, settings.cpus_per_trial)
    ray.init(address="local", num_cpus=cpus, include_dashboard=settings.dashboard, **options)
    return True


def _scheduler(kind: Kind, base: dict[str, Any], out: Path, settings: SearchSettings) -> Any:
    from ray.tune.schedulers import FIFOScheduler

    from training.tune.driver import RecordedASHA

    if settings.scheduler == "fifo":
        return FIFOScheduler()
    max_evals = settings.max_evals or _max_evals(kind, base)
    return RecordedASHA(
        str(out / SCHEDULER_FILE),
        time_attr="training_iteration",
        max_t=max_evals + 1,
        grace_period=min(settings.grace_evals, max_evals),
        reduction_factor=settings.reduction_factor,
    )


def _max_evals(kind: Kind, base: dict[str, Any]) -> int:
    """The validations a trial of the base config reports at most: one per epoch (detector); one every
    ``eval_every`` steps and one after the last step when that is not one already (caption)."""
    train = base["train"]
    if kind == "detector":
        return int(train["epochs"])
    if not train["eval_every"]:
        return 1
    if not train["max_steps"]:
        return 100  # epochs of a size the data decides, or a time budget: ASHA's default horizon
    return math.ceil(train["max_steps"] / train["eval_every"])


def _searcher(settings: SearchSettings, baseline: dict[str, Any] | None) -> Any:
    """Random and grid sampling, seeded, the baseline first; it also caps the trials at once (Tune ignores
    ``max_concurrent_trials`` beside a search algorithm)."""
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(
        points_to_evaluate=[baseline] if baseline else None,
        random_state=settings.seed,
        max_concurrent=settings.max_concurrent,
    )


def _end_children(
    client: MlflowClient, registry: Registry, experiment: str, parent_run_id: str, stopped: set[str]
) -> None:
    """End the trial runs Ray ended mid-training: a trial ASHA stopped (its process is killed, or exits at
    its next report) and a trial whose driver died (a resumed search runs it again, in a new run). Such a
    run is left ``RUNNING`` (or ``FAILED``, when the trial's process got to end it); it becomes
    ``KILLED``, the stopped ones tagged ``tune.stopped_early``."""
    runs = client.search_runs(
        [registry.ensure_experiment(experiment)], f"tags.{PARENT_TAG} = '{parent_run_id}'", max_results=10000
    )
    for run in runs:
        trial_id = run.data.tags.get(TRIAL_TAG)
        if trial_id in stopped and run.info.status != "KILLED":
            client.set_tag(run.info.run_id, "tune.stopped_early", "true")
            client.set_terminated(run.info.run_id, "KILLED")
        elif trial_id and run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, "KILLED")


def _summarise(
    kind: Kind,
    out: Path,
    state: dict[str, Any],
    grid: ResultGrid,
    registry: Registry,
    client: MlflowClient,
    started: float,
) -> SearchResult:
    """Every trial's outcome (``trials.json``), the best trial's config (``best.yaml``), the search's metrics
    in its MLflow run, and the trial runs Ray ended mid-training closed."""
    from mlflow.entities import Metric

    from training.tune.driver import read_decisions

    metric = METRIC[kind]
    stopped = {d["trial_id"] for d in read_decisions(out / SCHEDULER_FILE) if d["early"]}
    trials = []
    for result in (grid[i] for i in range(len(grid))):
        history = result.metrics_dataframe
        scores = history[metric].dropna().tolist() if history is not None and metric in history else []
        trial_id = str((result.metrics or {}).get("trial_id") or Path(result.path).name)
        if result.error is not None:
            status = "failed"
        elif trial_id in stopped:
            status = "stopped"
        else:
            status = "finished"
        error = str(result.error).strip().splitlines()[-1] if result.error is not None else None
        params = dict(result.config or {})
        node = (result.metrics or {}).get("node")
        score = max(scores) if scores else None
        trials.append(TrialSummary(trial_id, params, status, score, len(scores), error, node))
    config: CaptionRunConfig | DetectorRunConfig = (
        from_dict(CaptionRunConfig, state["base"])
        if kind == "caption"
        else from_dict(DetectorRunConfig, state["base"])
    )
    _end_children(client, registry, config.run.experiment_name, state["parent_run_id"], stopped)
    trials, best = rank(trials)
    baseline = next((t for t in trials if state.get("baseline") and t.params == state["baseline"]), None)
    best_config = None
    if best is not None:
        best_out = out / "best"
        run = [("run.out", str(best_out / "model" if kind == "detector" else best_out))]
        if kind == "detector":
            run.append(("run.work_dir", str(best_out / "work")))
        best_run = config.with_overrides([*overrides(best.params), ("run.register", True), *run])
        best_config = out / BEST_FILE
        text = f"# The best of {len(trials)} trials ({metric} {best.score:.4f}, trial {best.trial_id}).\n"
        best_config.write_text(text + yaml.safe_dump(best_run.to_dict(), sort_keys=False), encoding="utf-8")
        client.log_artifact(state["parent_run_id"], str(best_config))
    (out / TRIALS_FILE).write_text(json.dumps([t.__dict__ for t in trials], indent=2, default=str) + "\n")
    client.log_artifact(state["parent_run_id"], str(out / TRIALS_FILE))
    wall_s = time.monotonic() - started
    now = int(time.time() * 1000)
    counts = {s: float(sum(t.status == s for t in trials)) for s in ("finished", "stopped", "failed")}
    values = {f"trials_{k}": v for k, v in counts.items()} | {"wall_s": wall_s}
    if best is not None and best.score is not None:
        values[f"best_{metric}"] = best.score
        client.set_tag(state["parent_run_id"], "best_trial_id", best.trial_id)
    if baseline is not None and baseline.score is not None:
        values[f"baseline_{metric}"] = baseline.score
    client.log_batch(state["parent_run_id"], metrics=[Metric(k, v, now, 0) for k, v in values.items()])
    for trial in trials:
        if trial.status == "failed":
            logger.warning("trial %s failed: %s (params %s)", trial.trial_id, trial.error, trial.params)
    return SearchResult(out, state["parent_run_id"], metric, trials, best, baseline, best_config, wall_s)
