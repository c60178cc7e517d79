"""``snap2caption up``: the main job. Builds what is missing, starts every service on loopback, waits.

Until the gateway, captioner and detector exist this starts what exists: the data pipeline and the
ETL service. Ctrl-C (or SIGTERM) stops every service cleanly.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

import click


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


@click.command()
@click.option(
    "--root", type=click.Path(file_okay=False, path_type=Path), default=Path("."), show_default=True
)
@click.option("--skip-data", is_flag=True, help="Do not run the data pipeline first.")
@click.option("--log-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("var/log"))
def up(root: Path, skip_data: bool, log_dir: Path) -> None:
    """Set up data and start every service on loopback; Ctrl-C stops them."""
    from snap2caption.launcher import ServiceSpec, start_services, stop_services

    root = root.resolve()
    if not skip_data:
        _build_data(root)
    specs = [ServiceSpec("etl", 8003)]
    click.echo("== services: starting " + ", ".join(s.name for s in specs))
    running = start_services(specs, root / log_dir)

    stopping = False

    def _stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    for svc in running:
        click.echo(f"   {svc.spec.name:<10} {svc.spec.url}   (docs {svc.spec.url}/docs, log {svc.log_path})")
    click.echo("Ready. Press Ctrl-C to stop.")
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
        stop_services(running)
        click.echo("stopped.")
