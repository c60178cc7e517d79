"""The plan's steps carried out with python-chi (``pip install -e .[chameleon]``): one call per step.

This is the one part of the project that cannot run here: Chameleon is not reachable from the build
machines, so no test makes these calls; ``plan.py`` (what is created, in which order, with which names and
rules) is what the tests check. Keep this layer thin: a step's meaning belongs in the plan.

Every create is idempotent (an existing resource of the same name is taken as it is), so a run that
stopped half-way can be run again; every delete of something already gone is skipped.

Credentials: an OpenStack RC file of an application credential for each site, sourced before the run
(``OS_AUTH_URL``, ``OS_APPLICATION_CREDENTIAL_ID``, ...), as python-chi reads them outside Jupyter.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from infra.chameleon.plan import Addresses, Plan, Rule, Step

logger = logging.getLogger(__name__)


class Chameleon:
    """Carries out steps in order, remembering what earlier steps made (leases, servers, addresses)."""

    def __init__(self, plan: Plan) -> None:
        import chi
        import chi.clients
        import chi.lease
        import chi.network
        import chi.server
        import chi.storage

        self.chi = chi
        self.plan = plan
        self.site: str | None = None
        self.floating_ips: dict[str, str] = {}  # server name -> its floating IP
        self._do: dict[tuple[str, str], Callable[[Step], None]] = {
            ("reserve", "lease"): self._reserve_lease,
            ("create", "network"): self._create_network,
            ("create", "subnet"): self._create_subnet,
            ("create", "router"): self._create_router,
            ("create", "security_group"): self._create_security_group,
            ("create", "server"): self._create_server,
            ("associate", "floating_ip"): self._associate_floating_ip,
            ("create", "volume"): self._create_volume,
            ("attach", "volume"): self._attach_volume,
            ("detach", "volume"): self._detach_volume,
            ("delete", "volume"): lambda s: self._gone(lambda: self.chi.storage.get_volume(s.name).delete()),
            ("release", "floating_ip"): self._release_floating_ip,
            ("delete", "server"): lambda s: self._gone(  # its floating IP went in an earlier step
                lambda: self.chi.server.get_server(s.name).delete(idempotent=True, delete_ips=False)
            ),
            ("delete", "security_group"): self._delete_security_group,
            ("delete", "router"): self._delete_router,
            ("delete", "subnet"): lambda s: self._gone(
                lambda: self.chi.network.delete_subnet(self._id("subnet", s.name))
            ),
            ("delete", "network"): lambda s: self._gone(
                lambda: self.chi.network.delete_network(self._id("network", s.name))
            ),
            ("delete", "lease"): lambda s: self._gone(lambda: self.chi.lease.delete_lease(s.name)),
        }

    def run(self, steps: list[Step]) -> None:
        """Each step in order; the first failure stops the run (its error names the step)."""
        for i, step in enumerate(steps, start=1):
            if step.site != self.site:
                self.chi.use_site(step.site)
                self.site = step.site
            logger.info("%d/%d %s", i, len(steps), step.describe())
            try:
                self._do[(step.action, step.kind)](step)
            except Exception as exc:
                raise RuntimeError(f"step {i} ({step.describe()}) failed: {exc}") from exc

    def addresses(self) -> dict[str, Addresses]:
        """Where each server of the plan is (by its short name: ``api``, ``gpu-0``), after :meth:`run`."""
        out = {}
        d = self.plan.deployment
        for short, site, network in [
            *((s.name, d.vms.site, self.plan.resource("net")) for s in d.vms.servers),
            *((f"gpu-{i}", d.gpu.site, d.gpu.network) for i in range(d.gpu.count)),
        ]:
            self.chi.use_site(site)
            name = self.plan.resource(short)
            server = self.chi.server.get_server(name)
            fixed = [
                a["addr"] for a in server.addresses.get(network, []) if a.get("OS-EXT-IPS:type") == "fixed"
            ]
            out[short] = Addresses(fixed[0], server.get_floating_ip())
        return out

    # ---- create
    def _reserve_lease(self, step: Step) -> None:
        p = step.params
        lease = self.chi.lease.Lease(step.name, duration=timedelta(hours=p["hours"]))
        if "node_type" in p:
            lease.add_node_reservation(amount=p["nodes"], node_type=p["node_type"])
            lease.add_fip_reservation(amount=p["floating_ips"])
        else:
            lease.add_flavor_reservation(name=p["flavor"], amount=p["instances"])
        lease.submit(idempotent=True, wait_for_active=True, wait_timeout=1800)

    def _create_network(self, step: Step) -> None:
        if not self._exists(lambda: self.chi.network.get_network(step.name)):
            self.chi.clients.neutron().create_network({"network": {"name": step.name}})

    def _create_subnet(self, step: Step) -> None:
        if not self._exists(lambda: self.chi.network.get_subnet(step.name)):
            network_id = self._id("network", step.params["network"])
            self.chi.network.create_subnet(step.name, network_id, cidr=step.params["cidr"])

    def _create_router(self, step: Step) -> None:
        if not self._exists(lambda: self.chi.network.get_router(step.name)):
            router = self.chi.network.create_router(step.name, gw_network_name=step.params["gateway"])
            self.chi.network.add_subnet_to_router(router["id"], self._id("subnet", step.params["subnet"]))

    def _create_security_group(self, step: Step) -> None:
        neutron = self.chi.clients.neutron()
        if [
            g
            for g in neutron.list_security_groups(name=step.name)["security_groups"]
            if g["name"] == step.name
        ]:
            return
        group = neutron.create_security_group({"security_group": {"name": step.name}})["security_group"]
        for rule in step.params["ingress"]:
            neutron.create_security_group_rule({"security_group_rule": self._rule(group["id"], rule)})

    def _rule(self, group_id: str, rule: Rule) -> dict[str, Any]:
        source = rule.source
        if source.startswith("floating-ip:"):
            source = f"{self.floating_ips[source.removeprefix('floating-ip:')]}/32"
        body: dict[str, Any] = {
            "security_group_id": group_id, "direction": "ingress", "ethertype": "IPv4",
            "protocol": rule.protocol, "remote_ip_prefix": source,
        }  # fmt: skip
        if rule.port is not None:
            body["port_range_min"] = body["port_range_max"] = rule.port
        return body

    def _create_server(self, step: Step) -> None:
        p = step.params
        lease = self.chi.lease.get_lease(p["reservation"])
        if "node_type" in p:  # bare metal: the lease's node reservation, the site's baremetal flavor
            kwargs = {"reservation_id": lease.node_reservations[0]["id"]}
        else:  # a VM: the flavor the lease reserved (its name names the reservation)
            kwargs = {"flavor_name": lease.get_reserved_flavors()[0].name}
        server = self.chi.server.Server(
            step.name, image_name=p["image"], key_name=p["key"], network_name=p["network"], **kwargs
        ).submit(idempotent=True, show=None)
        for group in p.get("security_groups", []):
            server.add_security_group(group)

    def _associate_floating_ip(self, step: Step) -> None:
        server = self.chi.server.get_server(step.name)
        existing = server.get_floating_ip()
        if existing:
            self.floating_ips[step.name] = existing
            return
        reserved = None
        if "reservation" in step.params:
            reserved = self.chi.lease.get_lease(step.params["reservation"]).get_reserved_floating_ips()[0]
        self.floating_ips[step.name] = server.associate_floating_ip(reserved)

    def _create_volume(self, step: Step) -> None:
        self.chi.storage.Volume(step.name, step.params["size_gb"]).submit(idempotent=True)

    def _attach_volume(self, step: Step) -> None:
        volume = self.chi.storage.get_volume(step.name)
        server = self.chi.server.get_server(step.params["server"])
        if not any(a["server_id"] == server.id for a in self._attachments(volume.id)):
            server.attach_volume(volume.id)

    # ---- delete
    def _detach_volume(self, step: Step) -> None:
        def detach() -> None:
            volume = self.chi.storage.get_volume(step.name)
            for attachment in self._attachments(volume.id):
                self.chi.clients.nova().volumes.delete_server_volume(attachment["server_id"], volume.id)

        self._gone(detach)

    def _release_floating_ip(self, step: Step) -> None:
        def release() -> None:
            server = self.chi.server.get_server(step.name)
            address = server.get_floating_ip()
            if address:  # a reserved address goes back to its lease; an allocated one is deleted
                server.detach_floating_ip(address, delete=step.site == self.plan.deployment.vms.site)

        self._gone(release)

    def _delete_security_group(self, step: Step) -> None:
        neutron = self.chi.clients.neutron()
        for group in neutron.list_security_groups(name=step.name)["security_groups"]:
            neutron.delete_security_group(group["id"])

    def _delete_router(self, step: Step) -> None:
        def delete() -> None:
            router_id = self._id("router", step.name)
            self._gone(
                lambda: self.chi.network.remove_subnet_from_router(
                    router_id, self._id("subnet", self.plan.resource("subnet"))
                )
            )
            self.chi.network.delete_router(router_id)

        self._gone(delete)

    # ---- helpers
    def _attachments(self, volume_id: str) -> list[dict[str, Any]]:
        return list(self.chi.clients.cinder().volumes.get(volume_id).attachments or [])

    def _id(self, kind: str, name: str) -> str:
        getter = {"network": self.chi.network.get_network, "subnet": self.chi.network.get_subnet,
                  "router": self.chi.network.get_router}[kind]  # fmt: skip
        return str(getter(name)["id"])

    @staticmethod
    def _exists(get: Callable[[], Any]) -> bool:
        try:
            get()
        except Exception:  # python-chi raises its own or the OpenStack clients' "not found" errors
            return False
        return True

    def _gone(self, delete: Callable[[], Any]) -> None:
        """Run a delete; a resource that no longer exists is what a delete wants."""
        try:
            delete()
        except Exception as exc:
            if "not found" not in str(exc).lower() and "could not find" not in str(exc).lower():
                raise
            logger.info("already gone: %s", exc)
