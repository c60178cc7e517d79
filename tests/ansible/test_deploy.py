"""``ansible/playbooks/deploy.yml`` for real, against a host this test makes itself.

The host is a podman container running systemd as its init (``--systemd=always``), Debian bookworm with
the packages the ``base`` role installs (read from its defaults) plus what a cloud image brings (systemd,
sudo): Ansible reaches it through its podman connection (``containers.podman.podman``), not SSH. It
shares the machine's network (``--network host``), so:

- the services' ports are free loopback ports chosen here (inventory variables), and the test calls them
  directly;
- their registry is an MLflow server this test runs on loopback, standing in for the registry VM, with the
  tiny models of the container test pushed into it (captioner v1 production, v2 candidate);
- the host installs its Python dependencies from a wheelhouse built here once per set of requirements and
  mounted read-only (``snap2caption_pip_args: --no-index --find-links``): a host that reaches no package
  index, which is what this test host is.

One scenario: deploy (the code of HEAD, the captioner pinned to v2) -> every service's systemd unit is
active and answers ``/readyz`` -> a real photo through ``/v1/analyze`` is answered by the versions asked
for -> the ``snap2caption`` command on the host reaches the registry -> the same deploy again reports no
change -> a new commit deployed (a clone with one commit more) replaces the release and restarts the
services -> ``rollback.yml`` brings the first release back, and ``scripts/smoke_test.py`` passes against
it. Times go to ``var/test-artifacts/ansible-deploy.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from tests.ansible.ansible_helpers import ANSIBLE_DIR, ROOT, run_playbook
from tests.containers.test_compose_stack import build_models, photo_jpeg, podman, snap2caption
from tests.helpers import free_port, image_bytes, wait_for

ARTIFACTS = ROOT / "var" / "test-artifacts"
SERVICES = ("gateway", "captioner", "detector", "etl")
# What a cloud image has before Ansible touches it: systemd as init, sudo for `become`.
CLOUD_IMAGE_PACKAGES = ("systemd", "systemd-sysv", "sudo")

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("podman") is None or shutil.which("mmdebstrap") is None,
        reason="podman and mmdebstrap not installed (`make test` installs them: SETUP_CONTAINERS=1)",
    ),
]


# ------------------------------------------------------------------------------------------- the host


def host_image() -> str:
    """A Debian bookworm image with systemd and the base role's packages, made once per recipe."""
    defaults = yaml.safe_load((ANSIBLE_DIR / "roles" / "base" / "defaults" / "main.yml").read_text())
    packages = sorted({*defaults["base_packages"], *CLOUD_IMAGE_PACKAGES})
    recipe = ["mmdebstrap", "--variant=minbase", f"--include={','.join(packages)}", "bookworm"]
    image = f"localhost/snap2caption-testhost:{hashlib.sha256(' '.join(recipe).encode()).hexdigest()[:12]}"
    if podman("image", "exists", image, check=False).returncode == 0:
        return image
    with tempfile.TemporaryDirectory(prefix="snap2caption-testhost-") as tmp:
        made = subprocess.run([*recipe, f"{tmp}/host.tar"], capture_output=True, text=True, timeout=600)
        assert made.returncode == 0, made.stderr[-3000:]
        podman("import", "--change", 'CMD ["/sbin/init"]', f"{tmp}/host.tar", image, timeout_s=300)
    listed = podman(
        "images", "--format", "{{.Repository}}:{{.Tag}}", "localhost/snap2caption-testhost"
    ).stdout
    for old in set(listed.split()) - {image}:  # made for an older recipe
        podman("rmi", old, check=False)
    return image


def wheelhouse(cache: pytest.Cache) -> Path:
    """Wheels of the services' requirements (the release role's extras), built once per requirements."""
    defaults = yaml.safe_load((ANSIBLE_DIR / "roles" / "services" / "meta" / "main.yml").read_text())
    [release] = defaults["dependencies"]
    requirements = subprocess.run(
        [sys.executable, "scripts/requirements.py", "pyproject.toml", *release["vars"]["release_extras"]],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    folder = cache.mkdir(f"ansible-wheelhouse-{hashlib.sha256(requirements.encode()).hexdigest()[:12]}")
    if not (folder / "complete").exists():
        (folder / "requirements.txt").write_text(requirements)
        built = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(folder),
             "-r", str(folder / "requirements.txt")],
            capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        assert built.returncode == 0, built.stderr[-3000:]
        (folder / "complete").touch()
        for old in folder.parent.glob("ansible-wheelhouse-*"):  # for older requirements
            if old != folder:
                shutil.rmtree(old)
    return folder


