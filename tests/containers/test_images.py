"""What the images and the compose file promise, checked without a container engine (milliseconds each).

- The serving image has no torch and no pyarrow: its requirements hold neither, and every serving code
  path imports with torch (and the rest of the training stack) made unimportable; the gateway and the
  model services also without pyarrow, which only the etl image (serving + pyarrow) carries.
- docker-compose.yml: every service has a restart policy and resource limits, lives on the named network,
  keeps its state in declared volumes, publishes only on loopback, waits for what it needs, and uses only
  keys of the Compose specification (nothing podman-only), so Docker Compose runs it too.
- Dockerfile: every final image runs as a non-root user, and every long-running one has a HEALTHCHECK.
- Prometheus' compose config differs from the loopback one only in its targets.

``test_compose_stack.py`` runs all of it for real.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
TRAINING_STACK = ("torch", "torchvision", "transformers", "peft", "timm", "ultralytics")

# The service keys of the Compose specification (compose-spec/schema/compose-spec.json) this file may use.
COMPOSE_SPEC_SERVICE_KEYS = {
    "build", "command", "depends_on", "deploy", "entrypoint", "environment", "healthcheck", "image",
    "network_mode", "networks", "ports", "read_only", "restart", "tmpfs", "volumes", "user", "working_dir",
}  # fmt: skip


def dockerfile_stages() -> dict[str, str]:
    """Stage name -> its instructions (the text from its FROM to the next)."""
    text = (ROOT / "Dockerfile").read_text()
    parts = re.split(r"^FROM\s+\S+\s+AS\s+(\S+)\s*$", text, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def requirements(*args: str) -> list[str]:
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "requirements.py"), str(ROOT / "pyproject.toml"), *args],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [re.split(r"[\s\[<>=!~;]", line, maxsplit=1)[0].lower() for line in out.splitlines()]


def test_the_serving_image_installs_no_torch() -> None:
    serving = requirements("--exclude", "pyarrow", "serve", "postgres")  # the Dockerfile's `deps` stage
    assert not set(serving) & set(TRAINING_STACK), serving
    assert {"onnxruntime", "tokenizers", "safetensors", "mlflow-skinny", "fastapi"} <= set(serving)
    assert "pyarrow" not in serving and "pyarrow" in requirements("serve")
    assert requirements("--only", "pyarrow") == ["pyarrow"]  # the `deps-etl` stage: the etl image's layer
    training = requirements("train", "data")  # the training image: serve's runtime (self-reference) + torch
    assert {"torch", "torchvision", "ultralytics", "onnxruntime", "mlflow", "dvc"} <= set(training)
    assert requirements("--only", "torch,torchvision", "train") == ["torch", "torchvision"]


def test_serving_code_paths_import_without_torch() -> None:
    code = textwrap.dedent(
        f"""
        import importlib, sys

        class NoTrainingStack:
            def find_spec(self, name, path=None, target=None):
                if name.partition(".")[0] in {TRAINING_STACK!r}:
                    raise ImportError(f"{{name}} is not in the serving image")

        sys.meta_path.insert(0, NoTrainingStack())
        for module in [
            "snap2caption.cli", "snap2caption.cli.serve", "snap2caption.cli.registry",
            "services.gateway.app", "services.captioner.app", "services.detector.app", "services.etl.app",
            "services.captioner.engine", "services.detector.engine", "snap2caption.data.etl",
            "snap2caption.models.caption", "snap2caption.models.caption.ort",
            "snap2caption.models.detector", "snap2caption.models.tagger",
        ]:
            importlib.import_module(module)
        for app in ("gateway", "captioner", "detector", "etl"):
            importlib.import_module(f"services.{{app}}.app").create_app()
        loaded = sorted({{m.partition(".")[0] for m in sys.modules}} & set({TRAINING_STACK!r}))
        assert not loaded, loaded
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]


