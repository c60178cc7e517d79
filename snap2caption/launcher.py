"""The processes of ``snap2caption up`` and ``bootstrap``: build steps run to completion, services until
stopped.

This is what ``snap2caption up`` (and so ``make up``) runs: the embedded single-machine deployment.
Each service is its own ``snap2caption serve <name>`` process, exactly as in a container; each build step
(``dvc repro``, a training) is a child process writing to its own log file.

Every child gets :func:`child_env`: the running interpreter's ``bin`` folder first on ``PATH``, so that
``snap2caption`` and ``dvc`` resolve to this installation whether or not a virtual environment is
activated (DVC runs its stage commands through ``/bin/sh``, which would otherwise not find them).

Failures raise :class:`LaunchError`, a one-line message naming the step and its log; click prints it
without a traceback and exits with status 1.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import click
from pydantic import ValidationError
from pydantic_settings import BaseSettings

log = logging.getLogger(__name__)

S = TypeVar("S", bound=BaseSettings)

_LAST_LINE_CHARS = 200  # of a log's last line quoted in an error; the log has the rest


class LaunchError(click.ClickException):
    """A step of ``up`` or ``bootstrap`` failed: one line naming the step, what happened and its log."""

    def __init__(self, step: str, what: str, log_path: Path | None = None) -> None:
        self.step = step
        self.log_path = log_path
        super().__init__(f"{step}: {what}" + (f"; log: {log_path}" if log_path is not None else ""))


class PortInUseError(LaunchError):
    """A port a service needs is taken (by another process, or by two services at once)."""


def load_settings(cls: type[S], **overrides: Any) -> S:
    """``cls(**overrides)`` (``None`` values left out), a bad environment variable as one line.

    Raises:
        LaunchError: A setting is invalid (``SNAP2CAPTION_BASE_PORT: Input should be a valid integer``).
    """
    try:
        return cls(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        prefix = str(cls.model_config.get("env_prefix", ""))
        problems = "; ".join(f"{prefix}{str(e['loc'][0]).upper()}: {e['msg']}" for e in exc.errors())
        raise LaunchError("settings", problems) from None


def child_env(extra: Mapping[str, str] | Sequence[tuple[str, str]] = ()) -> dict[str, str]:
    """The environment of every process ``up`` and ``bootstrap`` start.

    This process's environment, with the running interpreter's ``bin`` folder (where pip put the
    ``snap2caption`` and ``dvc`` scripts) first on ``PATH``, unbuffered Python output (logs show up as they
    happen), and ``extra`` on top.
    """
    bin_dir = str(Path(sys.executable).parent)  # not resolved: a venv's python is a link out of it
    rest = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p != bin_dir]
    return {
        **os.environ,
        "PATH": os.pathsep.join([bin_dir, *rest]),
        "PYTHONUNBUFFERED": "1",
        **dict(extra),
    }


def last_line(path: Path) -> str:
    """The last non-empty line of a log (progress bars' carriage returns count as line ends)."""
    lines = _tail_lines(path, 4096)
    return lines[-1].strip() if lines else ""


def log_summary(path: Path) -> str:
    """What a failed process's log says went wrong: the exception line of the last Python traceback in its
    tail (``ValidationError: 1 validation error for Settings``), else its last line."""
    lines = _tail_lines(path, 16384)
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")]
    if starts:
        # The frames are indented; the first line after them that is not names the exception.
        exception = next((line for line in lines[starts[-1] + 1 :] if not line[0].isspace()), None)
        if exception is not None:
            return exception.strip()
    return lines[-1].strip() if lines else ""


def _tail_lines(path: Path, size: int) -> list[str]:
    """The non-empty lines of the last ``size`` bytes of a file (none when it cannot be read)."""
    try:
        with path.open("rb") as f:
            f.seek(max(0, path.stat().st_size - size))
            text = f.read().decode(errors="replace")
    except OSError:
        return []
    return [line.rstrip() for line in text.replace("\r", "\n").splitlines() if line.strip()]


def _quote_log(path: Path) -> str:
    line = log_summary(path)
    if len(line) > _LAST_LINE_CHARS:
        line = line[: _LAST_LINE_CHARS - 3] + "..."
    return f": {line}" if line else ""


# ------------------------------------------------------------------------------------------ build steps


Command = tuple[str, ...] | Callable[[], tuple[str, ...]]
"""A command line, or a function that returns it when the command starts."""


def command_argv(command: Command) -> tuple[str, ...]:
    """The command line of ``command`` now (a function's is decided when it is called)."""
    return command() if callable(command) else command


@dataclass(frozen=True)
class Step:
    """One build command run to completion (``dvc repro etl``, a training), its output in ``log_path``.

    ``command`` may be a function that returns it, called when the step starts: a step that follows
    another in a lane (:func:`run_lanes`) can size its work to the time left then.
    """

    name: str
    command: Command
    log_path: Path


def run_steps(steps: Sequence[Step], stage: str, *, cwd: Path | None = None) -> None:
    """Run ``steps`` at the same time, each to its log (:func:`run_lanes` with one step per lane)."""
    run_lanes([[step] for step in steps], stage, cwd=cwd)


def run_lanes(lanes: Sequence[Sequence[Step]], stage: str, *, cwd: Path | None = None) -> dict[str, float]:
    """Run the lanes at the same time, each lane's steps one after another, each step to its log, showing
    the last line of each running step's log as they go.

    On a terminal the status line is redrawn every second; in a log file or CI it is printed every 30 s.
    A step that fails stops every other one.

    Args:
        lanes: Sequences of steps; a step starts when the one before it in its lane has succeeded.
        stage: The name of this stage of ``up`` (``data``, ``models``) for error messages.
        cwd: Working directory of the commands.

    Returns:
        Each step's wall time in seconds.

    Raises:
        LaunchError: A step exited non-zero (the first one seen, with its log's last line).
    """
    env = child_env()
    # Each running step: its process, when it started, and the rest of its lane.
    running: dict[str, tuple[Step, subprocess.Popen[bytes], float, list[Step]]] = {}
    seconds: dict[str, float] = {}
    failed: tuple[Step, int] | None = None

    def start(lane: list[Step]) -> None:
        step, rest = lane[0], lane[1:]
        step.log_path.parent.mkdir(parents=True, exist_ok=True)
        with step.log_path.open("wb") as out:
            argv = command_argv(step.command)
            process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, env=env)
        running[step.name] = (step, process, time.monotonic(), rest)

    try:
        for lane in lanes:
            if lane:
                start(list(lane))
        started = time.monotonic()
        width = shutil.get_terminal_size((100, 20)).columns
        tty = sys.stdout.isatty()
        last_report = 0.0
        while running and failed is None:
            time.sleep(1.0)
            for name, (step, process, began, rest) in list(running.items()):
                code = process.poll()
                if code is None:
                    continue
                del running[name]
                seconds[name] = time.monotonic() - began
                if code != 0:
                    failed = (step, code)
                    break
                if rest:
                    start(rest)
            elapsed = time.monotonic() - started
            status = " | ".join(
                [f"{name}: done" for name in seconds]
                + [f"{name}: {last_line(step.log_path)[:60]}" for name, (step, *_) in running.items()]
            )
            if tty:
                click.echo("\r" + f"   {elapsed:4.0f}s {status}"[: width - 1].ljust(width - 1), nl=False)
            elif elapsed - last_report >= 30:
                last_report = elapsed
                click.echo(f"   {elapsed:4.0f}s {status}")
        if tty:
            click.echo("\r" + " " * (width - 1) + "\r", nl=False)
    finally:
        for _, process, _, _ in running.values():
            if process.poll() is None:  # Ctrl-C or a failed step: leave no build behind
                process.terminate()
                process.wait(30)
    if failed is not None:
        step, code = failed
        raise LaunchError(
            stage, f"{step.name} failed (exit {code}){_quote_log(step.log_path)}", step.log_path
        )
    return seconds


