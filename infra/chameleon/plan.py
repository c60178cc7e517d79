"""What Snap2Caption needs on Chameleon, as data: the deployment settings (``deployment.yml``), the ordered
steps that create it and those that tear it down, and the Ansible inventory of the result.

Nothing here talks to Chameleon or imports python-chi: ``--dry-run`` prints this plan with no credentials
and no python-chi installed, and ``chi_backend.py`` carries out each step with one python-chi call.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

DEFAULT_CONFIG = Path(__file__).with_name("deployment.yml")
# Ansible's groups (ansible/inventories/example/hosts.yml), each run by some server.
GROUPS = ("api", "registry", "monitoring", "data", "training")
REGISTRY_PORT = 5000  # MLflow (ansible/roles/registry), proxied by the API VM for the GPU nodes


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class VmSpec(_Strict):
    """One VM on the KVM site."""

    name: str = Field(pattern=r"^[a-z][a-z0-9-]*$")
    groups: list[str] = Field(min_length=1)
    floating_ip: bool = False
    volume_gb: int | None = Field(default=None, ge=1)


class VmSite(_Strict):
    """The VMs' site: one lease of flavor instances, a private network with a router, the servers."""

    site: str
    image: str
    flavor: str
    lease_hours: int = Field(ge=1)
    cidr: str
    public_network: str
    servers: list[VmSpec] = Field(min_length=1)
    public_ports: dict[str, list[int]] = Field(default_factory=dict)


class GpuSite(_Strict):
    """The GPU nodes' site: one lease of bare-metal nodes of a type, and a floating IP reserved with them."""

    site: str
    node_type: str
    count: int = Field(ge=1)
    image: str
    lease_hours: int = Field(ge=1)
    network: str


class Deployment(_Strict):
    """``deployment.yml``: every Chameleon resource Snap2Caption needs."""

    name: str = Field(pattern=r"^[a-z][a-z0-9-]*$", description="Prefix of every resource's name.")
    key_name: str = Field(description="Key pair registered at both sites.")
    vms: VmSite
    gpu: GpuSite

    @model_validator(mode="after")
    def _consistent(self) -> Deployment:
        ipaddress.ip_network(self.vms.cidr)  # raises on a malformed CIDR
        names = [s.name for s in self.vms.servers]
        if len(set(names)) != len(names):
            raise ValueError(f"server names repeat: {names}")
        unknown = {g for s in self.vms.servers for g in s.groups} - set(GROUPS)
        if unknown:
            raise ValueError(f"unknown Ansible groups {sorted(unknown)}; known: {', '.join(GROUPS)}")
        if [s.name for s in self.vms.servers if s.floating_ip] != ["api"]:
            raise ValueError("exactly one VM, `api`, has the floating IP: the others are reached through it")
        if set(self.vms.public_ports) - set(names):
            raise ValueError(f"public_ports names servers that do not exist: {sorted(self.vms.public_ports)}")
        return self


def load(path: Path = DEFAULT_CONFIG) -> Deployment:
    """Read and validate a deployment file."""
    return Deployment.model_validate(yaml.safe_load(path.read_text()))


@dataclass(frozen=True)
class Rule:
    """An ingress rule: ``protocol`` traffic to ``port`` (all ports when None) from ``source``, a CIDR or
    ``floating-ip:<server>`` (that server's floating IP, known once it has one)."""

    protocol: str
    port: int | None
    source: str

    def __str__(self) -> str:
        return f"{self.protocol}/{self.port or 'any'} from {self.source}"


@dataclass(frozen=True)
class Step:
    """One call to Chameleon: ``action`` a ``kind`` named ``name`` at ``site``, with ``params``."""

    site: str
    action: str  # reserve, create, attach, associate, add, release, delete, detach
    kind: str  # lease, network, subnet, router, security_group, server, floating_ip, volume
    name: str
    params: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        def text(value: Any) -> str:
            return f"[{', '.join(map(str, value))}]" if isinstance(value, list) else str(value)

        details = ", ".join(f"{k}={text(v)}" for k, v in self.params.items())
        return f"[{self.site}] {self.action} {self.kind} {self.name}" + (f" ({details})" if details else "")


