"""``python -m infra.chameleon up|down [--dry-run]``: Snap2Caption's resources on Chameleon Cloud.

    python -m infra.chameleon up --dry-run     # the plan and the inventory it writes; no credentials needed
    python -m infra.chameleon up               # reserve, create, write the Ansible inventory
    python -m infra.chameleon down --dry-run   # what a teardown removes, in order
    python -m infra.chameleon down --yes       # remove it all (the volume too)

A real run needs python-chi (``pip install -e .[chameleon]``) and Chameleon credentials in the environment
(the OpenStack RC file of an application credential); ``--dry-run`` needs neither.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import click
import yaml

from infra.chameleon.plan import (
    DEFAULT_CONFIG,
    Plan,
    Step,
    build,
    inventory,
    load,
    placeholder_addresses,
    render,
)

if TYPE_CHECKING:
    from infra.chameleon.chi_backend import Chameleon

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_INVENTORY = ROOT / "ansible" / "inventories" / "chameleon" / "hosts.yml"
CREDENTIAL_VARIABLES = ("OS_AUTH_URL", "OS_AUTH_TYPE")


def _backend(plan: Plan) -> Chameleon:
    """The python-chi layer, or one line saying what is missing."""
    if not any(os.environ.get(name) for name in CREDENTIAL_VARIABLES):
        raise click.ClickException(
            "no Chameleon credentials: source the OpenStack RC file of an application credential "
            f"({', '.join(CREDENTIAL_VARIABLES)} unset); `--dry-run` prints the plan without them"
        )
    try:
        from infra.chameleon.chi_backend import Chameleon

        return Chameleon(plan)
    except ImportError as exc:
        raise click.ClickException(
            f"python-chi is not installed ({exc.name}): pip install -e '.[chameleon]'; "
            "`--dry-run` prints the plan without it"
        ) from exc


def _run(chameleon: Chameleon, steps: list[Step]) -> None:
    """Carry the steps out; a failure is one line naming the step (run again: every step is idempotent)."""
    try:
        chameleon.run(steps)
    except RuntimeError as exc:
        raise click.ClickException(f"{exc} (fix it, then run the same command again)") from exc


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=DEFAULT_CONFIG,
    show_default=True,
    help="The deployment: sites, images, servers, sizes.",
)
@click.pass_context
def main(ctx: click.Context, config: Path) -> None:
    """Snap2Caption on Chameleon Cloud: VMs, GPU nodes, network, security groups, floating IPs, volume."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        ctx.obj = build(load(config))
    except (ValueError, yaml.YAMLError) as exc:
        raise click.ClickException(f"{config}: {exc}") from exc


@main.command()
@click.option("--dry-run", is_flag=True, help="Print the plan and the inventory; change nothing.")
@click.option(
    "--inventory",
    "inventory_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=DEFAULT_INVENTORY,
    show_default=True,
    help="Where the Ansible inventory of the result is written.",
)
@click.pass_obj
def up(plan: Plan, dry_run: bool, inventory_path: Path) -> None:
    """Reserve and create everything, then write the Ansible inventory (idempotent: run it again after a
    failure; what exists is kept)."""
    click.echo(f"Plan: {len(plan.up)} steps, in order\n{render(plan, plan.up)}\n")
    if dry_run:
        hosts = yaml.safe_dump(inventory(plan, placeholder_addresses(plan)), sort_keys=False)
        click.echo(
            f"The inventory a real run writes to {inventory_path} (placeholders for the addresses):\n{hosts}"
        )
        click.echo("Dry run: nothing was reserved or created.")
        return
    chameleon = _backend(plan)
    _run(chameleon, plan.up)
    inventory_path.parent.mkdir(parents=True, exist_ok=True)
    inventory_path.write_text(yaml.safe_dump(inventory(plan, chameleon.addresses()), sort_keys=False))
    click.echo(f"Inventory: {inventory_path}\nNext: cd ansible && ansible-playbook playbooks/site.yml")


@main.command()
@click.option("--dry-run", is_flag=True, help="Print what would be removed; change nothing.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option(
    "--inventory",
    "inventory_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=DEFAULT_INVENTORY,
    show_default=True,
    help="The inventory `up` wrote, removed at the end.",
)
@click.pass_obj
def down(plan: Plan, dry_run: bool, yes: bool, inventory_path: Path) -> None:
    """Remove everything `up` made, the data volume included, in reverse order."""
    click.echo(f"Teardown: {len(plan.down)} steps, in order\n{render(plan, plan.down)}\n")
    if dry_run:
        click.echo("Dry run: nothing was removed.")
        return
    if not yes:
        click.confirm("Remove all of it, the volume and its data included?", abort=True)
    _run(_backend(plan), plan.down)
    inventory_path.unlink(missing_ok=True)
    click.echo("Removed.")


if __name__ == "__main__":
    main()
