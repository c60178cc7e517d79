"""Runs ETL jobs off the event loop, each in its own process, and records what happens in the store.

The service side is :class:`JobRunner`: ``max_concurrent_jobs`` threads, each claiming the oldest
queued job and running it as ``python -m services.etl.engine`` in a new session (process group).
The child reads its spec as one JSON line on stdin and answers JSON lines on stdout: progress
events, then one result or error. So a crash, a leak or a hang in the ETL (or in Pillow under it)
takes down one job, never the service.

The child watches its stdin: when the service dies, even by ``kill -9``, stdin reaches EOF and the
child kills its whole process group (the ETL's own worker pool included), so a resumed job never
races an orphan writing the same output folder.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from typing import IO, TYPE_CHECKING, Any

from prometheus_client import Counter, Histogram

from snap2caption.data.captions import CaptionPolicy
from snap2caption.data.etl import EtlConfig, EtlReport, run_etl
from snap2caption.errors import BadRequest, Snap2CaptionError
from snap2caption.logs import configure_logging

if TYPE_CHECKING:  # the job process imports this module: keep FastAPI and SQLAlchemy out of it
    from services.etl.config import Settings
    from services.etl.jobs import JobRow, JobStore

logger = logging.getLogger(__name__)

ETL_JOBS = Counter("snap2caption_etl_jobs", "ETL jobs that ended, by final status.", ["status"])
ETL_JOB_DURATION = Histogram(
    "snap2caption_etl_job_duration_seconds",
    "Wall time of one ETL job start, from claim to end.",
    buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600),
)
ETL_IMAGES = Counter("snap2caption_etl_images", "Images seen by finished ETL jobs, by outcome.", ["outcome"])

# Every label value exists from the start, so rate() and alerts see a 0 rather than no series.
for _status in ("succeeded", "failed"):
    ETL_JOBS.labels(_status)
for _outcome in ("ok", "quarantined", "duplicate"):
    ETL_IMAGES.labels(_outcome)

_CAPTION_OPTIONS = ("lowercase", "min_words", "max_words")
_CONFIG_OPTIONS = ("max_side", "val_fraction", "test_fraction", "seed")


def etl_config(source: str, spec: dict[str, Any], workers: int | None = None) -> EtlConfig:
    """The ``EtlConfig`` a job spec describes, validated.

    Args:
        source: Reader name.
        spec: The job's resolved paths and options (see ``jobs.resolve_spec``).
        workers: Processes inside the ETL; ``None`` for the ETL's default.

    Raises:
        BadRequest: When the ETL would refuse the configuration.
    """
    options = spec.get("options", {})
    try:
        captions = CaptionPolicy(**{k: options[k] for k in _CAPTION_OPTIONS if k in options})
    except ValueError as exc:
        raise BadRequest(f"options: {exc}") from exc
    extra: dict[str, Any] = {k: options[k] for k in _CONFIG_OPTIONS if k in options}
    if workers is not None:
        extra["workers"] = workers
    cfg = EtlConfig(
        source=source,
        images=spec["images"],
        annotations=spec["annotations"],
        out=spec["out"],
        captions=captions,
        **extra,
    )
    cfg.validate()
    return cfg


def effective_options(cfg: EtlConfig) -> dict[str, Any]:
    """Every option the ETL runs with, defaults filled in, so a stored job reruns the same way."""
    return {
        "max_side": cfg.max_side,
        "lowercase": cfg.captions.lowercase,
        "min_words": cfg.captions.min_words,
        "max_words": cfg.captions.max_words,
        "val_fraction": cfg.val_fraction,
        "test_fraction": cfg.test_fraction,
        "seed": cfg.seed,
    }


def report_counts(report: dict[str, Any]) -> dict[str, int]:
    """Flatten ``EtlReport.to_dict()`` into the job's integer counts (split sizes as ``split_<name>``)."""
    counts = {key: int(value) for key, value in report.get("counts", {}).items()}
    counts.update({f"split_{name}": int(n) for name, n in report.get("splits", {}).items()})
    for key in ("images_decoded", "images_cached"):
        if key in report:
            counts[key] = int(report[key])
    return counts


