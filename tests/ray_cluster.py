"""A real two-node Ray cluster on loopback for tests: a head and a second node, each its own ``ray start``.

Both nodes are ``ray start --block`` processes, each in a session of its own, so that tearing down kills
exactly their process groups (raylet, GCS, workers...) and never another test's Ray (``ray stop`` would stop
every Ray on the machine). They share a temp folder of their own under ``/tmp`` (short: Ray's socket paths
must fit in 107 bytes), token authentication with a fresh token (the second node joins only with it), one
CPU each, no dashboard, no usage stats, and free ports for everything Ray would otherwise put on a fixed
one (the GCS, the dashboard agents, the metrics exporter).

Use it as a fixture (``from tests.ray_cluster import ray_cluster``) or as a context manager
(:func:`two_node_cluster`); ``RayCluster.env`` is the environment a driver (``ray.init(address=...)`` or a
``snap2caption ... --address`` process) needs to join.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.helpers import free_port, wait_for

RAY = str(Path(sys.executable).with_name("ray"))
JOIN_TIMEOUT_S = 120.0  # two raylets starting on 2 loaded cores: measured ~15 s; generous on purpose


@dataclass
class RayCluster:
    """A running two-node cluster.

    Attributes:
        address: The head's GCS address, ``127.0.0.1:<port>``.
        env: Environment for a driver joining it (token auth, the token, no usage stats).
        temp_dir: Ray's temp folder of both nodes (sessions, logs).
        processes: The two ``ray start --block`` processes, head first.
    """

    address: str
    env: dict[str, str]
    temp_dir: Path
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def logs(self) -> str:
        """The tail of the nodes' ``ray start`` output (for failure messages)."""
        return "\n".join(
            (self.temp_dir / f"node{i}.log").read_text(errors="replace")[-3000:]
            for i in range(len(self.processes))
        )


def _start_node(cluster: RayCluster, index: int, args: list[str]) -> None:
    ports = {
        "--dashboard-agent-listen-port": free_port(),
        "--dashboard-agent-grpc-port": free_port(),
        "--metrics-export-port": free_port(),
        "--runtime-env-agent-port": free_port(),
    }
    command = [
        RAY, "start", "--block", "--num-cpus", "1", "--node-ip-address", "127.0.0.1",
        "--temp-dir", str(cluster.temp_dir), "--disable-usage-stats",
        *[f"{k}={v}" for k, v in ports.items()], *args,
    ]  # fmt: skip
    log = (cluster.temp_dir / f"node{index}.log").open("wb")
    cluster.processes.append(
        subprocess.Popen(
            command, env=cluster.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    )


def _nodes_alive(cluster: RayCluster) -> int:
    """Alive nodes the head's GCS knows, asked from a separate Python (no Ray in the test process)."""
    probe = (
        f"import ray; ray.init(address={cluster.address!r}, logging_level='ERROR'); "
        "print(sum(n['Alive'] for n in ray.nodes()))"
    )
    dead = [p.args for p in cluster.processes if p.poll() is not None]
    if dead:
        raise RuntimeError(f"a Ray node exited: {dead}\n{cluster.logs()}")
    try:
        done = subprocess.run(
            [sys.executable, "-c", probe], env=cluster.env, capture_output=True, text=True, timeout=60
        )
    except subprocess.TimeoutExpired:
        return 0
    return int(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 and done.stdout.strip() else 0


def _stop(cluster: RayCluster) -> None:
    """SIGTERM each node's process group, SIGKILL what is left after 20 s; then check nothing is left."""
    for process in reversed(cluster.processes):  # the second node first, then the head
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
    for process in cluster.processes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=20)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # the group: raylet, GCS, workers it started
        process.wait(timeout=20)
    groups = {p.pid for p in cluster.processes}
    left = wait_for(lambda: not _living_members(groups) or None, 30, "the Ray processes to exit", 0.5)
    assert left, f"Ray processes left: {_living_members(groups)}"


def _living_members(groups: set[int]) -> list[int]:
    """Processes of the given process groups that still run (zombies, awaiting their reaper, do not)."""
    living = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            # pid (comm) state ppid pgrp ...; comm may hold spaces, so split after its closing parenthesis
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) in groups and fields[0] != "Z":
                living.append(int(stat.parent.name))
    return living


@contextlib.contextmanager
def two_node_cluster() -> Iterator[RayCluster]:
    """Start a head and a second node on loopback; stop both (and everything they started) on exit."""
    temp_dir = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    port = free_port()
    env = os.environ | {
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    cluster = RayCluster(f"127.0.0.1:{port}", env, temp_dir)
    try:
        _start_node(cluster, 0, ["--head", "--port", str(port), "--include-dashboard=false"])
        wait_for(lambda: _nodes_alive(cluster) >= 1, JOIN_TIMEOUT_S, "the Ray head", interval_s=1.0)
        _start_node(cluster, 1, ["--address", cluster.address])
        try:
            wait_for(
                lambda: _nodes_alive(cluster) >= 2, JOIN_TIMEOUT_S, "the second Ray node", interval_s=1.0
            )
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n{cluster.logs()}") from exc
        yield cluster
    finally:
        _stop(cluster)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[RayCluster]:
    """A two-node loopback Ray cluster for the tests of one module."""
    with two_node_cluster() as cluster:
        yield cluster
