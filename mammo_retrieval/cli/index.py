from __future__ import annotations

import click

from ._common import workspace


@click.group()
def index() -> None:
    """Index maintenance."""


@index.command()
@click.pass_context
def rebuild(ctx: click.Context) -> None:
    """Rebuild the configured model's index from the vectors in the database."""
    ws = workspace(ctx)
    rebuilt = ws.rebuild_index()
    m = rebuilt.manifest
    click.echo(f"rebuilt {rebuilt.directory}: {m.index_type} nlist {m.nlist} ntotal {m.ntotal}")
