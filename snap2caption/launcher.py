"""Start the services as separate processes on loopback, wait until each is ready, stop them cleanly.

This is what ``snap2caption up`` (and so ``make up``) runs: the embedded single-machine deployment.
Each service is its own ``snap2caption serve <name>`` process, exactly as in a container.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServiceSpec:
    """One process the launcher runs: a ``snap2caption serve <name>`` service, or any other server
    (``argv``) that answers ``ready_path`` with 200 once it can serve (Prometheus: ``/-/ready``)."""

    name: str
    port: int
    host: str = "127.0.0.1"
    extra_args: tuple[str, ...] = ()
    ready_timeout_s: float = 120.0
    argv: tuple[str, ...] = ()
    ready_path: str = "/readyz"
    env: tuple[tuple[str, str], ...] = ()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        if self.argv:
            return list(self.argv)
        return [
            sys.executable, "-m", "snap2caption", "serve", self.name,
            "--host", self.host, "--port", str(self.port), *self.extra_args,
        ]  # fmt: skip


@dataclass
class RunningService:
    spec: ServiceSpec
    process: subprocess.Popen[bytes]
    log_path: Path = field(default_factory=Path)


def wait_ready(
    url: str, timeout_s: float, process: subprocess.Popen[bytes] | None = None, path: str = "/readyz"
) -> bool:
    """Poll ``url + path`` until it answers 200, the process exits, or the timeout passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"{url}{path}", timeout=2) as resp:
                if resp.status == 200:
                    return True
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.25)
    return False


def start_services(specs: Sequence[ServiceSpec], log_dir: Path) -> list[RunningService]:
    """Start every service, then wait for each to be ready; on any failure stop them all and raise."""
    log_dir.mkdir(parents=True, exist_ok=True)
    running: list[RunningService] = []
    try:
        for spec in specs:
            log_path = log_dir / f"{spec.name}.log"
            with log_path.open("ab") as out:
                # A new process group, so that Ctrl-C in the terminal reaches only the launcher,
                # which then drains the services in order.
                proc = subprocess.Popen(
                    spec.command(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                    env={**os.environ, "PYTHONUNBUFFERED": "1", **dict(spec.env)},
                )  # fmt: skip
            running.append(RunningService(spec, proc, log_path))
            log.info("started %s (pid %d), log %s", spec.name, proc.pid, log_path)
        for svc in running:
            if not wait_ready(svc.spec.url, svc.spec.ready_timeout_s, svc.process, svc.spec.ready_path):
                raise RuntimeError(f"{svc.spec.name} did not become ready; see {svc.log_path}")
    except BaseException:
        stop_services(running)
        raise
    return running


def stop_services(running: Sequence[RunningService], grace_s: float = 15.0) -> None:
    """SIGTERM every service (they drain in-flight work), then SIGKILL what is left after ``grace_s``."""
    for svc in running:
        if svc.process.poll() is None:
            svc.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for svc in running:
        try:
            svc.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in %.0f s; killing it", svc.spec.name, grace_s)
            svc.process.kill()
            svc.process.wait()