# ------------------------------------------------------------------------------------------- services


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


# ---------------------------------------------------------------------------------------------- ports


def port_holder(port: int) -> str:
    """Who listens on TCP ``port``: ``pid 123 (python -m http.server 8000)``, or what can be said."""
    import psutil

    try:
        connections = psutil.net_connections(kind="tcp")
    except psutil.AccessDenied:  # some systems hide other users' sockets entirely
        return "a process this user cannot see"
    for conn in connections:
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
            if conn.pid is None:
                return "a process of another user"
            try:
                command = " ".join(psutil.Process(conn.pid).cmdline())
            except psutil.Error:
                command = "?"
            if len(command) > 120:
                command = command[:117] + "..."
            return f"pid {conn.pid} ({command})"
    return "another socket (not listening; may be closing)"


def check_ports(specs: Sequence[ServiceSpec], hint: str = "") -> None:
    """Bind each service's host and port once, as its server will, and let it go again.

    Args:
        specs: The services.
        hint: Appended to the error (how to choose other ports).

    Raises:
        PortInUseError: Two services share a port, or a port is taken (naming the process holding it).
    """
    seen: dict[int, str] = {}
    for spec in specs:
        if spec.port in seen:
            raise PortInUseError(
                "ports", f"{seen[spec.port]} and {spec.name} are both set to port {spec.port}{hint}"
            )
        seen[spec.port] = spec.name
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            # As uvicorn and Prometheus bind: a port left in TIME_WAIT by an earlier run is free.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((spec.host, spec.port))
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise PortInUseError(
                        "ports", f"cannot bind {spec.host}:{spec.port} ({spec.name}): {exc}"
                    ) from None
                raise PortInUseError(
                    "ports",
                    f"port {spec.port} ({spec.name}) is already in use by {port_holder(spec.port)}{hint}",
                ) from None


