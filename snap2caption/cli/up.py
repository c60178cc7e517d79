"""``snap2caption up``: the main job. Builds what is missing, starts the whole system on loopback, waits.

In order: the data pipeline (``dvc repro etl``: synthetic scenes -> ETL), the starter models when the
registry has no production ones (``snap2caption bootstrap``, at most ~10 minutes on 2 cores), then every
service as its own process: ETL (:8003), captioner (:8001), detector (:8002), gateway (:8000), plus the
MLflow UI over the embedded registry (:5000) and Prometheus (:9090) when its binary is installed. It prints
the URLs; Ctrl-C (or SIGTERM) stops everything cleanly, the gateway first.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

import click

from snap2caption.launcher import ServiceSpec


def _build_data(root: Path) -> None:
    """Run the DVC pipeline (synth -> etl); a second run is a no-op that takes a second or two."""
    dvc = shutil.which("dvc") or str(Path(sys.executable).with_name("dvc"))
    if (root / "dvc.yaml").exists() and (root / ".dvc").is_dir() and Path(dvc).exists():
        click.echo("== data: dvc repro etl (synthetic scenes -> ETL)")
        subprocess.run([dvc, "repro", "etl"], cwd=root, check=True)
        return
    # Outside a DVC checkout (an installed package), run the same stages directly.
    from snap2caption.data.etl import EtlConfig, run_etl
    from snap2caption.data.synth import SynthConfig, write_synth

    synth_dir, out_dir = root / "data" / "synth", root / "data" / "processed"
    if not (synth_dir / "annotations" / "captions.json").exists():
        click.echo("== data: synthesising scenes")
        write_synth(synth_dir, SynthConfig(images=2000, seed=0))
    click.echo("== data: ETL")
    ann = synth_dir / "annotations"
    run_etl(
        EtlConfig(
            source="coco",
            images=synth_dir / "images",
            annotations=[ann / "captions.json", ann / "instances.json"],
            out=out_dir,
        )
    )


def system_specs(root: Path, home: Path, *, prometheus: bool, mlflow_ui: bool) -> list[ServiceSpec]:
    """The processes of the embedded deployment, in start order (backends before the gateway)."""
    from snap2caption.registry import default_tracking_uri

    specs = [
        ServiceSpec("etl", 8003),
        ServiceSpec("captioner", 8001, ready_timeout_s=300),
        ServiceSpec("detector", 8002, ready_timeout_s=300),
        ServiceSpec("gateway", 8000),
    ]
    binary = shutil.which("prometheus")
    if prometheus and binary:
        storage = home / "prometheus"
        storage.mkdir(parents=True, exist_ok=True)
        specs.append(
            ServiceSpec(
                "prometheus",
                9090,
                argv=(
                    binary, f"--config.file={root / 'infra' / 'prometheus' / 'prometheus.yml'}",
                    f"--storage.tsdb.path={storage}", "--web.listen-address=127.0.0.1:9090",
                    "--storage.tsdb.retention.time=7d",
                ),
                ready_path="/-/ready",
            )
        )  # fmt: skip
    if mlflow_ui:
        uri = default_tracking_uri()
        specs.append(
            ServiceSpec(
                "mlflow",
                5000,
                argv=(
                    sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
                    "--default-artifact-root", str(home / "mlflow" / "artifacts"),
                    "--host", "127.0.0.1", "--port", "5000", "--workers", "1",
                ),
                ready_path="/health",
            )
        )  # fmt: skip
    return specs


@click.command()
@click.option(
    "--root", type=click.Path(file_okay=False, path_type=Path), default=Path("."), show_default=True
)
@click.option("--skip-data", is_flag=True, help="Do not run the data pipeline first.")
@click.option("--skip-models", is_flag=True, help="Do not build missing starter models.")
@click.option("--prometheus/--no-prometheus", default=True, show_default=True, help="When installed.")
@click.option("--mlflow-ui/--no-mlflow-ui", default=True, show_default=True, help="MLflow UI on :5000.")
@click.option("--log-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("var/log"))
def up(
    root: Path, skip_data: bool, skip_models: bool, prometheus: bool, mlflow_ui: bool, log_dir: Path
) -> None:
    """Set up data and models, start the whole system on loopback; Ctrl-C stops it."""
    from snap2caption.cli.bootstrap import build_starter_models
    from snap2caption.launcher import start_services, stop_services
    from snap2caption.registry import snap2caption_home

    root = root.resolve()
    os.chdir(root)  # the services and the registry resolve ./var and ./data from here
    home = snap2caption_home()
    if not skip_data:
        _build_data(root)
    if not skip_models:
        build_starter_models(root / "data" / "processed", home / "bootstrap")
    specs = system_specs(root, home, prometheus=prometheus, mlflow_ui=mlflow_ui)
    if prometheus and not any(s.name == "prometheus" for s in specs):
        click.echo("   (Prometheus is not installed: `apt-get install prometheus` to get it; skipping)")
    click.echo("== services: starting " + ", ".join(s.name for s in specs))
    running = start_services(specs, root / log_dir)

    stopping = False

    def _stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    docs = {"prometheus": "/alerts", "mlflow": "/#/models"}
    for svc in running:
        extra = docs.get(svc.spec.name, "/docs")
        click.echo(f"   {svc.spec.name:<10} {svc.spec.url:<24} ({svc.spec.url}{extra}, log {svc.log_path})")
    gateway = next(s for s in running if s.spec.name == "gateway")
    click.echo(f"Ready: open {gateway.spec.url}/ for the web page. Press Ctrl-C to stop.")
    try:
        while not stopping:
            dead = [s for s in running if s.process.poll() is not None]
            if dead:
                names = ", ".join(f"{s.spec.name} (exit {s.process.returncode})" for s in dead)
                click.echo(f"service stopped unexpectedly: {names}; stopping the rest", err=True)
                break
            time.sleep(0.5)
    finally:
        click.echo("stopping services ...")
        stop_services(list(reversed(running)))
        click.echo("stopped.")
