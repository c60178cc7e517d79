"""The backfill job: inputs -> Ray Data pipeline -> Parquet parts, with progress and throughput."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from snap2caption.alt_text import DEFAULT_MIN_CONFIDENCE
from snap2caption.api import FEATURES, Feature
from snap2caption.backfill.inputs import list_images
from snap2caption.backfill.output import (
    QUARANTINE,
    QUARANTINE_SCHEMA,
    RESULT_SCHEMA,
    RESULTS,
    SUMMARY,
    PartWriter,
    done_keys,
    result_row,
)
from snap2caption.backfill.stages import (
    FEATURES_PARTS,
    CaptionStage,
    ModelOptions,
    ModelRef,
    ObjectStage,
    Part,
    TagStage,
    alt_text_batch,
    decode_batch,
    finish_batch,
)
from snap2caption.imaging import DEFAULT_LIMITS, DecodeLimits
from snap2caption.models.runtime import RuntimeChoice

logger = logging.getLogger(__name__)

REGISTERED = {"caption": "captioner", "tags": "tagger", "objects": "detector"}  # part -> registered model
FINISH_CPUS = 0.1  # Ray CPUs of the last step (alt text, dropping the pixels)


@dataclass(frozen=True)
class BackfillConfig:
    """One backfill run.

    Attributes:
        input: A folder of images, or a Parquet manifest with a ``path`` column.
        out: The output folder (results, quarantine, summary); a second run into it resumes.
        features: What to compute (``caption``, ``alt_text``, ``tags``, ``objects``).
        root: Where a manifest's relative paths start (default: the manifest's folder).
        address: A Ray cluster to run on (``127.0.0.1:6379``, ``ray://...``, ``auto``); None: a local one.
        dashboard: Start Ray's dashboard with a local cluster (off: no extra port).
        models: Per part (``caption``, ``tags``, ``objects``): ``models:/NAME@ALIAS``, ``models:/NAME/N``,
            an alias, or an artifact folder. Default: each model's ``production`` version.
        runtime: The models' runtime (``auto``: ONNX when the artifact carries it, as the services).
        options: How the actors run their models (registry, threads, thresholds).
        actors: Actors per model pool.
        actor_cpus: Ray CPUs each model actor reserves (fractional: three pools share two cores).
        decode_cpus: Ray CPUs each decode task reserves.
        actor_start_s: Seconds the model actors get to start (each loads its model) before any image
            flows: then every actor is alive when the first batches are handed out, and a pool the cluster
            cannot place fails with Ray's "Timed out while starting actors" instead of waiting forever.
        batch_size: Images per model call.
        max_side: Longest side of the decoded copy the models share (the gateway's ``backend_max_side``).
        limits: The decoder's byte and pixel caps.
        part_rows: Result rows per Parquet part (the most a crash can lose).
        limit: Do at most this many new images this run (None: all).
        gender_neutral: Gender-neutral wording in captions and alt text.
        alt_text_min_confidence: Below this calibrated caption confidence, alt text falls back to labels
            (the gateway's default).
        alt_text_max_chars: Longest alt text.
        progress: Ray Data's progress bars.
    """

    input: Path
    out: Path
    features: tuple[Feature, ...] = FEATURES
    root: Path | None = None
    address: str | None = None
    dashboard: bool = False
    models: dict[str, str] = field(default_factory=dict)
    runtime: RuntimeChoice = "auto"
    options: ModelOptions = field(default_factory=ModelOptions)
    actors: int = 1
    actor_cpus: float = 0.5
    decode_cpus: float = 0.5
    actor_start_s: float = 600.0
    batch_size: int = 16
    max_side: int = 1024
    limits: DecodeLimits = DEFAULT_LIMITS
    part_rows: int = 1000
    limit: int | None = None
    gender_neutral: bool = False
    alt_text_min_confidence: float = DEFAULT_MIN_CONFIDENCE
    alt_text_max_chars: int = 125
    progress: bool = True

    def parts(self) -> list[Part]:
        """The models the features need, in pipeline order."""
        wanted = {part for feature in self.features for part in FEATURES_PARTS[feature]}
        return [part for part in ("caption", "tags", "objects") if part in wanted]


@dataclass
class BackfillSummary:
    """What a run did.

    Attributes:
        found: Images in the input.
        skipped: Already in the output (done or quarantined by an earlier run).
        done: Images analysed and written this run.
        quarantined: Files the decoder refused this run.
        seconds: Wall time of the pipeline (actor start and model loading included).
        images_per_s: ``(done + quarantined) / seconds``.
        steady_images_per_s: The rate after the first batch came back (model loading excluded).
        models: Per part, the version every row of this run records.
        nodes: Per stage, the Ray nodes it ran on.
        features: What was computed.
    """

    found: int
    skipped: int
    done: int = 0
    quarantined: int = 0
    seconds: float = 0.0
    images_per_s: float = 0.0
    steady_images_per_s: float = 0.0
    models: dict[str, str] = field(default_factory=dict)
    nodes: dict[str, list[str]] = field(default_factory=dict)
    features: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@contextlib.contextmanager
def ray_session(address: str | None, dashboard: bool = False) -> Iterator[None]:
    """Connect to the cluster at ``address``, or start a local one; shut down on exit.

    A Ray session already open in this process (a caller's) is used as it is and left open.
    """
    import ray

    if ray.is_initialized():
        yield
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage reporting from an offline machine
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        ray.init(include_dashboard=dashboard, logging_level=logging.WARNING)
    try:
        yield
    finally:
        ray.shutdown()


def run_backfill(
    config: BackfillConfig, on_progress: Callable[[int, int, float], None] | None = None
) -> BackfillSummary:
    """Analyse every image of ``config.input`` not yet in ``config.out`` and write the rows there.

    Args:
        config: The run.
        on_progress: Called after each part is written with ``(images finished, images to do, seconds)``.

    Returns:
        The summary (also written to ``out/summary.json``).

    Raises:
        NotFound, BadRequest: An input that is neither a folder nor a manifest with a ``path`` column.
        ModelNotFoundError: A model reference the registry does not hold.
    """
    import ray.data

    refs = list_images(config.input, config.root)
    done = done_keys(config.out)
    remaining = [ref for ref in refs if ref.key not in done]
    todo = remaining[: config.limit]
    summary = BackfillSummary(len(refs), skipped=len(refs) - len(remaining), features=list(config.features))
    parts = config.parts()
    options = config.options
    if options.tracking_uri is None:  # every node must read the registry the driver resolved against
        from snap2caption.registry import default_tracking_uri

        options = ModelOptions(**{**asdict(options), "tracking_uri": default_tracking_uri()})
    models = {
        part: ModelRef.resolve(
            REGISTERED[part], config.models.get(part, "production"), config.runtime, options.tracking_uri
        )
        for part in parts
    }
    summary.models = {part: ref.label for part, ref in models.items()}
    logger.info(
        "backfill: %d images, %d already done, %d to do; models %s",
        summary.found, len(done), len(todo), summary.models,
    )  # fmt: skip
    if todo:
        with ray_session(config.address, config.dashboard):
            context = ray.data.DataContext.get_current()
            context.enable_progress_bars = config.progress
            context.wait_for_min_actors_s = max(1, round(config.actor_start_s))
            _run(config, options, models, todo, summary, on_progress)
    config.out.mkdir(parents=True, exist_ok=True)
    (config.out / SUMMARY).write_text(json.dumps(summary.to_dict(), indent=2) + "\n")
    return summary


def _run(
    config: BackfillConfig,
    options: ModelOptions,
    models: dict[Part, ModelRef],
    todo: list[Any],
    summary: BackfillSummary,
    on_progress: Callable[[int, int, float], None] | None,
) -> None:
    """Build the pipeline, stream its rows into parts, fill ``summary`` in."""
    import ray.data

    batch = config.batch_size
    ds: ray.data.Dataset = ray.data.from_items([{"key": ref.key, "file": ref.file} for ref in todo])
    decode = functools.partial(decode_batch, limits=config.limits, max_side=config.max_side)
    ds = ds.map_batches(decode, batch_size=batch, num_cpus=config.decode_cpus)
    stages: dict[Part, tuple[type, dict[str, Any]]] = {
        "caption": (CaptionStage, {"gender_neutral": config.gender_neutral}),
        "tags": (TagStage, {}),
        "objects": (ObjectStage, {}),
    }
    for part, ref in models.items():
        stage, extra = stages[part]
        ds = ds.map_batches(
            stage,
            fn_constructor_kwargs={"model": ref, "options": options, **extra},
            concurrency=config.actors,  # a fixed pool of actors, each loading its model once
            num_cpus=config.actor_cpus,
            batch_size=batch,
        )
    alt_text = None
    if "alt_text" in config.features:
        alt_text = functools.partial(
            alt_text_batch,
            min_confidence=config.alt_text_min_confidence,
            max_chars=config.alt_text_max_chars,
            gender_neutral_=config.gender_neutral,
        )
    # Light Python, so a small reservation: it must fit beside the model actors, which hold their CPUs
    # until the input ends. A step that did not fit (Ray's drop_columns reserves a whole CPU) held every
    # finished row back until then: no parts written, no progress, the rows piling up in the object store.
    finish = functools.partial(finish_batch, alt_text=alt_text)
    ds = ds.map_batches(finish, batch_size=batch, num_cpus=FINISH_CPUS)

    results = PartWriter(config.out / RESULTS, RESULT_SCHEMA)
    quarantine = PartWriter(config.out / QUARANTINE, QUARANTINE_SCHEMA)
    pending: list[dict[str, Any]] = []
    refused: list[dict[str, Any]] = []
    nodes: dict[str, set[str]] = {}
    start = time.monotonic()
    first: tuple[float, int] | None = None  # (time, images) when the first batch came back

    def flush() -> None:
        results.write(pending)
        quarantine.write(refused)
        summary.done += len(pending)
        summary.quarantined += len(refused)
        pending.clear()
        refused.clear()
        finished, elapsed = summary.done + summary.quarantined, time.monotonic() - start
        logger.info("backfill: %d/%d images in %.1f s", finished, len(todo), elapsed)
        if on_progress is not None:
            on_progress(finished, len(todo), elapsed)

    for columns in ds.iter_batches(batch_size=batch, batch_format="numpy"):
        listed = {name: values.tolist() for name, values in columns.items()}  # numpy -> Python values
        for i in range(len(listed["key"])):
            row = {name: values[i] for name, values in listed.items()}
            for column, value in row.items():
                if column.startswith("node_"):
                    nodes.setdefault(column.removeprefix("node_"), set()).add(str(value))
            if row["error"]:
                refused.append({"path": row["key"], "sha256": row["sha256"] or None, "reason": row["error"]})
            else:
                pending.append(result_row(row))
        if first is None:
            first = (time.monotonic(), len(pending) + len(refused))
        if len(pending) + len(refused) >= config.part_rows:
            flush()
    flush()
    end = time.monotonic()
    summary.seconds = end - start
    finished = summary.done + summary.quarantined
    summary.images_per_s = finished / summary.seconds if summary.seconds > 0 else 0.0
    if first is not None and end > first[0] and finished > first[1]:
        summary.steady_images_per_s = (finished - first[1]) / (end - first[0])
    summary.nodes = {stage: sorted(ids) for stage, ids in nodes.items()}