@dataclass(frozen=True)
class Plan:
    """The steps that create the deployment (``up``) and those that remove it (``down``), in order."""

    deployment: Deployment
    up: list[Step]
    down: list[Step]

    def resource(self, role: str) -> str:
        """The name of a resource of this deployment (``api`` -> ``snap2caption-api``)."""
        return f"{self.deployment.name}-{role}"


def build(deployment: Deployment) -> Plan:
    """The steps, in the order they must run.

    The GPU site comes first: its floating IP is the one address outside the private network allowed to
    reach the registry (through the API VM), so the VMs' security groups need it.
    """
    d, vms, gpu = deployment, deployment.vms, deployment.gpu

    def name(role: str) -> str:
        return f"{d.name}-{role}"

    up: list[Step] = [
        Step(
            gpu.site,
            "reserve",
            "lease",
            name("gpu-lease"),
            {
                "node_type": gpu.node_type,
                "nodes": gpu.count,
                "floating_ips": 1,
                "hours": gpu.lease_hours,
            },
        ),
        *(
            Step(
                gpu.site,
                "create",
                "server",
                name(f"gpu-{i}"),
                {
                    "image": gpu.image,
                    "node_type": gpu.node_type,
                    "network": gpu.network,
                    "key": d.key_name,
                    "reservation": name("gpu-lease"),
                },
            )
            for i in range(gpu.count)
        ),
        # Only the first node (the Ray head) is public; the others are reached through it.
        Step(gpu.site, "associate", "floating_ip", name("gpu-0"), {"reservation": name("gpu-lease")}),
        Step(
            vms.site,
            "reserve",
            "lease",
            name("vm-lease"),
            {
                "flavor": vms.flavor,
                "instances": len(vms.servers),
                "hours": vms.lease_hours,
            },
        ),
        Step(vms.site, "create", "network", name("net")),
        Step(vms.site, "create", "subnet", name("subnet"), {"network": name("net"), "cidr": vms.cidr}),
        Step(
            vms.site,
            "create",
            "router",
            name("router"),
            {
                "gateway": vms.public_network,
                "subnet": name("subnet"),
            },
        ),
        Step(
            vms.site,
            "create",
            "security_group",
            name("internal"),
            {
                "ingress": [Rule(protocol, None, vms.cidr) for protocol in ("tcp", "udp", "icmp")],
            },
        ),
    ]
    for public, ports in vms.public_ports.items():
        up.append(
            Step(
                vms.site,
                "create",
                "security_group",
                name(f"{public}-public"),
                {
                    "ingress": [Rule("tcp", port, "0.0.0.0/0") for port in ports],
                },
            )
        )
    up.append(
        Step(
            vms.site,
            "create",
            "security_group",
            name("registry-proxy"),
            {
                "ingress": [Rule("tcp", REGISTRY_PORT, f"floating-ip:{name('gpu-0')}")],
            },
        )
    )
    for server in vms.servers:
        groups = [name("internal")]
        if server.name in vms.public_ports:
            groups.append(name(f"{server.name}-public"))
        if server.name == "api":
            groups.append(name("registry-proxy"))
        up.append(
            Step(
                vms.site,
                "create",
                "server",
                name(server.name),
                {
                    "image": vms.image,
                    "flavor": vms.flavor,
                    "reservation": name("vm-lease"),
                    "network": name("net"),
                    "key": d.key_name,
                    "security_groups": groups,
                    "ansible_groups": server.groups,
                },
            )
        )
    for server in vms.servers:
        if server.floating_ip:
            up.append(
                Step(
                    vms.site,
                    "associate",
                    "floating_ip",
                    name(server.name),
                    {
                        "network": vms.public_network,
                    },
                )
            )
        if server.volume_gb:
            up.append(
                Step(vms.site, "create", "volume", name(f"{server.name}-data"), {"size_gb": server.volume_gb})
            )
            up.append(
                Step(
                    vms.site,
                    "attach",
                    "volume",
                    name(f"{server.name}-data"),
                    {
                        "server": name(server.name),
                        "device": "/dev/vdb",
                    },
                )
            )

    down: list[Step] = []
    for step in reversed(up):
        undo = {
            ("reserve", "lease"): "delete",
            ("create", "server"): "delete",
            ("associate", "floating_ip"): "release",
            ("create", "network"): "delete",
            ("create", "subnet"): "delete",
            ("create", "router"): "delete",
            ("create", "security_group"): "delete",
            ("create", "volume"): "delete",
            ("attach", "volume"): "detach",
        }[(step.action, step.kind)]
        down.append(Step(step.site, undo, step.kind, step.name))
    return Plan(deployment, up, down)


