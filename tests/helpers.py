"""Helpers for tests that run real service processes on loopback (any service, not only the ETL).

Fixtures built on these live in ``tests/conftest.py``; import these directly as ``tests.helpers``.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

import httpx
from PIL import Image

T = TypeVar("T")

# Solid colours the tiny caption models of the captioner and gateway tests learn one caption each for.
COLOURS = {
    "red": (220, 30, 30),
    "blue": (30, 30, 220),
    "green": (30, 200, 30),
    "yellow": (230, 230, 30),
    "white": (250, 250, 250),
    "black": (10, 10, 10),
}


def image_bytes(colour: str, size: tuple[int, int] = (96, 72), fmt: str = "PNG") -> bytes:
    """A solid-colour image of ``colour`` (a key of COLOURS), encoded as ``fmt``."""
    buffer = io.BytesIO()
    Image.new("RGB", size, COLOURS[colour]).save(buffer, format=fmt)
    return buffer.getvalue()


_HANDED_OUT: set[int] = set()  # ports free_port() gave this session: never given twice


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now, and that no earlier call returned.

    The port is bound later by whoever asked (a service binds only after its lifespan has loaded its
    model), so two calls must not hand out the same port while neither is bound yet. A process outside
    this session can still take it meanwhile: :meth:`ServiceProcess.start` retries on another port then.
    """
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def wait_for(probe: Callable[[], T | None], timeout_s: float, what: str, interval_s: float = 0.05) -> T:
    """Call ``probe`` until it returns something other than ``None`` (or falsy), then return that.

    Raises:
        TimeoutError: After ``timeout_s``, naming ``what`` was awaited.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


class ServiceProcess:
    """One ``snap2caption serve <name>`` process on a loopback port, its log in a file.

    Args:
        name: Service name, as ``snap2caption serve`` knows it.
        log_path: Where stdout and stderr go.
        env: Extra environment (settings such as ``SNAP2CAPTION_ETL_DB_URL``).
        port: Port to bind; a free one when omitted.
        cwd: Working directory of the process.
        args: Extra command-line arguments after ``--port``.
    """

    ready_path = "/readyz"  # answered with 200 once the process counts as started

    def __init__(
        self,
        name: str,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        port: int | None = None,
        cwd: Path | None = None,
        args: Sequence[str] = (),
    ) -> None:
        self.name = name
        self.port = port or free_port()
        self._own_port = port is None  # chosen here, so another may replace it (see start)
        self.log_path = log_path
        self.cwd = cwd
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.args = [*args]
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, ready_timeout_s: float = 30.0) -> ServiceProcess:
        """Start the process and wait until ``/readyz`` answers 200.

        A service binds its port only once its lifespan is done (seconds, for a model service), so a port
        chosen by :func:`free_port` may be taken by another process meanwhile. When the process exits
        saying so, it starts again on another free port (twice at most); a port given by the caller is
        never replaced.
        """
        retries = 2 if self._own_port else 0
        while True:
            logged = len(self.log())
            try:
                return self._launch(ready_timeout_s)
            except RuntimeError:
                if retries == 0 or "address already in use" not in self.log()[logged:].lower():
                    raise
            retries -= 1
            self.port = free_port()

    def _launch(self, ready_timeout_s: float) -> ServiceProcess:
        command = [
            sys.executable,
            "-m",
            "snap2caption",
            "serve",
            self.name,
            "--port",
            str(self.port),
            *self.args,
        ]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd
            )
        # One client for the whole wait: `httpx.get` builds a client (and an SSL context) per call, ~40 ms
        # of CPU, which at a 50 ms poll interval keeps most of a core busy while the service starts.
        with httpx.Client(base_url=self.url, timeout=2) as probe:
            try:
                what = f"{self.name} {self.ready_path} on {self.url}"
                wait_for(lambda: self._ready(probe), ready_timeout_s, what)
            except TimeoutError:
                self.kill()
                raise RuntimeError(f"{self.name} did not become ready; log:\n{self.log()}") from None
        return self

    def _ready(self, probe: httpx.Client) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.process.returncode}; log:\n{self.log()}")
        try:
            return probe.get(self.ready_path).status_code == 200
        except httpx.TransportError:
            return False

    def client(self, timeout_s: float = 10.0) -> httpx.Client:
        """An HTTP client bound to this service."""
        return httpx.Client(base_url=self.url, timeout=timeout_s)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def stop(self, timeout_s: float = 20.0) -> int:
        """SIGTERM, wait for a graceful exit (SIGKILL after ``timeout_s``); return the exit code."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        """SIGKILL, as a crash would; no cleanup runs in the service."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def log(self) -> str:
        """Everything the process has logged so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with ``n`` torch intra-op threads, then restore the setting.

    Tests use 1: their tensors are tiny, and OpenMP barriers stall when other processes share the cores.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