def test_gateway_and_model_services_run_without_pyarrow() -> None:
    # The serving image has no pyarrow (only the etl image does): the three services it runs must neither
    # import it nor need it to build their apps.
    code = textwrap.dedent(
        """
        import importlib, sys

        class NoPyarrow:
            def find_spec(self, name, path=None, target=None):
                if name.partition(".")[0] == "pyarrow":
                    raise ImportError(f"{name} is not in the serving image")

        sys.meta_path.insert(0, NoPyarrow())
        for module in ["snap2caption.cli", "snap2caption.cli.serve", "snap2caption.cli.registry"]:
            importlib.import_module(module)
        for app in ("gateway", "captioner", "detector"):
            importlib.import_module(f"services.{app}.app").create_app()
        assert "pyarrow" not in sys.modules
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_compose_service_is_complete(name: str) -> None:
    service = SERVICES[name]
    assert set(service) <= COMPOSE_SPEC_SERVICE_KEYS, set(service) - COMPOSE_SPEC_SERVICE_KEYS
    assert service["restart"] == ("no" if name == "bootstrap" else "unless-stopped")
    limits = service["deploy"]["resources"]["limits"]
    assert float(limits["cpus"]) > 0 and re.fullmatch(r"\d+[mg]", limits["memory"])
    assert service.get("networks") == ["snap2caption"] or service.get("network_mode") == "service:prometheus"
    for volume in service.get("volumes", []):
        source = volume.split(":", 1)[0]
        assert source.startswith("./") or source in COMPOSE["volumes"], volume
    for port in service.get("ports", []):
        assert port.startswith("127.0.0.1:"), port  # loopback only
    depends_on = service.get("depends_on", [])
    if isinstance(depends_on, list):  # the short form: started, not healthy
        depends_on = {dependency: {"condition": "service_started"} for dependency in depends_on}
    for dependency, condition in depends_on.items():
        assert dependency in SERVICES
        assert condition["condition"] in {"service_healthy", "service_started"}
    if "build" in service:
        assert service["build"]["target"] in dockerfile_stages()
        assert service["image"].startswith(f"snap2caption-{service['build']['target']}:")


def test_compose_keeps_every_stateful_part_in_a_volume() -> None:
    def mounts(name: str) -> dict[str, str]:
        return {v.split(":")[1]: v.split(":")[0] for v in SERVICES[name]["volumes"]}

    assert mounts("postgres")["/var/lib/postgresql/data"] == "postgres-data"
    assert mounts("mlflow")["/var/lib/snap2caption"] == "mlflow-artifacts"
    assert mounts("prometheus")["/prometheus"] == "prometheus-data"
    assert mounts("grafana")["/var/lib/grafana"] == "grafana-data"
    for name in ("gateway", "captioner", "detector", "etl", "bootstrap"):
        assert mounts(name)["/var/lib/snap2caption"] in COMPOSE["volumes"]  # SNAP2CAPTION_HOME
    assert len({mounts(n)["/var/lib/snap2caption"] for n in ("gateway", "captioner", "detector", "etl")}) == 4


def test_serving_services_probe_their_own_port() -> None:
    for name in ("gateway", "captioner", "detector", "etl"):
        service = SERVICES[name]
        port = service["command"][service["command"].index("--port") + 1]
        assert service["environment"]["SNAP2CAPTION_HEALTHCHECK_URL"] == f"http://127.0.0.1:{port}/healthz"
        assert service["read_only"] is True and service["tmpfs"] == ["/tmp"]
    assert SERVICES["captioner"]["environment"]["SNAP2CAPTION_CAPTIONER_RUNTIME"] == "onnx"


@pytest.mark.parametrize("target", ["serving", "etl", "training", "mlflow", "postgres", "prometheus"])
def test_final_images_run_as_non_root(target: str) -> None:
    stage = dockerfile_stages()[target]
    users = re.findall(r"^USER\s+(\S+)", stage, flags=re.MULTILINE)
    assert users and users[-1] not in ("root", "0"), users
    if target != "training":  # a job, not a service
        assert re.search(r"^HEALTHCHECK\s", stage, flags=re.MULTILINE)
    # No compilers or package caches in what ships: the final stages install nothing from source.
    assert not re.search(r"\b(gcc|g\+\+|build-essential|python3-dev)\b", stage)


def test_compose_prometheus_differs_from_the_loopback_one_only_in_targets() -> None:
    loopback = yaml.safe_load((ROOT / "infra" / "prometheus" / "prometheus.yml").read_text())
    compose = yaml.safe_load((ROOT / "infra" / "prometheus" / "prometheus-compose.yml").read_text())
    ports = {job["job_name"]: job["static_configs"][0]["targets"] for job in compose["scrape_configs"]}
    for job in loopback["scrape_configs"]:
        [target] = job["static_configs"][0]["targets"]
        port = target.rsplit(":", 1)[1]
        host = "127.0.0.1" if job["job_name"] == "prometheus" else job["job_name"]  # the container's name
        assert ports[job["job_name"]] == [f"{host}:{port}"]
        job["static_configs"][0]["targets"] = ports[job["job_name"]]
    assert compose == loopback
    assert SERVICES["prometheus"]["command"][0] == "--config.file=/etc/prometheus/prometheus-compose.yml"


def test_the_bootstrap_command_is_valid_shell() -> None:
    shell, flag, script = SERVICES["bootstrap"]["command"]
    assert (shell, flag) == ("sh", "-c")
    subprocess.run(["sh", "-n", "-c", script], check=True)  # parses: quoting and if/fi survive YAML folding
    assert script.endswith("exec snap2caption bootstrap --data data/processed")
