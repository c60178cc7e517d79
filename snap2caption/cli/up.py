"""``snap2caption up``: the main job. Builds what is missing, starts the whole system on loopback, waits.

In order: a check that every port is free, the data pipeline (``dvc repro etl``: synthetic scenes -> ETL),
the starter models when the registry has no production ones (``snap2caption bootstrap``, a budget of
``$SNAP2CAPTION_BOOTSTRAP_MINUTES``, default 9), then every service as its own process: ETL, captioner,
detector, gateway, plus the MLflow UI over the embedded registry and Prometheus when its binary is
installed. It prints the URLs; Ctrl-C (or SIGTERM) stops everything cleanly, the gateway first.

Ports come from the environment (:class:`UpSettings`): defaults 8000-8003 (gateway, captioner, detector, ETL),
9090 (Prometheus) and 5000 (MLflow); ``SNAP2CAPTION_BASE_PORT`` moves the whole stack to base..base+5;
``SNAP2CAPTION_<SERVICE>_PORT`` sets one service's port (the variable that service reads itself).

Each step writes its output to a log under ``$SNAP2CAPTION_HOME/log`` (``var/log``); a failing step ends the
run with one line naming the step and its log, and exit status 1.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import time
import traceback
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import FrameType

import click
import yaml
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from snap2caption.cli.bootstrap import BootstrapSettings, budget_option
from snap2caption.launcher import LaunchError, ServiceSpec, Step, child_env, load_settings, run_steps

DEFAULT_PORTS = {
    "gateway": 8000,
    "captioner": 8001,
    "detector": 8002,
    "etl": 8003,
    "prometheus": 9090,
    "mlflow": 5000,
}
_PORTS_HINT = " (choose others with SNAP2CAPTION_BASE_PORT or SNAP2CAPTION_<SERVICE>_PORT)"
# params.yaml's held-out shares (its scene count is SynthConfig's default), for a checkout without DVC (an
# installed package); a test keeps them equal.
HELD_OUT_FRACTION = 0.05
# With SNAP2CAPTION_BASE_PORT: the stack on base .. base+5, in this order.
BASE_OFFSETS = {"gateway": 0, "captioner": 1, "detector": 2, "etl": 3, "prometheus": 4, "mlflow": 5}


class UpSettings(BaseSettings):
    """The ports of ``snap2caption up``, from ``SNAP2CAPTION_*`` variables.

    A service's own variable wins (``SNAP2CAPTION_GATEWAY_PORT``: the same one ``snap2caption serve gateway``
    reads), then ``SNAP2CAPTION_BASE_PORT`` + the service's offset, then the default.
    """

    model_config = SettingsConfigDict(env_prefix="SNAP2CAPTION_", extra="ignore")

    base_port: int | None = Field(
        default=None, ge=1, le=65535 - 5, description="gateway, captioner, detector, etl, prometheus, mlflow "
        "on base .. base+5."
    )  # fmt: skip
    gateway_port: int | None = Field(default=None, ge=1, le=65535)
    captioner_port: int | None = Field(default=None, ge=1, le=65535)
    detector_port: int | None = Field(default=None, ge=1, le=65535)
    etl_port: int | None = Field(default=None, ge=1, le=65535)
    prometheus_port: int | None = Field(default=None, ge=1, le=65535)
    mlflow_port: int | None = Field(default=None, ge=1, le=65535)

    def port(self, service: str) -> int:
        """The port ``service`` (a key of :data:`DEFAULT_PORTS`) runs on."""
        explicit: int | None = getattr(self, f"{service}_port")
        if explicit is not None:
            return explicit
        if self.base_port is not None:
            return self.base_port + BASE_OFFSETS[service]
        return DEFAULT_PORTS[service]

    def ports(self) -> dict[str, int]:
        return {name: self.port(name) for name in DEFAULT_PORTS}


def write_prometheus_config(source: Path, dest: Path, ports: Mapping[str, int]) -> Path:
    """``source`` (``infra/prometheus/prometheus.yml``) with each job's targets on the port its service runs
    on and the rule files as absolute paths, written to ``dest`` for this run."""
    doc = yaml.safe_load(source.read_text())
    doc["rule_files"] = [str(source.parent / pattern) for pattern in doc.get("rule_files", [])]
    for job in doc.get("scrape_configs", []):
        port = ports.get(job["job_name"])
        if port is None:
            continue
        for static in job.get("static_configs", []):
            static["targets"] = [f"{target.rpartition(':')[0]}:{port}" for target in static["targets"]]
    dest.parent.mkdir(parents=True, exist_ok=True)
    header = f"# Written by `snap2caption up` from {source} with this run's ports; edit that file instead.\n"
    dest.write_text(header + yaml.safe_dump(doc, sort_keys=False))
    return dest


def system_specs(
    root: Path, home: Path, ports: Mapping[str, int], *, prometheus: bool, mlflow_ui: bool
) -> list[ServiceSpec]:
    """The processes of the embedded deployment, in start order (backends before the gateway)."""
    from snap2caption.registry import default_tracking_uri

    backends = {name: f"http://127.0.0.1:{ports[name]}" for name in ("captioner", "detector")}
    specs = [
        ServiceSpec("etl", ports["etl"]),
        ServiceSpec("captioner", ports["captioner"], ready_timeout_s=300),
        ServiceSpec("detector", ports["detector"], ready_timeout_s=300),
        ServiceSpec(
            "gateway",
            ports["gateway"],
            env=(
                ("SNAP2CAPTION_GATEWAY_CAPTIONER_URL", backends["captioner"]),
                ("SNAP2CAPTION_GATEWAY_DETECTOR_URL", backends["detector"]),
            ),
        ),
    ]
    binary = shutil.which("prometheus")
    if prometheus and binary:
        storage = home / "prometheus"
        storage.mkdir(parents=True, exist_ok=True)
        config = write_prometheus_config(
            root / "infra" / "prometheus" / "prometheus.yml", home / "prometheus.yml", ports
        )
        specs.append(
            ServiceSpec(
                "prometheus",
                ports["prometheus"],
                argv=(
                    binary, f"--config.file={config}", f"--storage.tsdb.path={storage}",
                    f"--web.listen-address=127.0.0.1:{ports['prometheus']}",
                    "--storage.tsdb.retention.time=7d",
                ),
                ready_path="/-/ready",
            )
        )  # fmt: skip
    if mlflow_ui:
        specs.append(
            ServiceSpec(
                "mlflow",
                ports["mlflow"],
                argv=(
                    sys.executable, "-m", "mlflow", "server", "--backend-store-uri", default_tracking_uri(),
                    "--default-artifact-root", str(home / "mlflow" / "artifacts"),
                    "--host", "127.0.0.1", "--port", str(ports["mlflow"]), "--workers", "1",
                ),
                ready_path="/health",
            )
        )  # fmt: skip
    return specs


@contextlib.contextmanager
def step(name: str, log_path: Path) -> Iterator[None]:
    """Run an in-process step of ``up``: an unexpected error becomes one line, its traceback goes to the
    log."""
    try:
        yield
    except (click.ClickException, KeyboardInterrupt):
        raise  # already one line (LaunchError), or Ctrl-C: click prints "Aborted!"
    except Exception as exc:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("a") as out:
            traceback.print_exc(file=out)
        first = next(iter(str(exc).strip().splitlines()), "")
        raise LaunchError(name, f"{type(exc).__name__}: {first}", log_path) from None


def _build_data(root: Path, log_dir: Path) -> None:
    """Run the DVC pipeline (synth -> etl); a second run is a no-op that takes a second or two."""
    dvc = shutil.which("dvc", path=child_env()["PATH"])
    if (root / "dvc.yaml").exists() and (root / ".dvc").is_dir() and dvc is not None:
        log = log_dir / "data.log"
        click.echo(f"== data: dvc repro etl (synthetic scenes -> ETL), log {log}")
        run_steps([Step("dvc repro etl", (dvc, "repro", "etl"), log)], "data", cwd=root)
        return
    # Outside a DVC checkout (an installed package), run the same stages directly.
    from snap2caption.data.etl import EtlConfig, run_etl
    from snap2caption.data.synth import SynthConfig, write_synth

    with step("data", log_dir / "up.log"):
        synth_dir, out_dir = root / "data" / "synth", root / "data" / "processed"
        if not (synth_dir / "annotations" / "captions.json").exists():
            click.echo("== data: synthesising scenes")
            write_synth(synth_dir, SynthConfig(seed=0), progress=False)
        click.echo("== data: ETL")
        ann = synth_dir / "annotations"
        run_etl(
            EtlConfig(
                source="coco",
                images=synth_dir / "images",
                annotations=[ann / "captions.json", ann / "instances.json"],
                out=out_dir,
                val_fraction=HELD_OUT_FRACTION,
                test_fraction=HELD_OUT_FRACTION,
            ),
            progress=False,
        )


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # SIGTERM while building: unwind as Ctrl-C does, stopping what was started


def _shown(path: Path, root: Path) -> Path:
    """``path`` relative to the checkout when inside it (shorter lines; the process runs from there)."""
    return path.relative_to(root) if path.is_relative_to(root) else path


@click.command()
@click.option(
    "--root", type=click.Path(file_okay=False, path_type=Path), default=Path("."), show_default=True
)
@click.option("--skip-data", is_flag=True, help="Do not run the data pipeline first.")
@click.option("--skip-models", is_flag=True, help="Do not build missing starter models.")
@click.option("--prometheus/--no-prometheus", default=True, show_default=True, help="When installed.")
@click.option("--mlflow-ui/--no-mlflow-ui", default=True, show_default=True, help="The MLflow UI.")
@click.option(
    "--log-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="[$SNAP2CAPTION_HOME/log]",
)
@budget_option("--bootstrap-minutes")
def up(
    root: Path,
    skip_data: bool,
    skip_models: bool,
    prometheus: bool,
    mlflow_ui: bool,
    log_dir: Path | None,
    minutes: float | None,
) -> None:
    """Set up data and models, start the whole system on loopback; Ctrl-C stops it.

    Ports: SNAP2CAPTION_BASE_PORT (the stack on base..base+5) or SNAP2CAPTION_{GATEWAY,CAPTIONER,DETECTOR,ETL,
    PROMETHEUS,MLFLOW}_PORT; defaults 8000-8003, 9090, 5000.
    """
    from snap2caption.cli.bootstrap import build_starter_models
    from snap2caption.launcher import check_ports, start_services, stop_services
    from snap2caption.registry import snap2caption_home

    root = root.resolve()
    os.chdir(root)  # the services and the registry resolve ./var and ./data from here
    signal.signal(signal.SIGTERM, _interrupt)
    home = snap2caption_home()
    log_dir = _shown(log_dir.resolve() if log_dir else home / "log", root)
    ports = load_settings(UpSettings).ports()
    bootstrap = load_settings(BootstrapSettings, minutes=minutes)
    with step("settings", log_dir / "up.log"):
        specs = system_specs(root, home, ports, prometheus=prometheus, mlflow_ui=mlflow_ui)
    if prometheus and not any(s.name == "prometheus" for s in specs):
        click.echo("   (Prometheus is not installed: `apt-get install prometheus` to get it; skipping)")
    check_ports(specs, _PORTS_HINT)  # before anything starts: data and models take minutes
    if not skip_data:
        _build_data(root, log_dir)
    if not skip_models:
        with step("models", log_dir / "up.log"):
            build_starter_models(root / "data" / "processed", home / "bootstrap", log_dir, bootstrap)
    check_ports(specs, _PORTS_HINT)  # again: one may have been taken while the models were built
    click.echo(f"== services: starting {', '.join(s.name for s in specs)}, logs {log_dir}/<service>.log")
    running = start_services(specs, log_dir)

    stopping = False

    def _stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    failure: LaunchError | None = None
    try:  # from here on Ctrl-C and SIGTERM only ask the loop below to stop; the `finally` stops the services
        signal.signal(signal.SIGINT, _stop)
        signal.signal(signal.SIGTERM, _stop)
        # One page per service to open (each answers 200): web page, API docs, registered models, and
        # Prometheus's root, which leads to the UI it has (Debian's package has only the classic one).
        pages = {"gateway": "/", "prometheus": "/", "mlflow": "/#/models"}
        for svc in running:
            url = svc.spec.url + pages.get(svc.spec.name, "/docs")
            click.echo(f"   {svc.spec.name:<10} {url:<34} log {svc.log_path}")
        gateway = next(s for s in running if s.spec.name == "gateway")
        click.echo(
            f"Ready: open {gateway.spec.url}/ for the web page (API docs: {gateway.spec.url}/docs). "
            "Press Ctrl-C to stop."
        )
        while not stopping:
            dead = next((s for s in running if s.process.poll() is not None), None)
            if dead is not None:
                failure = LaunchError("services", f"{dead.exit_message()}; stopped the rest", dead.log_path)
                break
            time.sleep(0.5)
    finally:
        click.echo("stopping services ...")
        stop_services(list(reversed(running)))
        click.echo("stopped.")
    if failure is not None:
        raise failure