class JobRunner:
    """Threads that take queued jobs from the store and run each in a child process.

    Args:
        store: The job store.
        settings: Concurrency, attempts, grace period and ETL workers.
    """

    def __init__(self, store: JobStore, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []
        self._children: dict[str, subprocess.Popen[str]] = {}
        self._interrupted: set[str] = set()
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start the runner threads."""
        for index in range(self.settings.max_concurrent_jobs):
            thread = threading.Thread(target=self._loop, name=f"etl-runner-{index}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def notify(self) -> None:
        """Wake an idle runner thread: a job was queued."""
        self._wake.set()

    @property
    def alive(self) -> int:
        """Runner threads still alive."""
        return sum(thread.is_alive() for thread in self._threads)

    @property
    def running(self) -> int:
        """Jobs running now."""
        with self._lock:
            return len(self._children)

    def stop(self, grace_s: float) -> None:
        """Take no more jobs; give running ones ``grace_s`` to end, then stop and re-queue them."""
        self._stopping.set()
        self._wake.set()
        deadline = time.monotonic() + grace_s
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        with self._lock:
            left = dict(self._children)
            self._interrupted.update(left)
        for job_id, child in left.items():
            logger.info("stopping job %s for shutdown; it will resume on the next start", job_id)
            _signal_group(child, signal.SIGTERM)
        for thread in self._threads:
            thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                job = self.store.claim_next()
            except Exception:  # a store hiccup must not kill the runner: wait and retry
                logger.exception("could not claim a job")
                job = None
            if job is None:
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            try:
                self._run(job)
            except Exception:
                logger.exception("job %s: runner error", job.id)
                self.store.fail(job.id, "internal error while running the job; see the service log")
                ETL_JOBS.labels("failed").inc()

    def _run(self, job: JobRow) -> None:
        started = time.monotonic()
        logger.info(
            "job %s: start (attempt %d) source=%s out=%s", job.id, job.attempts, job.source, job.spec["out"]
        )
        spec = {
            "source": job.source,
            **job.spec,
            "workers": self.settings.job_workers,
            "progress_interval_s": self.settings.progress_interval_s,
        }
        child = subprocess.Popen(
            [sys.executable, "-m", "services.etl.engine"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its own process group: stopped or killed together with its pool
            env={k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"},  # no metrics there
        )
        with self._lock:
            self._children[job.id] = child
        outcome: dict[str, Any] | None = None
        try:
            assert child.stdin is not None and child.stdout is not None
            try:
                child.stdin.write(json.dumps(spec) + "\n")
                child.stdin.flush()
            except OSError:
                pass  # it died at once; its exit code says so below
            outcome = self._follow(job.id, child.stdout)
            code = child.wait()
        finally:
            with self._lock:
                self._children.pop(job.id, None)
                interrupted = job.id in self._interrupted
                self._interrupted.discard(job.id)
            _close(child.stdin)
            _close(child.stdout)

        finished = outcome is not None and outcome["event"] == "result"
        if interrupted and not finished:
            self.store.requeue(job.id)
            return
        seconds = time.monotonic() - started
        ETL_JOB_DURATION.observe(seconds)
        if outcome is not None and finished:
            report = outcome["report"]
            counts = report_counts(report)
            self.store.succeed(job.id, counts, list(report.get("quarantined", [])))
            ETL_JOBS.labels("succeeded").inc()
            ETL_IMAGES.labels("ok").inc(counts.get("images_ok", 0))
            ETL_IMAGES.labels("quarantined").inc(counts.get("quarantined", 0))
            ETL_IMAGES.labels("duplicate").inc(counts.get("duplicates_collapsed", 0))
            logger.info("job %s: succeeded in %.1f s %s", job.id, seconds, counts)
            return
        if outcome is not None and outcome["event"] == "error":
            error = str(outcome["message"])
        else:
            error = f"the ETL process ended with exit code {code} and no result (crashed or killed)"
        self.store.fail(job.id, error)
        ETL_JOBS.labels("failed").inc()
        logger.warning("job %s: failed after %.1f s: %s", job.id, seconds, error)

    def _follow(self, job_id: str, stdout: IO[str]) -> dict[str, Any] | None:
        """Record progress events until the child closes stdout; return its result or error event."""
        outcome = None
        for line in stdout:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                logger.warning("job %s: unexpected output from the ETL process: %r", job_id, line[:200])
                continue
            if event.get("event") == "progress":
                self.store.progress(job_id, str(event["stage"]), int(event["done"]), event.get("total"))
            elif event.get("event") in ("result", "error"):
                outcome = event
        return outcome


def _signal_group(child: subprocess.Popen[str], signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.pid, signum)


def _close(stream: IO[str] | None) -> None:
    if stream is not None:
        with contextlib.suppress(OSError):
            stream.close()


# ------------------------------------------------------------------------------------- child side


def _die_with_parent() -> None:
    """Block on stdin; EOF means the service is gone: take the whole process group down."""
    while os.read(0, 4096):
        pass
    if os.getpgid(0) == os.getpid():  # we lead our own group (started by JobRunner)
        os.killpg(0, signal.SIGKILL)
    os._exit(1)


def child_main() -> int:
    """Entry of the job process: spec in on stdin, JSON-lines events out on stdout."""
    configure_logging(os.environ.get("SNAP2CAPTION_LOG_LEVEL", "INFO"))
    # The protocol gets a private copy of stdout; fd 1 then points at stderr, so a stray write from
    # any library lands in the log instead of corrupting the event stream.
    events = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    spec = json.loads(sys.stdin.readline())
    threading.Thread(target=_die_with_parent, name="parent-watch", daemon=True).start()

    def emit(event: dict[str, Any]) -> None:
        events.write(json.dumps(event) + "\n")

    interval = float(spec.get("progress_interval_s", 0.5))
    last: dict[str, Any] = {"stage": None, "at": 0.0}

    def on_progress(stage: str, done: int, total: int) -> None:
        now = time.monotonic()
        if stage != last["stage"] or done >= total or now - last["at"] >= interval:
            last.update(stage=stage, at=now)
            emit({"event": "progress", "stage": stage, "done": done, "total": total})

    try:
        cfg = etl_config(spec["source"], spec, spec.get("workers"))
        report: EtlReport = run_etl(cfg, progress=False, on_progress=on_progress)
    except Snap2CaptionError as exc:
        emit({"event": "error", "message": f"{exc.code}: {exc.message}"})
        return 1
    except Exception as exc:
        logger.exception("ETL job failed")
        emit({"event": "error", "message": f"ETL error: {type(exc).__name__}: {exc}"})
        return 1
    emit({"event": "result", "report": report.to_dict()})
    return 0


if __name__ == "__main__":
    sys.exit(child_main())