# --------------------------------------------------------------------------------------- running them


@dataclass
class RunningService:
    spec: ServiceSpec
    process: subprocess.Popen[bytes]
    log_path: Path = field(default_factory=Path)

    def exit_message(self, when: str = "") -> str:
        """``captioner exited with code 1 <when>: <its log's last line>`` for a service that has stopped."""
        code = self.process.returncode
        return f"{self.spec.name} exited with code {code}{when}{_quote_log(self.log_path)}"


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
    """Start every service, then wait for each to be ready; on any failure stop them all and raise.

    Raises:
        LaunchError: A service exited during start-up or was not ready in its ``ready_timeout_s``.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    running: list[RunningService] = []
    try:
        for spec in specs:
            log_path = log_dir / f"{spec.name}.log"
            with log_path.open("ab") as out:
                # A new session (so a process group of its own): Ctrl-C in the terminal reaches only the
                # launcher, which then drains the services in order; and stopping the group stops what a
                # service started itself (MLflow's server workers, the ETL's process pool).
                proc = subprocess.Popen(
                    spec.command(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                    env=child_env(spec.env),
                )  # fmt: skip
            running.append(RunningService(spec, proc, log_path))
            log.debug("started %s (pid %d), log %s", spec.name, proc.pid, log_path)
        for svc in running:
            if not wait_ready(svc.spec.url, svc.spec.ready_timeout_s, svc.process, svc.spec.ready_path):
                if svc.process.poll() is not None:
                    raise LaunchError("services", svc.exit_message(" during start-up"), svc.log_path)
                raise LaunchError(
                    "services",
                    f"{svc.spec.name} was not ready at {svc.spec.url}{svc.spec.ready_path} "
                    f"within {svc.spec.ready_timeout_s:.0f} s",
                    svc.log_path,
                )
    except BaseException:
        stop_services(running)
        raise
    return running


def _signal_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):  # the whole group is gone already
        os.killpg(process.pid, sig)  # start_new_session: the group id is the service's pid


def _group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` still runs (zombies do not: they have exited, and where PID 1
    does not reap orphans they would stay in the process table for good)."""
    import psutil

    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, psutil.Error):
            continue
    return False


def _wait_group(pgid: int, deadline: float) -> bool:
    """Wait until group ``pgid`` has no running process or ``deadline`` passes; whether it emptied."""
    while _group_alive(pgid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def stop_services(running: Sequence[RunningService], grace_s: float = 15.0) -> None:
    """SIGTERM every service's process group (they drain in-flight work), SIGKILL what is left after
    ``grace_s``. On return no process of any group runs, a service's own children included."""
    for svc in running:
        if svc.process.poll() is None:
            _signal_group(svc.process, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for svc in running:
        try:
            svc.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in %.0f s; killing it", svc.spec.name, grace_s)
        if not _wait_group(svc.process.pid, deadline):
            _signal_group(svc.process, signal.SIGKILL)
            _wait_group(svc.process.pid, time.monotonic() + 10.0)  # SIGKILL cannot be ignored: ms, not s
        svc.process.wait()
