"""The launcher behind `snap2caption up`: starts real processes, waits for readiness, stops them all."""

from __future__ import annotations

import sys
import urllib.request
from pathlib import Path

import pytest

from snap2caption.launcher import ServiceSpec, start_services, stop_services
from tests.helpers import free_port


def _http_server(name: str, port: int, **kwargs: object) -> ServiceSpec:
    argv = (sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1")
    return ServiceSpec(name, port, argv=argv, ready_path="/", ready_timeout_s=20, **kwargs)  # type: ignore[arg-type]


def test_processes_start_ready_and_stop(tmp_path: Path) -> None:
    specs = [_http_server("one", free_port()), _http_server("two", free_port())]
    running = start_services(specs, tmp_path / "logs")
    try:
        for svc in running:
            with urllib.request.urlopen(svc.spec.url + "/", timeout=5) as response:
                assert response.status == 200
            assert svc.process.poll() is None
    finally:
        stop_services(running)
    assert all(svc.process.returncode is not None for svc in running)
    assert (tmp_path / "logs" / "one.log").is_file()


def test_a_process_that_dies_stops_the_others_and_raises(tmp_path: Path) -> None:
    good = _http_server("good", free_port())
    dead = ServiceSpec(
        "dead", free_port(), argv=(sys.executable, "-c", "raise SystemExit(3)"), ready_timeout_s=20
    )
    with pytest.raises(RuntimeError, match="dead did not become ready"):
        start_services([good, dead], tmp_path / "logs")


def test_environment_reaches_the_process(tmp_path: Path) -> None:
    port = free_port()
    code = (
        "import http.server, os, sys\n"
        "assert os.environ['SNAP2CAPTION_PROBE'] == 'yes'\n"
        "http.server.test(HandlerClass=http.server.SimpleHTTPRequestHandler,"
        f" port={port}, bind='127.0.0.1')\n"
    )
    spec = ServiceSpec(
        "probe", port, argv=(sys.executable, "-c", code), ready_path="/", env=(("SNAP2CAPTION_PROBE", "yes"),)
    )
    running = start_services([spec], tmp_path / "logs")
    stop_services(running)