@pytest.fixture
def test_host(pytestconfig: pytest.Config) -> Iterator[str]:
    """A running systemd container on the host network, its name; removed whatever happens."""
    name = f"s2c-host-{uuid.uuid4().hex[:8]}"
    image = host_image()
    wheels = wheelhouse(pytestconfig.cache)
    podman(
        "run", "--detach", "--name", name, "--systemd=always", "--network=host",
        "--volume", f"{wheels}:/srv/wheels:ro", image,
    )  # fmt: skip
    try:
        wait_for(lambda: _system_state(name) in ("running", "degraded"), 60, "systemd in the test host", 0.5)
        yield name
    finally:
        podman("rm", "--force", "--time", "5", name, check=False)


def _system_state(name: str) -> str | None:
    result = podman("exec", name, "systemctl", "is-system-running", check=False)
    return result.stdout.strip() or None


# ------------------------------------------------------------------------------------------- the registry


@pytest.fixture
def registry_server(tmp_path: Path) -> Iterator[str]:
    """An MLflow tracking server on a loopback port (its store SQLite, artifacts served by itself)."""
    port = free_port()
    log = (tmp_path / "mlflow-server.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--serve-artifacts",
         "--artifacts-destination", str(tmp_path / "server-artifacts"), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        # A ceiling, not a bound: MLflow creating its tables and starting took more than 120 s
        # at load average 15 (the suite and other jobs on the same 2 cores).
        wait_for(lambda: _status(f"{url}/health") == 200 or process.poll() is not None, 300, "MLflow", 0.5)
        assert process.poll() is None, (tmp_path / "mlflow-server.log").read_text()[-3000:]
        yield url
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def _status(url: str) -> int | None:
    try:
        return httpx.get(url, timeout=5).status_code
    except httpx.TransportError:
        return None


# ------------------------------------------------------------------------------------------- the test


@pytest.mark.timeout(1800)  # a cold first run makes the host image and the wheelhouse (minutes)
def test_deploy_playbook_on_a_real_host(
    test_host: str, registry_server: str, tmp_path: Path, mlflow_template_db: Path
) -> None:
    timings: dict[str, float] = {}
    started = time.monotonic()
    models = build_models(tmp_path, mlflow_template_db)
    snap2caption("registry", "--tracking-uri", models.uri, "push", "--to", registry_server)
    snap2caption(
        "registry", "--tracking-uri", models.uri, "push", "captioner", "--alias", "candidate",
        "--no-promote", "--to", registry_server,
    )  # fmt: skip
    timings["models_s"] = round(time.monotonic() - started, 1)

    ports = {service: free_port() for service in SERVICES}
    inventory = tmp_path / "hosts.yml"
    inventory.write_text(
        yaml.safe_dump(
            {
                "all": {
                    "hosts": {test_host: {"ansible_connection": "containers.podman.podman"}},
                    "children": {"api": {"hosts": {test_host: None}}, "data": {"hosts": {test_host: None}}},
                    "vars": {
                        "snap2caption_version": "HEAD",
                        "snap2caption_archive_dir": str(tmp_path / "archives"),
                        "snap2caption_pip_args": "--no-index --find-links /srv/wheels",
                        "snap2caption_bind_host": "127.0.0.1",
                        "snap2caption_ports": ports,
                        "snap2caption_mlflow_uri": registry_server,
                        # v2 is the candidate: a pinned version is served whatever the aliases say
                        "snap2caption_models": {
                            "captioner": "2",
                            "detector": "production",
                            "tagger": "production",
                        },
                        "snap2caption_gateway_profile": "local",
                        "snap2caption_ready_timeout_s": 240,
                    },
                }
            }
        )
    )

    try:
        t = time.monotonic()
        first = run_playbook("deploy.yml", inventory)
        timings["first_deploy_s"] = round(time.monotonic() - t, 1)
        assert first.returncode == 0, first.failures()
        assert first.stats[test_host]["changed"] > 0 and first.stats[test_host]["failures"] == 0

        # every service a systemd unit of its own, running as the service user, answering on its port
        for service in SERVICES:
            unit = f"snap2caption-{service}"
            assert (
                podman("exec", test_host, "systemctl", "is-active", unit, check=False).stdout.strip()
                == "active"
            )
            assert podman("exec", test_host, "systemctl", "is-enabled", unit).stdout.strip() == "enabled"
            user = podman("exec", test_host, "systemctl", "show", "--property=User", unit).stdout.strip()
            assert user == "User=snap2caption"
            assert _status(f"http://127.0.0.1:{ports[service]}/readyz") == 200, service

        gateway = httpx.Client(base_url=f"http://127.0.0.1:{ports['gateway']}", timeout=30)
        photo = gateway.post("/v1/analyze", files={"file": ("chelsea.jpg", photo_jpeg(), "image/jpeg")})
        assert photo.status_code == 200, photo.text
        body = photo.json()
        assert body["errors"] == [] and body["image"] == {"width": 451, "height": 300, "format": "jpeg"}
        assert body["caption"]["text"] and body["alt_text"]["text"] and body["tags"] and body["objects"]
        versions = {feature: (m["name"], m["version"]) for feature, m in body["models"].items()}
        assert versions == {"caption": ("captioner", 2), "tags": ("tagger", 1), "objects": ("detector", 1)}
        red = gateway.post(
            "/v1/analyze?features=caption", content=image_bytes("red"), headers={"content-type": "image/png"}
        )
        assert red.status_code == 200 and red.json()["caption"]["text"] == models.red_caption[2], red.text
        gateway.close()

        # the operator's command on the host: this release, these settings, the same registry
        listed = podman("exec", test_host, "snap2caption", "registry", "list", "captioner").stdout
        assert "v2" in listed and "candidate" in listed and "production" in listed, listed

        t = time.monotonic()
        second = run_playbook("deploy.yml", inventory)
        timings["second_deploy_s"] = round(time.monotonic() - t, 1)
        assert second.returncode == 0, second.failures()
        assert second.stats[test_host]["changed"] == 0, second.changed_tasks()

        # a new release replaces it (services restarted on the new code), then rollback.yml brings it back
        release_a = _on_host(test_host, "readlink", "/opt/snap2caption/current")
        version_a = _on_host(test_host, "snap2caption", "--version")
        repo_b = _new_commit(tmp_path / "repo")
        pid_a = _on_host(test_host, "systemctl", "show", "--property=MainPID", "snap2caption-gateway")
        t = time.monotonic()
        third = run_playbook("deploy.yml", inventory, "-e", f"snap2caption_repo={repo_b}")
        timings["new_release_s"] = round(time.monotonic() - t, 1)
        assert third.returncode == 0, third.failures()
        assert _on_host(test_host, "snap2caption", "--version") == f"{version_a}+rollback-test"
        assert _on_host(test_host, "readlink", "/opt/snap2caption/previous") == release_a
        assert _on_host(test_host, "systemctl", "show", "--property=MainPID", "snap2caption-gateway") != pid_a
        t = time.monotonic()
        back = run_playbook(
            "rollback.yml", inventory, "-e", "rollback_code=true", "-e", f"snap2caption_repo={repo_b}"
        )
        timings["rollback_s"] = round(time.monotonic() - t, 1)
        assert back.returncode == 0, back.failures()
        assert _on_host(test_host, "readlink", "/opt/snap2caption/current") == release_a
        assert _on_host(test_host, "snap2caption", "--version") == version_a
        smoke = subprocess.run(
            [sys.executable, "scripts/smoke_test.py", f"http://127.0.0.1:{ports['gateway']}"],
            cwd=ROOT, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert smoke.returncode == 0 and smoke.stdout.startswith("ok: "), smoke.stdout + smoke.stderr
    except BaseException:
        _save_logs(test_host)
        raise
    finally:
        timings["test_s"] = round(time.monotonic() - started, 1)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        (ARTIFACTS / "ansible-deploy.json").write_text(json.dumps(timings, indent=2) + "\n")


def _on_host(host: str, *command: str) -> str:
    return podman("exec", host, *command).stdout.strip()


def _new_commit(repo: Path) -> Path:
    """A clone of this repository with one commit more (a version suffix), to release and roll back."""
    subprocess.run(["git", "clone", "--quiet", "--shared", str(ROOT), str(repo)], check=True)
    init = repo / "snap2caption" / "__init__.py"
    init.write_text(re.sub(r'__version__ = "([^"]+)"', r'__version__ = "\1+rollback-test"', init.read_text()))
    subprocess.run(
        ["git", "-C", str(repo), "-c", "user.name=test", "-c", "user.email=test@example.org",
         "commit", "--quiet", "--all", "--message", "a release to roll back"],
        check=True,
    )  # fmt: skip
    return repo


def _save_logs(host: str) -> None:
    folder = ARTIFACTS / "ansible-deploy"
    folder.mkdir(parents=True, exist_ok=True)
    for service in SERVICES:
        journal = podman(
            "exec", host, "journalctl", "--no-pager", "-u", f"snap2caption-{service}", check=False
        )
        (folder / f"{service}.log").write_text(journal.stdout + journal.stderr)
