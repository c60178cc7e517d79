"""The ``snap2caption`` command line: every job (data, training, serving, registry) hangs off it.

Heavy imports (torch, the services) happen inside the commands so that ``snap2caption --help``
stays fast.
"""

from __future__ import annotations

import click

from snap2caption import __version__
from snap2caption.cli.analyze import analyze
from snap2caption.cli.backfill import backfill
from snap2caption.cli.bootstrap import bootstrap
from snap2caption.cli.data import data
from snap2caption.cli.db import db
from snap2caption.cli.eval import eval_group
from snap2caption.cli.export import export_group
from snap2caption.cli.keys import keys
from snap2caption.cli.registry import registry
from snap2caption.cli.release import release
from snap2caption.cli.serve import serve
from snap2caption.cli.train import train_group
from snap2caption.cli.tune import tune_group
from snap2caption.cli.up import up
from snap2caption.logs import configure_logging


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="snap2caption")
@click.option("--log-level", default="INFO", show_default=True, envvar="SNAP2CAPTION_LOG_LEVEL")
def main(log_level: str) -> None:
    """Snap2Caption: captions, alt text, tags and objects for images."""
    configure_logging(log_level)


main.add_command(data)
main.add_command(registry)
main.add_command(serve)
main.add_command(up)
main.add_command(bootstrap)
main.add_command(train_group)
main.add_command(tune_group)
main.add_command(eval_group)
main.add_command(export_group)
main.add_command(analyze)
main.add_command(backfill)
main.add_command(keys)
main.add_command(db)
main.add_command(release)
