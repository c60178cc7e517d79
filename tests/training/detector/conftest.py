"""Shared fixtures: a tiny synthetic detection dataset, and one tiny detector run shared by every test.

The run is the real CLI (``train detector --config tiny --promote``, then ``export detector --int8``) in a
child process whose audit hook records and blocks every non-loopback connect and DNS lookup, so one
training serves the offline test, the registry flow, evaluation and export. Everything lives under pytest's
temporary folders: ETL output, Ultralytics config (settings, fonts), MLflow store, artifacts.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from snap2caption.data.etl import EtlConfig, run_etl
from snap2caption.data.synth import SynthConfig, write_synth
from snap2caption.registry import Registry

REPO = Path(__file__).resolve().parents[3]  # on the child's path whatever the working directory

# Loaded by the child interpreter before anything else (sitecustomize on PYTHONPATH).
SITECUSTOMIZE = textwrap.dedent(
    """
    import json, os, sys

    _LOG = os.environ["NET_AUDIT_LOG"]
    _LOOPBACK = ("localhost", "127.", "::1", "0.0.0.0")
    _EVENTS = {"socket.connect", "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyname_ex",
               "socket.gethostbyaddr", "socket.sendto", "socket.sendmsg"}

    def _host(event, args):
        if event == "socket.connect":
            address = args[1]
            if isinstance(address, (str, bytes)):  # AF_UNIX path: local by definition
                return None
            return str(address[0])
        if event in ("socket.sendto", "socket.sendmsg"):
            address = args[-1]
            return str(address[0]) if isinstance(address, tuple) else None
        return str(args[0])

    def _hook(event, args):
        if event not in _EVENTS:
            return
        host = _host(event, args)
        if host is None or host.startswith(_LOOPBACK):
            return
        with open(_LOG, "a") as f:
            f.write(json.dumps({"event": event, "host": host, "pid": os.getpid()}) + "\\n")
        raise OSError(f"network blocked by the offline test: {event} {host}")

    sys.addaudithook(_hook)
    """
)

CHILD = textwrap.dedent(
    """
    import socket, sys
    from snap2caption.cli import main

    data, out, export, uri = sys.argv[1:5]
    main(["train", "detector", "--config", "tiny", "--out", out, "--tracking-uri", uri, "--promote",
          f"data={data}"], standalone_mode=False)
    main(["export", "detector", "--model", out, "--out", export, "--int8", "--calib-data", data],
         standalone_mode=False)
    try:  # the hook's self-test: this one must be recorded and blocked
        socket.getaddrinfo("example.com", 443)
    except OSError:
        print("SELFTEST-BLOCKED")
    """
)


@dataclass
class TinyRun:
    """What the offline-guarded tiny run left behind."""

    artifact_dir: Path
    export_dir: Path
    tracking_uri: str
    home: Path
    returncode: int
    output: str
    net_log: list[dict[str, Any]]

    @property
    def evaluation(self) -> dict[str, Any]:
        return dict(json.loads((self.artifact_dir / "eval.json").read_text()))

    @property
    def run_id(self) -> str:
        run_id = Registry(self.tracking_uri).resolve("detector", 1).run_id
        assert run_id is not None
        return run_id

    @property
    def work_dir(self) -> Path:
        return self.home / "runs" / "detector" / self.run_id


@pytest.fixture(scope="session", autouse=True)
def _yolo_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A private Ultralytics config folder for in-process tests (prepare_ultralytics fixes it once)."""
    os.environ.setdefault("YOLO_CONFIG_DIR", str(tmp_path_factory.mktemp("yolo-config")))
    yield


@pytest.fixture(scope="module", autouse=True)
def _two_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1200 synthetic 64-px scenes through the real ETL (~10 s): 477 train, 473 val, 250 test, YOLO labels,
    manifests. Training and evaluation use a handful (the tiny config's ``max_*_images``); the domain model
    is fitted on all train images and calibrated on all validation images: 473 calibration images put the
    false-rejection threshold at the 9th largest distance, so the share of fresh in-domain scenes it rejects
    is Beta(9, 465)-distributed around 0.02 and above 0.05 with probability 1.4e-4."""
    root = tmp_path_factory.mktemp("det-data")
    write_synth(root / "synth", SynthConfig(images=1200, seed=3, image_size=64, workers=1), progress=False)
    config = EtlConfig(
        source="coco",
        images=root / "synth" / "images",
        annotations=[root / "synth" / "annotations" / n for n in ("captions.json", "instances.json")],
        out=root / "processed",
        val_fraction=0.4,
        test_fraction=0.2,
        workers=1,
    )
    run_etl(config, progress=False)
    return root / "processed"


@pytest.fixture(scope="session")
def tiny_run(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory, mlflow_template_db: Path) -> TinyRun:
    """Train (tiny config), register, promote and export (+ int8) through the CLI, network blocked."""
    tmp = tmp_path_factory.mktemp("tiny-run")
    shutil.copyfile(mlflow_template_db, tmp / "mlflow.db")  # already migrated: saves MLflow's first-run setup
    hook_dir = tmp / "hook"
    hook_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(SITECUSTOMIZE)
    log = tmp / "net.jsonl"
    log.touch()
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("YOLO_", "MLFLOW_", "HF_", "TRANSFORMERS_"))  # nothing pre-set offline for it
    }
    env |= {
        "PYTHONPATH": os.pathsep.join([str(hook_dir), str(REPO)]),
        "NET_AUDIT_LOG": str(log),
        "SNAP2CAPTION_HOME": str(tmp / "home"),  # Ultralytics settings and fonts go under it, not ~/.config
    }
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    out, export = tmp / "artifact", tmp / "export"
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(tiny_data), str(out), str(export), uri],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    records = [json.loads(line) for line in log.read_text().splitlines()]
    return TinyRun(out, export, uri, tmp / "home", proc.returncode, proc.stdout + proc.stderr, records)


@pytest.fixture(scope="session")
def tiny_trained(tiny_run: TinyRun) -> TinyRun:
    """``tiny_run``, which must have succeeded."""
    assert tiny_run.returncode == 0, tiny_run.output[-8000:]
    return tiny_run