@dataclass(frozen=True)
class Addresses:
    """Where a server is: its address on its network, and its floating IP if it has one."""

    private_ip: str
    floating_ip: str | None = None


def placeholder_addresses(plan: Plan) -> dict[str, Addresses]:
    """Names standing for the addresses a real run learns (``--dry-run``'s inventory)."""
    d = plan.deployment
    out = {
        s.name: Addresses(
            f"private-ip-of-{d.name}-{s.name}", f"floating-ip-of-{d.name}-{s.name}" if s.floating_ip else None
        )
        for s in d.vms.servers
    }
    out.update(
        {
            f"gpu-{i}": Addresses(
                f"private-ip-of-{d.name}-gpu-{i}", f"floating-ip-of-{d.name}-gpu-0" if i == 0 else None
            )
            for i in range(d.gpu.count)
        }
    )
    return out


def inventory(plan: Plan, addresses: dict[str, Addresses]) -> dict[str, Any]:
    """The Ansible inventory of the deployment (the shape of ansible/inventories/example/hosts.yml).

    The VMs without a floating IP are reached through the API VM (ProxyJump), the GPU nodes through the
    first one (the Ray head, the one with a floating IP); they reach the registry through the API VM's
    proxy of it.
    """
    d = plan.deployment
    jump = addresses["api"].floating_ip
    gpu_jump = addresses["gpu-0"].floating_ip
    hosts: dict[str, dict[str, Any]] = {}
    children: dict[str, dict[str, Any]] = {group: {"hosts": {}} for group in GROUPS}
    for server in d.vms.servers:
        at = addresses[server.name]
        host: dict[str, Any] = {"ansible_host": at.floating_ip or at.private_ip, "private_ip": at.private_ip}
        if not at.floating_ip:
            host["ansible_ssh_common_args"] = f"-o ProxyJump=cc@{jump}"
        if server.volume_gb:
            host["base_data_device"] = "/dev/vdb"
        hosts[plan.resource(server.name)] = host
        for group in server.groups:
            children[group]["hosts"][plan.resource(server.name)] = None
    for i in range(d.gpu.count):
        at = addresses[f"gpu-{i}"]
        host = {
            "ansible_host": at.floating_ip or at.private_ip,
            "private_ip": at.private_ip,
            "snap2caption_mlflow_uri": f"http://{jump}:{REGISTRY_PORT}",
        }
        if not at.floating_ip:
            host["ansible_ssh_common_args"] = f"-o ProxyJump=cc@{gpu_jump}"
        hosts[plan.resource(f"gpu-{i}")] = host
        children["training"]["hosts"][plan.resource(f"gpu-{i}")] = None
    return {
        "all": {
            "hosts": hosts,
            "vars": {"ansible_user": "cc", "registry_postgres_network": d.vms.cidr},
            "children": {group: members for group, members in children.items() if members["hosts"]},
        }
    }


def render(plan: Plan, steps: list[Step]) -> str:
    """The steps as numbered lines."""
    return "\n".join(f"{i:2d}. {step.describe()}" for i, step in enumerate(steps, start=1))
