from __future__ import annotations

import click

from ._common import dumps, workspace


@click.command()
@click.option("--model", "model_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Weights to re-embed with (a checkpoint from `mretrieve train`, PRIMER, state dict, safetensors).")
@click.option("--rollback", is_flag=True, help="Switch back to the previous index version.")
@click.pass_context
def reindex(ctx: click.Context, model_path: str | None, rollback: bool) -> None:
    """Re-embed everything with a new model beside the live index, then switch atomically."""
    if rollback and model_path:
        raise click.UsageError("give --model or --rollback, not both")
    ws = workspace(ctx)
    if rollback:
        click.echo(dumps(ws.rollback()))
        return
    click.echo(dumps(ws.reindex(model_path)))
