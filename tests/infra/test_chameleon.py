"""``infra/chameleon``: the plan that provisions Snap2Caption on Chameleon Cloud, and the inventory it writes.

Chameleon cannot be reached from here, so the python-chi calls (``chi_backend.py``) never run in tests;
what they carry out, the plan, is checked instead: every resource of the design, in an order where each
step only uses what earlier steps made, a teardown that undoes exactly that, and an inventory that Ansible
reads into the groups the playbooks target.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from infra.chameleon.plan import Plan, Rule, build, inventory, load, placeholder_addresses
from tests.ansible.ansible_helpers import tool

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def plan() -> Plan:
    return build(load())


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m infra.chameleon ARGS`` with python-chi made unimportable and no credentials."""
    code = "import sys; sys.modules['chi'] = None; from infra.chameleon.__main__ import main; main()"
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OS_")}
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=ROOT, env={**clean, **(env or {})}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_dry_run_prints_the_whole_plan_without_python_chi_or_credentials() -> None:
    result = run_cli("up", "--dry-run")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "Plan: 16 steps, in order" in out
    for line in [
        "[CHI@TACC] reserve lease snap2caption-gpu-lease (node_type=gpu_mi100, nodes=1, floating_ips=1",
        "[KVM@TACC] reserve lease snap2caption-vm-lease (flavor=m1.medium, instances=3",
        "[KVM@TACC] create network snap2caption-net",
        "[KVM@TACC] create subnet snap2caption-subnet (network=snap2caption-net, cidr=192.168.100.0/24)",
        "[KVM@TACC] create router snap2caption-router (gateway=public, subnet=snap2caption-subnet)",
        "[KVM@TACC] create security_group snap2caption-api-public (ingress=[tcp/22 from 0.0.0.0/0, tcp/8000",
        "[KVM@TACC] create server snap2caption-api (image=CC-Ubuntu24.04, flavor=m1.medium",
        "[KVM@TACC] create server snap2caption-mlflow (",
        "[KVM@TACC] create server snap2caption-data (",
        "[KVM@TACC] associate floating_ip snap2caption-api (network=public)",
        "[CHI@TACC] associate floating_ip snap2caption-gpu-0 (reservation=snap2caption-gpu-lease)",
        "[KVM@TACC] create volume snap2caption-mlflow-data (size_gb=100)",
        "[KVM@TACC] attach volume snap2caption-mlflow-data (server=snap2caption-mlflow, device=/dev/vdb)",
    ]:
        assert line in out, line
    printed = yaml.safe_load(out.split("(placeholders for the addresses):\n", 1)[1].split("\nDry run:")[0])
    assert set(printed["all"]["children"]) == {"api", "registry", "monitoring", "data", "training"}
    assert out.rstrip().endswith("Dry run: nothing was reserved or created.")

    teardown = run_cli("down", "--dry-run")
    assert teardown.returncode == 0, teardown.stderr
    assert "Teardown: 16 steps" in teardown.stdout and "Dry run: nothing was removed." in teardown.stdout


def test_the_plan_holds_the_designs_resources(plan: Plan) -> None:
    creates = [s for s in plan.up if s.action == "create"]
    vms = [s for s in creates if s.kind == "server" and s.site == "KVM@TACC"]
    assert [s.name for s in vms] == ["snap2caption-api", "snap2caption-mlflow", "snap2caption-data"]
    assert {s.params["flavor"] for s in vms} == {"m1.medium"}
    [gpu_lease] = [s for s in plan.up if s.kind == "lease" and s.site == "CHI@TACC"]
    assert gpu_lease.params["node_type"] == "gpu_mi100"
    assert len([s for s in plan.up if s.kind == "floating_ip"]) == 2
    [volume] = [s for s in creates if s.kind == "volume"]
    assert volume.params == {"size_gb": 100}
    assert {s.kind for s in creates} == {"network", "subnet", "router", "security_group", "server", "volume"}


def test_only_the_api_vm_is_public_and_the_registry_only_to_the_gpu_node(plan: Plan) -> None:
    groups = {s.name: s.params["ingress"] for s in plan.up if s.kind == "security_group"}
    servers = {
        s.name: s.params["security_groups"] for s in plan.up if s.kind == "server" and s.site == "KVM@TACC"
    }
    public = {name for name, rules in groups.items() if any(r.source == "0.0.0.0/0" for r in rules)}
    assert public == {"snap2caption-api-public"}
    assert groups["snap2caption-api-public"] == [Rule("tcp", 22, "0.0.0.0/0"), Rule("tcp", 8000, "0.0.0.0/0")]
    assert groups["snap2caption-registry-proxy"] == [Rule("tcp", 5000, "floating-ip:snap2caption-gpu-0")]
    assert [name for name, gs in servers.items() if public & set(gs)] == ["snap2caption-api"]
    assert all("snap2caption-internal" in gs for gs in servers.values())


