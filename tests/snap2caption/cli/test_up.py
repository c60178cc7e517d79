"""`snap2caption up`: ports from settings, the run's Prometheus config, and one line for any failed step.

The failure tests run the real command in a process, from a scratch folder, on free ports: what a user sees
on the terminal is what is checked (one `Error: <step>: ...; log: <file>` line, exit status 1, no traceback).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from snap2caption.cli.data import data
from snap2caption.cli.up import (
    DEFAULT_PORTS,
    HELD_OUT_FRACTION,
    UpSettings,
    write_prometheus_config,
)
from snap2caption.data.synth import SynthConfig
from tests.helpers import free_port

REPO = Path(__file__).resolve().parents[3]
SERVICES = tuple(DEFAULT_PORTS)


def _port_env() -> dict[str, str]:
    """Every service of the stack on its own free port, as a second stack beside a first one would be."""
    return {f"SNAP2CAPTION_{name.upper()}_PORT": str(free_port()) for name in SERVICES}


def _up(root: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SNAP2CAPTION_")}
    full_env |= {"SNAP2CAPTION_HOME": str(root / "var"), **env}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "snap2caption",
            "up",
            "--root",
            str(root),
            "--no-prometheus",
            "--no-mlflow-ui",
            *args,
        ],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=240,
    )


def _one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The one error line of a failed run (and nothing like a traceback anywhere)."""
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr, result.stdout + result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0].removeprefix("Error: ")


# ------------------------------------------------------------------------------------------- settings


def test_the_data_without_dvc_is_the_pipelines() -> None:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert params["synth"]["images"] == SynthConfig().images and params["synth"]["seed"] == 0
    # `data synth`'s default, written out so that the CLI does not import the renderer at start-up.
    images = next(p for p in data.commands["synth"].params if p.name == "images")
    assert images.default == SynthConfig().images
    assert params["etl"]["val_fraction"] == params["etl"]["test_fraction"] == HELD_OUT_FRACTION


def test_default_ports() -> None:
    assert UpSettings().ports() == {
        "gateway": 8000, "captioner": 8001, "detector": 8002, "etl": 8003, "prometheus": 9090, "mlflow": 5000,
    }  # fmt: skip


def test_a_base_port_moves_the_whole_stack_and_a_service_port_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SNAP2CAPTION_BASE_PORT", "18100")
    monkeypatch.setenv("SNAP2CAPTION_MLFLOW_PORT", "18200")
    assert UpSettings().ports() == {
        "gateway": 18100, "captioner": 18101, "detector": 18102, "etl": 18103, "prometheus": 18104,
        "mlflow": 18200,
    }  # fmt: skip


def test_the_runs_prometheus_config_scrapes_the_runs_ports_and_is_valid(tmp_path: Path) -> None:
    ports = {name: 18100 + i for i, name in enumerate(SERVICES)}
    source = REPO / "infra" / "prometheus" / "prometheus.yml"
    config = write_prometheus_config(source, tmp_path / "var" / "prometheus.yml", ports)
    doc = yaml.safe_load(config.read_text())
    targets = {job["job_name"]: job["static_configs"][0]["targets"] for job in doc["scrape_configs"]}
    assert targets == {name: [f"127.0.0.1:{ports[name]}"] for name in targets}
    assert set(targets) == set(SERVICES) - {"mlflow"}  # every job of the source, none dropped or added
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is missing: `make setup` installs Debian's prometheus package")
    # promtool resolves the (now absolute) rule files from the generated file's folder and checks them too.
    check = subprocess.run([promtool, "check", "config", str(config)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS" in check.stdout + check.stderr and "rules found" in check.stdout + check.stderr


# ------------------------------------------------------------------------------- one line per failure


def test_a_bad_port_setting_is_one_line(tmp_path: Path) -> None:
    result = _up(tmp_path, env={"SNAP2CAPTION_BASE_PORT": "eight thousand"})
    assert _one_line_error(result) == (
        "settings: SNAP2CAPTION_BASE_PORT: "
        "Input should be a valid integer, unable to parse string as an integer"
    )


def test_a_port_in_use_is_one_line_before_anything_starts(tmp_path: Path) -> None:
    env = _port_env()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", int(env["SNAP2CAPTION_DETECTOR_PORT"])))
        listener.listen()
        result = _up(tmp_path, env=env)
    error = _one_line_error(result)
    assert error.startswith(
        f"ports: port {env['SNAP2CAPTION_DETECTOR_PORT']} (detector) is already in use by pid "
    )
    assert error.endswith("(choose others with SNAP2CAPTION_BASE_PORT or SNAP2CAPTION_<SERVICE>_PORT)")
    assert not (tmp_path / "var" / "log").exists()  # nothing was started or built


def test_a_broken_data_step_is_one_line_naming_its_log(tmp_path: Path) -> None:
    """A DVC stage that fails, as `snap2caption: command not found` did: exit status 127 in the stage."""
    stage = {"stages": {"etl": {"cmd": "echo 'synthesising'; echo 'snap2caption: not found' >&2; exit 127"}}}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(stage))
    dvc = Path(sys.executable).with_name("dvc")
    init = subprocess.run([str(dvc), "init", "--no-scm", "-q"], cwd=tmp_path, capture_output=True, text=True)
    assert init.returncode == 0, init.stderr
    result = _up(tmp_path, env=_port_env())
    error = _one_line_error(result)
    assert error.startswith("data: dvc repro etl failed (exit 255): ERROR: failed to reproduce 'etl'"), error
    assert error.endswith("; log: var/log/data.log")
    log = (tmp_path / "var" / "log" / "data.log").read_text()
    assert "synthesising" in log and "snap2caption: not found" in log


def test_a_service_that_exits_at_start_up_is_one_line_naming_its_log(tmp_path: Path) -> None:
    env = _port_env() | {"SNAP2CAPTION_ETL_MAX_QUEUED_JOBS": "0"}  # refused by the ETL's settings (>= 1)
    result = _up(tmp_path, "--skip-data", "--skip-models", env=env)
    error = _one_line_error(result)
    assert error.startswith(
        "services: etl exited with code 1 during start-up: "
        "pydantic_core._pydantic_core.ValidationError: 1 validation error for Settings"
    ), error
    assert error.endswith("; log: var/log/etl.log")
    assert "max_queued_jobs" in (tmp_path / "var" / "log" / "etl.log").read_text()
    for name in ("captioner", "detector", "gateway"):  # started beside it, then stopped
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", int(env[f"SNAP2CAPTION_{name.upper()}_PORT"]))) != 0
