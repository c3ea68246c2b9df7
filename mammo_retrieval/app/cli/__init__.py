"""`mretrieve`: a thin click front end over mammo_retrieval.app.workspace. Errors become exit codes here, once."""
from __future__ import annotations

import sys

import click

from mammo_retrieval.core.errors import MammoRetrievalError
from mammo_retrieval.app.cli import config as config_commands
from mammo_retrieval.app.cli._common import render_error
from mammo_retrieval.app.cli import db as db_commands
from mammo_retrieval.app.cli import index as index_commands
from mammo_retrieval.app.cli.analysis import evaluate, export, report
from mammo_retrieval.app.cli.ingest import ingest
from mammo_retrieval.app.cli.qc import qc
from mammo_retrieval.app.cli.reindex import reindex
from mammo_retrieval.app.cli.query import query
from mammo_retrieval.app.cli.status import status
from mammo_retrieval.app.cli.train import train


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except MammoRetrievalError as exc:
            click.echo(render_error(exc), err=True)
            sys.exit(exc.exit_code)


@click.group(cls=_Group)
@click.option("--config", "config_path", type=click.Path(dir_okay=False), envvar="MRETRIEVE_CONFIG",
              help="YAML file overriding configs/default.yaml (or $MRETRIEVE_CONFIG).")
@click.option("-v", "--verbose", count=True, help="Log progress (-v) or details (-vv) to stderr.")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True,
              help="json: one object a line, for log collectors.")
@click.version_option(package_name="mammo_retrieval")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None, verbose: int, log_format: str) -> None:
    """Similarity search for mammograms. State lives under $MRETRIEVE_HOME (default: the current folder)."""
    from mammo_retrieval.core.config import load_config
    from mammo_retrieval.app.cli.logs import configure_logging
    configure_logging(verbose, log_format)
    ctx.obj = load_config(config_path)


cli.add_command(ingest)
cli.add_command(query)
cli.add_command(status)
cli.add_command(qc)
cli.add_command(report)
cli.add_command(evaluate)
cli.add_command(export)
cli.add_command(train)
cli.add_command(reindex)
cli.add_command(db_commands.db)
cli.add_command(index_commands.index)
cli.add_command(config_commands.config)


def main() -> None:
    cli(prog_name="mretrieve")