def test_each_step_uses_only_what_earlier_steps_made(plan: Plan) -> None:
    made: set[str] = set()
    for step in plan.up:
        for key in ("reservation", "network", "subnet", "server"):
            ref = step.params.get(key)
            if ref and ref.startswith("snap2caption-"):
                assert ref in made, f"{step.describe()} uses {ref} before it exists"
        for group in step.params.get("security_groups", []):
            assert group in made, f"{step.describe()} uses {group} before it exists"
        for rule in step.params.get("ingress", []):
            if rule.source.startswith("floating-ip:"):
                server = rule.source.removeprefix("floating-ip:")
                assert ("floating_ip", server) in {(s.kind, s.name) for s in plan.up[: plan.up.index(step)]}
        if step.action in ("reserve", "create"):
            made.add(step.name)


def test_teardown_undoes_every_step_in_reverse(plan: Plan) -> None:
    assert [(s.kind, s.name) for s in plan.down] == [(s.kind, s.name) for s in reversed(plan.up)]
    assert {s.action for s in plan.down} == {"delete", "release", "detach"}
    order = [(s.action, s.kind, s.name) for s in plan.down]
    # the volume leaves its server before either goes; servers go before their network and leases
    assert order.index(("detach", "volume", "snap2caption-mlflow-data")) < order.index(
        ("delete", "server", "snap2caption-mlflow")
    )
    assert order.index(("delete", "server", "snap2caption-api")) < order.index(
        ("delete", "network", "snap2caption-net")
    )
    assert order[-1] == ("delete", "lease", "snap2caption-gpu-lease")


def test_the_inventory_feeds_the_playbooks(plan: Plan, tmp_path: Path) -> None:
    path = tmp_path / "hosts.yml"
    path.write_text(yaml.safe_dump(inventory(plan, placeholder_addresses(plan))))
    listed = tool("ansible-inventory", "-i", str(path), "--list")
    assert listed.returncode == 0, listed.stderr
    data = yaml.safe_load(listed.stdout)
    assert data["api"]["hosts"] == ["snap2caption-api"]
    assert data["registry"]["hosts"] == data["monitoring"]["hosts"] == ["snap2caption-mlflow"]
    assert data["data"]["hosts"] == ["snap2caption-data"] and data["training"]["hosts"] == [
        "snap2caption-gpu-0"
    ]
    hostvars = data["_meta"]["hostvars"]
    # private VMs through the API VM; the volume where the registry's artifacts go; the GPU node's registry
    assert hostvars["snap2caption-mlflow"]["ansible_ssh_common_args"] == (
        "-o ProxyJump=cc@floating-ip-of-snap2caption-api"
    )
    assert hostvars["snap2caption-mlflow"]["base_data_device"] == "/dev/vdb"
    assert "ansible_ssh_common_args" not in hostvars["snap2caption-api"]
    assert (
        hostvars["snap2caption-gpu-0"]["snap2caption_mlflow_uri"]
        == "http://floating-ip-of-snap2caption-api:5000"
    )
    site = tool("ansible-playbook", "-i", str(path), "--list-hosts", "playbooks/site.yml")
    assert site.returncode == 0, site.stderr
    for host in ("snap2caption-api", "snap2caption-mlflow", "snap2caption-data", "snap2caption-gpu-0"):
        assert f"      {host}\n" in site.stdout


def test_a_real_run_says_what_is_missing() -> None:
    no_credentials = run_cli("up")
    assert no_credentials.returncode == 1
    assert "no Chameleon credentials" in no_credentials.stderr and "--dry-run" in no_credentials.stderr
    no_chi = run_cli("up", env={"OS_AUTH_URL": "https://chi.tacc.chameleoncloud.org:5000/v3"})
    assert no_chi.returncode == 1
    assert "python-chi is not installed" in no_chi.stderr and ".[chameleon]" in no_chi.stderr


def test_a_bad_deployment_file_is_refused_with_the_reason(tmp_path: Path) -> None:
    config = yaml.safe_load((ROOT / "infra" / "chameleon" / "deployment.yml").read_text())
    config["vms"]["flavour"] = "m1.large"
    path = tmp_path / "deployment.yml"
    path.write_text(yaml.safe_dump(config))
    result = run_cli("--config", str(path), "up", "--dry-run")
    assert result.returncode == 1 and "flavour" in result.stderr and "Extra inputs" in result.stderr
    config["vms"].pop("flavour")
    config["vms"]["servers"][1]["floating_ip"] = True
    path.write_text(yaml.safe_dump(config))
    result = run_cli("--config", str(path), "up", "--dry-run")
    assert result.returncode == 1 and "exactly one VM, `api`, has the floating IP" in result.stderr
