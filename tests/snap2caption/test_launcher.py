"""The launcher behind `snap2caption up` and `bootstrap`: real processes, their PATH, ports, logs, errors."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from snap2caption.launcher import (
    LaunchError,
    PortInUseError,
    ServiceSpec,
    Step,
    check_ports,
    child_env,
    run_lanes,
    run_steps,
    start_services,
    stop_services,
)
from tests.helpers import free_port, wait_for

BIN_DIR = str(Path(sys.executable).parent)
SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"  # a plain shell's PATH: no virtual environment on it


def _http_server(name: str, port: int, **kwargs: object) -> ServiceSpec:
    argv = (sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1")
    return ServiceSpec(name, port, argv=argv, ready_path="/", ready_timeout_s=20, **kwargs)  # type: ignore[arg-type]


def _gone(pid: int) -> bool:
    """Whether ``pid`` no longer runs. A zombie counts as gone: it has exited, and on machines whose PID 1
    does not reap orphans (this one's) it stays in the table until reboot."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


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


def test_a_service_that_exits_at_start_up_stops_the_others_and_says_so_in_one_line(tmp_path: Path) -> None:
    good = _http_server("good", free_port())
    code = "import sys; print('loading the model'); sys.exit('no production model for captioner')"
    dead = ServiceSpec("dead", free_port(), argv=(sys.executable, "-c", code), ready_timeout_s=20)
    with pytest.raises(LaunchError) as info:
        start_services([good, dead], tmp_path / "logs")
    message = info.value.format_message()
    assert message == (
        "services: dead exited with code 1 during start-up: no production model for captioner; "
        f"log: {tmp_path / 'logs' / 'dead.log'}"
    )
    assert "\n" not in message
    assert not _port_taken(good.port)  # stopped (and waited for) before the error was raised


def _port_taken(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


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


def test_stopping_a_service_stops_the_processes_it_started(tmp_path: Path) -> None:
    """Servers with workers (MLflow's) or pools (the ETL's) start children: they stop with the service."""
    port = free_port()
    code = (
        "import http.server, subprocess, sys\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        "print('child', child.pid, flush=True)\n"
        "http.server.test(HandlerClass=http.server.SimpleHTTPRequestHandler,"
        f" port={port}, bind='127.0.0.1')\n"
    )
    running = start_services(
        [ServiceSpec("parent", port, argv=(sys.executable, "-c", code), ready_path="/")], tmp_path / "logs"
    )
    parent = psutil.Process(running[0].process.pid)
    children = wait_for(lambda: parent.children(recursive=True), 10, "the child process")
    stop_services(running)
    assert _gone(parent.pid)
    assert all(_gone(child.pid) for child in children)


def test_child_env_puts_this_interpreters_bin_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", f"{SYSTEM_PATH}:{BIN_DIR}")
    path = child_env({"EXTRA": "1"})["PATH"].split(os.pathsep)
    assert path[0] == BIN_DIR and path.count(BIN_DIR) == 1
    assert path[1:] == SYSTEM_PATH.split(":")


def test_a_step_finds_the_snap2caption_command_from_a_shell_without_the_venv(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What `dvc repro` does with a stage: `/bin/sh -c "snap2caption ..."`, from a plain shell's PATH."""
    monkeypatch.setenv("PATH", SYSTEM_PATH)
    probe = subprocess.run(["/bin/sh", "-c", "command -v snap2caption"], capture_output=True, text=True)
    if probe.returncode == 0:
        pytest.fail(
            f"snap2caption is installed outside the venv ({probe.stdout.strip()}): the test proves nothing"
        )
    log = tmp_path / "logs" / "stage.log"
    run_steps(
        [Step("stage", ("/bin/sh", "-c", "command -v snap2caption && snap2caption --version"), log)], "data"
    )
    assert log.read_text().splitlines()[0] == f"{BIN_DIR}/snap2caption"
    assert "snap2caption, version" in log.read_text()


def test_a_failed_step_is_one_line_naming_it_and_its_log(tmp_path: Path) -> None:
    script = "echo 'Running stage synth'; echo 'snap2caption: not found' >&2; exit 127"
    ok = Step("fine", ("/bin/sh", "-c", "echo done"), tmp_path / "fine.log")
    bad = Step("dvc repro etl", ("/bin/sh", "-c", script), tmp_path / "data.log")
    with pytest.raises(LaunchError) as info:
        run_steps([ok, bad], "data")
    assert info.value.format_message() == (
        f"data: dvc repro etl failed (exit 127): snap2caption: not found; log: {tmp_path / 'data.log'}"
    )
    assert (tmp_path / "data.log").read_text() == "Running stage synth\nsnap2caption: not found\n"


def test_lanes_run_side_by_side_and_a_lanes_next_step_starts_when_its_last_one_ends(tmp_path: Path) -> None:
    marker = tmp_path / "first-done"
    started_at: list[float] = []

    def second() -> tuple[str, ...]:  # what a training sized to the time left does: decide at its start
        started_at.append(time.monotonic())
        return ("/bin/sh", "-c", f"cat {marker}")

    first = Step("first", ("/bin/sh", "-c", f"sleep 1.5; echo written > {marker}"), tmp_path / "first.log")
    other = Step("other", ("/bin/sh", "-c", "sleep 1; echo side"), tmp_path / "other.log")
    begin = time.monotonic()
    seconds = run_lanes([[first, Step("second", second, tmp_path / "second.log")], [other]], "models")
    assert (tmp_path / "second.log").read_text() == "written\n"  # it ran after the first had written
    assert started_at and started_at[0] - begin >= 1.5
    assert set(seconds) == {"first", "second", "other"} and seconds["first"] >= 1.5
    assert time.monotonic() - begin < 1.5 + seconds["other"] + seconds["second"] + 1.5  # lanes overlapped


def test_a_failed_step_stops_the_other_lanes_and_skips_the_rest_of_its_own(tmp_path: Path) -> None:
    bad = Step("bad", ("/bin/sh", "-c", "echo broken >&2; exit 3"), tmp_path / "bad.log")
    never = Step("never", ("/bin/sh", "-c", "echo ran"), tmp_path / "never.log")
    slow = Step("slow", ("/bin/sh", "-c", "sleep 60"), tmp_path / "slow.log")
    begin = time.monotonic()
    with pytest.raises(LaunchError, match="bad failed \\(exit 3\\): broken"):
        run_lanes([[bad, never], [slow]], "models")
    assert time.monotonic() - begin < 30 and not (tmp_path / "never.log").exists()


def test_a_port_in_use_names_the_process_holding_it(tmp_path: Path) -> None:
    port = free_port()
    holder = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: _port_taken(port), 20, "the http.server to listen")
        specs = [ServiceSpec("etl", free_port()), ServiceSpec("gateway", port)]
        with pytest.raises(PortInUseError) as info:
            check_ports(specs, " (choose others with SNAP2CAPTION_BASE_PORT)")
    finally:
        holder.terminate()
        holder.wait(10)
    holder_line = f"pid {holder.pid} ({sys.executable} -m http.server {port} --bind 127.0.0.1)"
    assert info.value.format_message() == (
        f"ports: port {port} (gateway) is already in use by {holder_line} "
        "(choose others with SNAP2CAPTION_BASE_PORT)"
    )


def test_a_port_held_by_this_process_and_free_ports() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with pytest.raises(
            PortInUseError, match=rf"port {port} \(captioner\) is already in use by pid {os.getpid()} "
        ):
            check_ports([ServiceSpec("captioner", port)])
    check_ports([ServiceSpec("captioner", port), ServiceSpec("detector", free_port())])  # free again: passes


def test_two_services_on_one_port_are_refused() -> None:
    port = free_port()
    with pytest.raises(PortInUseError, match=f"gateway and mlflow are both set to port {port}"):
        check_ports([ServiceSpec("gateway", port), ServiceSpec("mlflow", port)])
