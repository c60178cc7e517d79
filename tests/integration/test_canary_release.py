"""Canary releases with real processes: a production captioner, a canary captioner, the gateway, and a
real Prometheus scraping the gateway, driven by the real ``snap2caption release`` commands.

Three canaries of version 2 (the same tiny model as production's version 1) are released in turn while
clients send a steady stream of requests; the canary service is restarted each time with other
``test_fault_*`` settings (test-only switches of the model services):

1. one that answers every model call with a 500: ``release watch`` rolls it back (exit 1);
2. one five times slower: rolled back on its p95 latency;
3. a healthy one: promoted after its window (exit 0), and production follows.

Throughout, no request answered by the production track fails (the inference log's ``track`` column and
the answers' ``X-Snap2Caption-Track`` header say which track answered), every decision is recorded with
its numbers, and the gateway exports the decisions as ``snap2caption_release_decisions``.

The detector's release path is the same commands on the other model: a production and a canary detector
service (``DETECTOR_ALIAS=canary``) behind the gateway; an erroring canary detector is rolled back with no
failed production answer, then a healthy one is promoted.

Each test has a stack of its own, started for it and stopped after it: a detector stack left running
beside the captioner's story once slowed every answer so much that a 5x slower canary captioner looked
healthy and was promoted.

Timing: windows are short (scrapes every 0.5 s, an 8 s window), so the whole module takes about three
minutes on two loaded cores (170 s measured). Nothing asserts a wall-clock bound: ``watch`` decides on
counts and ratios, and each wait below is a generous ceiling that only a broken build reaches.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, select

from tests.gateway_stack import LiveProcess, _captioner_env, metric
from tests.helpers import COLOURS, ServiceProcess, free_port, image_bytes, torch_threads, wait_for
from tests.infra.infra_helpers import PrometheusProcess

pytestmark = pytest.mark.integration

# Short windows so the module runs in about three minutes; the real defaults are minutes.
RELEASE_SETTINGS = {
    "SNAP2CAPTION_RELEASE_WINDOW_S": "8",
    "SNAP2CAPTION_RELEASE_POLL_INTERVAL_S": "1",
    "SNAP2CAPTION_RELEASE_MAX_DURATION_S": "90",
    "SNAP2CAPTION_RELEASE_MIN_REQUESTS": "20",
    "SNAP2CAPTION_RELEASE_MIN_BREACH_REQUESTS": "10",
    "SNAP2CAPTION_RELEASE_MAX_ERROR_RATE_INCREASE": "0.05",
    # Production and a healthy canary run the same model on the same cores, so their p95s are alike;
    # x2 and +15 ms leave room for a load spike on either while a x5 slowdown still breaches.
    "SNAP2CAPTION_RELEASE_MAX_P95_RATIO": "2.0",
    "SNAP2CAPTION_RELEASE_MIN_P95_INCREASE_S": "0.015",
}


@dataclass
class Traffic:
    """Clients sending caption requests to the gateway until stopped; every answer is kept."""

    url: str
    features: str = "caption"
    answers: list[tuple[int, str | None]] = field(default_factory=list)  # (status, track header)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self, clients: int = 2) -> None:
        for _ in range(clients):
            thread = threading.Thread(target=self._run, daemon=True)
            thread.start()
            self._threads.append(thread)

    def _run(self) -> None:
        images = [image_bytes(c) for c in COLOURS]
        with httpx.Client(base_url=self.url, timeout=30) as client:
            n = 0
            while not self._stop.is_set():
                response = client.post(
                    f"/v1/analyze?features={self.features}",
                    content=images[n % len(images)],
                    headers={"content-type": "image/png", "x-request-id": uuid.uuid4().hex},
                )
                self.answers.append((response.status_code, response.headers.get("x-snap2caption-track")))
                n += 1

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)


@dataclass
class Release:
    """The running processes and how to call the ``release`` commands on them."""

    workdir: Path
    registry_uri: str
    database_url: str
    gateway: ServiceProcess
    prometheus: PrometheusProcess
    canary: ServiceProcess | None = None
    model: str = "captioner"
    settings: dict[str, str] = field(default_factory=dict)  # overrides of RELEASE_SETTINGS

    def cli(self, *args: str, timeout_s: float = 180) -> subprocess.CompletedProcess[str]:
        # A ceiling, not a bound: a command takes ~10 s on a quiet machine (imports, MLflow, the database)
        # and more than 30 s was seen at load average 15 (the suite and other jobs on the same 2 cores).
        env = {
            "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin",
            "SNAP2CAPTION_HOME": str(self.workdir / "home-cli"),
            "MLFLOW_TRACKING_URI": self.registry_uri,
            "SNAP2CAPTION_GATEWAY_DATABASE_URL": self.database_url,
            "SNAP2CAPTION_RELEASE_PROMETHEUS_URL": self.prometheus.url,
            **RELEASE_SETTINGS,
            **self.settings,
        }
        return subprocess.run(
            [sys.executable, "-m", "snap2caption", "release", *args],
            env=env, capture_output=True, text=True, timeout=timeout_s, check=False,
        )  # fmt: skip

    def start_canary(self, **faults: str) -> ServiceProcess:
        """(Re)start the canary model service (its model's alias ``canary``) with test faults."""
        if self.canary is not None:
            self.canary.stop(timeout_s=10)
        name = f"canary-{uuid.uuid4().hex[:6]}"
        if self.model == "captioner":
            env = _captioner_env(
                self.registry_uri, name, self.workdir, model_alias="canary", poll_interval_s="0.5", **faults
            )
        else:
            env = _detector_env(self.registry_uri, name, self.workdir, detector_alias="canary", **faults)
        # Live, not ready: with no canary alias yet it has nothing to serve (the gateway sends it nothing).
        self.canary = LiveProcess(self.model, self.workdir / f"{name}.log", env=env, cwd=self.workdir,
                                  port=self.canary_port)  # fmt: skip
        return self.canary.start(ready_timeout_s=120)

    canary_port: int = 0


@pytest.fixture
def release(tmp_path_factory: pytest.TempPathFactory, mlflow_template_db: Path) -> Iterator[Release]:
    from snap2caption.models.caption.artifact import save_caption_model
    from snap2caption.registry import Registry
    from tests.services.captioner.conftest import CAPTIONS, IMAGE_MAX_SIDE, train_tiny

    workdir = tmp_path_factory.mktemp("canary")
    db = workdir / "mlflow.db"
    shutil.copyfile(mlflow_template_db, db)
    uri = f"sqlite:///{db}"
    registry = Registry(uri)
    with torch_threads(1):
        model, tokenizer = train_tiny(CAPTIONS, seed=1)
        folder = save_caption_model(
            model, tokenizer, workdir / "artifact", extra={"image_max_side": IMAGE_MAX_SIDE}
        )
    registry.register("captioner", folder, metrics={"test_cider_d": 1.0})
    assert registry.promote("captioner").status == "promoted"
    registry.register("captioner", folder, metrics={"test_cider_d": 1.0})  # v2, the same model: the release
    assert registry.resolve("captioner", "production").version == 1

    yield from _running_release(workdir, uri, "captioner")


def _running_release(workdir: Path, uri: str, model: str) -> Iterator[Release]:
    """Production's ``model`` service, a gateway with the canary's URL, and Prometheus scraping it."""
    database_url = f"sqlite:///{workdir / 'gateway.db'}"
    started: list[ServiceProcess | PrometheusProcess] = []
    release: Release | None = None
    if model == "captioner":
        production_env = _captioner_env(uri, "production", workdir, poll_interval_s="0.5")
    else:
        production_env = _detector_env(uri, "production", workdir)
    other = "detector" if model == "captioner" else "captioner"
    try:
        production = ServiceProcess(model, workdir / "production.log", cwd=workdir, env=production_env)
        started.append(production.start(ready_timeout_s=120))
        canary_port = free_port()
        gateway_env = {
            "SNAP2CAPTION_HOME": str(workdir / "home-gateway"),
            f"SNAP2CAPTION_GATEWAY_{model.upper()}_URL": production.url,
            f"SNAP2CAPTION_GATEWAY_{other.upper()}_URL": f"http://127.0.0.1:{free_port()}",  # unused
            f"SNAP2CAPTION_GATEWAY_CANARY_{model.upper()}_URL": f"http://127.0.0.1:{canary_port}",
            "SNAP2CAPTION_GATEWAY_DATABASE_URL": database_url,
            "SNAP2CAPTION_GATEWAY_READY_POLL_INTERVAL_S": "0.3",
        }
        gateway = LiveProcess("gateway", workdir / "gateway.log", env=gateway_env, cwd=workdir).start(60)
        started.append(gateway)
        prometheus = PrometheusProcess(
            workdir / "prometheus", {"gateway": [f"127.0.0.1:{gateway.port}"]}, 0.5
        )
        started.append(prometheus.start())
        release = Release(
            workdir, uri, database_url, gateway, prometheus, canary_port=canary_port, model=model
        )
        yield release
    finally:
        if release is not None and release.canary is not None:
            started.append(release.canary)
        for process in reversed(started):
            try:
                process.stop(**({"timeout_s": 10} if isinstance(process, ServiceProcess) else {}))
            except Exception:
                if isinstance(process, ServiceProcess):
                    process.kill()


def _detector_env(uri: str, name: str, workdir: Path, **settings: str) -> dict[str, str]:
    values = {"model_cache_dir": str(workdir / f"cache-{name}"), "poll_interval_s": "0.5", **settings}
    return {
        "MLFLOW_TRACKING_URI": uri,
        "SNAP2CAPTION_HOME": str(workdir / f"home-{name}"),
        **{f"SNAP2CAPTION_DETECTOR_{k.upper()}": v for k, v in values.items()},
    }


def _run_canary(release: Release, **faults: str) -> tuple[subprocess.CompletedProcess[str], Traffic]:
    """Start the canary service with ``faults``, release v2 at 50%, and watch it to its decision."""
    canary = release.start_canary(**faults)
    traffic = Traffic(release.gateway.url, "caption" if release.model == "captioner" else "objects,tags")
    traffic.start()
    try:
        started = release.cli("start", release.model, "--version", "2", "--share", "50")
        assert started.returncode == 0, started.stderr
        watched = release.cli("watch", release.model, timeout_s=400)
    finally:
        traffic.stop()
    assert canary.process is not None and canary.process.poll() is None, "the canary service died"
    assert traffic.answers, "no request was answered"
    return watched, traffic


def _logged(release: Release) -> list[tuple[str, int]]:
    """``(track, status)`` of every request in the gateway's inference log."""
    from services.gateway.db import inference_log

    engine = create_engine(release.database_url)
    with engine.connect() as conn:
        rows = [
            (r.track, r.status) for r in conn.execute(select(inference_log.c.track, inference_log.c.status))
        ]
    engine.dispose()
    return rows


def _assert_production_never_failed(release: Release, traffic: Traffic) -> None:
    """Every request production answered succeeded: by the log (failed answers carry no track header,
    so the log is where a failure's track is), and by the answers that name their track."""
    wait_for(lambda: len(_logged(release)) >= len(traffic.answers), 15, "the inference log to catch up")
    production = [status for track, status in _logged(release) if track == "production"]
    assert production and set(production) == {200}, sorted(set(production))
    assert {status for status, track in traffic.answers if track == "production"} == {200}


def _http_answers(url: str, service: str, track: str, ok: bool) -> float:
    """``snap2caption_http_requests_total`` of ``service``'s ``/v1`` routes on ``track`` in a scrape of
    ``url``, with status 200 (``ok``) or any other."""
    total = 0.0
    scrape = httpx.get(f"{url}/metrics", timeout=5).text
    for labels, value in re.findall(r"^snap2caption_http_requests_total\{([^}]*)\} (\S+)$", scrape, re.M):
        fields = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        mine = (fields["service"], fields["track"]) == (service, track) and fields["route"].startswith("/v1/")
        if mine and (fields["status"] == "200") == ok:
            total += float(value)
    return total


def _decisions(release: Release) -> list[dict[str, object]]:
    from services.gateway.db import release_decisions

    engine = create_engine(release.database_url)
    with engine.connect() as conn:
        rows = [
            dict(r)
            for r in conn.execute(select(release_decisions).order_by(release_decisions.c.id)).mappings()
        ]
    engine.dispose()
    return rows


def _an_erroring_canary_is_rolled_back_without_failing_production(release: Release) -> None:
    from snap2caption.registry import Registry

    watched, traffic = _run_canary(release, test_fault_errors="true")
    assert watched.returncode == 1, watched.stdout + watched.stderr
    assert "rolled back" in watched.stdout and "error rate" in watched.stdout, watched.stdout
    _assert_production_never_failed(release, traffic)
    # The canary answered (and failed) some requests: its errors were real, and only its own.
    assert any(track == "canary" and status != 200 for track, status in _logged(release))
    # The gateway's own HTTP metrics put those failed answers on the canary track, none on production's.
    assert _http_answers(release.gateway.url, "gateway", "canary", ok=False) > 0
    assert _http_answers(release.gateway.url, "gateway", "production", ok=False) == 0
    registry = Registry(release.registry_uri)
    assert registry.resolve("captioner", "production").version == 1
    assert registry.canary("captioner") is None
    last = _decisions(release)[-1]
    assert (last["decision"], last["automatic"], last["version"]) == ("rollback", True, 2)
    numbers = last["numbers"]
    assert isinstance(numbers, dict)
    assert numbers["canary"]["error_rate"] > 0.5 and numbers["production"]["error_rate"] == 0.0
    # Exported by the gateway from the database (read with its readiness polls).
    wait_for(
        lambda: (metric(release.gateway.url, "snap2caption_release_decisions", model="captioner",
                        decision="rollback") or 0) >= 1,
        15, "the rollback in the gateway's metrics",
    )  # fmt: skip


def _a_five_times_slower_canary_is_rolled_back_on_latency(release: Release) -> None:
    watched, traffic = _run_canary(release, test_fault_slowdown="5")
    assert watched.returncode == 1, watched.stdout + watched.stderr
    assert "p95" in watched.stdout, watched.stdout
    _assert_production_never_failed(release, traffic)
    last = _decisions(release)[-1]
    assert (last["decision"], last["automatic"]) == ("rollback", True)
    numbers = last["numbers"]
    assert isinstance(numbers, dict)
    assert numbers["canary"]["p95_s"] > 2 * numbers["production"]["p95_s"]
    assert numbers["canary"]["error_rate"] == 0.0


def _a_healthy_canary_is_promoted_and_every_track_is_logged(release: Release) -> None:
    from snap2caption.registry import Registry

    watched, traffic = _run_canary(release)
    assert watched.returncode == 0, watched.stdout + watched.stderr
    assert "promoted" in watched.stdout
    assert {status for status, _ in traffic.answers} == {200}
    registry = Registry(release.registry_uri)
    assert registry.resolve("captioner", "production").version == 2
    assert registry.canary("captioner") is None
    decisions = _decisions(release)
    assert [d["decision"] for d in decisions] == [
        "start",
        "rollback",
        "start",
        "rollback",
        "start",
        "promote",
    ]
    promote = decisions[-1]["numbers"]
    assert isinstance(promote, dict) and promote["canary"]["requests"] >= 20

    # The inference log says which track answered each request; production never failed.
    _assert_production_never_failed(release, traffic)
    assert {track for status, track in traffic.answers} == {"production", "canary"}
    # Prometheus has both tracks of the backend calls.
    series = release.prometheus.query(
        'sum by (track) (snap2caption_gateway_backend_requests_total{backend="captioner",outcome="ok"})'
    )
    assert {s["metric"]["track"] for s in series} == {"production", "canary"}
    # So do the gateway's answers to platforms, and the canary service labels its own answers canary.
    series = release.prometheus.query(
        "sum by (track) "
        '(snap2caption_http_requests_total{service="gateway",route="/v1/analyze",status="200"})'
    )
    assert {s["metric"]["track"] for s in series} == {"production", "canary"}
    assert release.canary is not None
    assert _http_answers(release.canary.url, "captioner", "canary", ok=True) > 0
    assert _http_answers(release.canary.url, "captioner", "production", ok=True) == 0


@pytest.mark.timeout(1200)  # three releases in turn; ~70 s on a quiet machine, 170 s at load average 10
def test_broken_canaries_are_rolled_back_and_a_healthy_one_promoted(release: Release) -> None:
    # One story in one test: each release starts from the registry the last one left (v1 production, v2
    # released again), and the healthy canary's promotion must come last, whatever order a plugin such
    # as pytest-randomly gives the tests of a module.
    _an_erroring_canary_is_rolled_back_without_failing_production(release)
    _a_five_times_slower_canary_is_rolled_back_on_latency(release)
    _a_healthy_canary_is_promoted_and_every_track_is_logged(release)


@pytest.fixture
def detector_release(tmp_path_factory: pytest.TempPathFactory, mlflow_template_db: Path) -> Iterator[Release]:
    """Production detector v1 and the release of v2 (the same model) behind a gateway and Prometheus."""
    from snap2caption.registry import Registry
    from tests.services.detector.conftest import random_detector, tiny_tagger

    workdir = tmp_path_factory.mktemp("canary-detector")
    db = workdir / "mlflow.db"
    shutil.copyfile(mlflow_template_db, db)
    uri = f"sqlite:///{db}"
    registry = Registry(uri)
    with torch_threads(1):
        detector = random_detector(workdir / "detector-artifact")
        tagger, tagger_metrics = tiny_tagger(workdir / "tagger-artifact")
    registry.register("tagger", tagger, metrics=tagger_metrics)
    assert registry.promote("tagger").status == "promoted"
    registry.register("detector", detector, metrics={"test_map50_95": 0.5})
    assert registry.promote("detector").status == "promoted"
    registry.register("detector", detector, metrics={"test_map50_95": 0.5})  # v2: the release
    yield from _running_release(workdir, uri, "detector")


@pytest.mark.timeout(900)  # two releases in turn
def test_detector_canary_rolled_back_when_it_errors_and_promoted_when_healthy(
    detector_release: Release,
) -> None:
    from snap2caption.registry import Registry

    release = detector_release
    # This story is the detector's error rollback and its promotion; the latency breach is the captioner's
    # story. A detector canary restarted for each release answers its first calls slower than the warm
    # production service (a healthy one was once rolled back at p95 x2.26 over 39 calls on loaded cores),
    # so its latency limits are out of the way here: only the error rate decides.
    release.settings = {
        "SNAP2CAPTION_RELEASE_MAX_P95_RATIO": "100",
        "SNAP2CAPTION_RELEASE_MIN_P95_INCREASE_S": "10",
    }
    registry = Registry(release.registry_uri)
    watched, traffic = _run_canary(release, test_fault_errors="true")
    assert watched.returncode == 1, watched.stdout + watched.stderr
    assert "rolled back" in watched.stdout and "error rate" in watched.stdout, watched.stdout
    _assert_production_never_failed(release, traffic)
    assert registry.resolve("detector", "production").version == 1 and registry.canary("detector") is None
    rollback = _decisions(release)[-1]
    assert (rollback["model"], rollback["decision"], rollback["automatic"]) == ("detector", "rollback", True)
    numbers = rollback["numbers"]
    assert isinstance(numbers, dict)
    assert numbers["canary"]["error_rate"] > 0.5 and numbers["production"]["error_rate"] == 0.0

    watched, traffic = _run_canary(release)
    assert watched.returncode == 0, watched.stdout + watched.stderr
    assert "promoted" in watched.stdout
    assert {status for status, _ in traffic.answers} == {200}
    assert {track for _, track in traffic.answers} == {"production", "canary"}
    assert registry.resolve("detector", "production").version == 2 and registry.canary("detector") is None
    assert [d["decision"] for d in _decisions(release)] == ["start", "rollback", "start", "promote"]
    series = release.prometheus.query(
        'sum by (track) (snap2caption_gateway_backend_requests_total{backend="detector",outcome="ok"})'
    )
    assert {s["metric"]["track"] for s in series} == {"production", "canary"}
