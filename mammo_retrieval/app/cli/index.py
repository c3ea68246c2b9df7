from __future__ import annotations


import click

from mammo_retrieval.app.cli._common import progress_bar, workspace


@click.group()
def index() -> None:
    """Index maintenance."""


@index.command()
@click.option("--force", is_flag=True,
              help="Rebuild even if the index would shrink (the database holds fewer vectors than the index).")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
@click.pass_context
def rebuild(ctx: click.Context, force: bool, no_progress: bool) -> None:
    """Rebuild the configured model's index from the vectors in the database.

    Refuses to shrink the index unless --force: a database with fewer vectors than the index was most likely
    truncated or replaced, and should be restored instead."""
    ws = workspace(ctx)
    with progress_bar("vector", disable=no_progress) as progress:
        rebuilt = ws.rebuild_index(force=force, on_progress=progress)
    m = rebuilt.manifest
    click.echo(f"rebuilt {rebuilt.directory}: {m.index_type} nlist {m.nlist} ntotal {m.ntotal}")


@index.command()
@click.option("--recall", "target", type=click.FloatRange(0, 1), default=0.95, show_default=True)
@click.option("--queries", type=click.IntRange(min=10), default=1000, show_default=True,
              help="Indexed vectors used as queries.")
@click.option("-k", "k", type=click.IntRange(min=1), default=10, show_default=True)
@click.pass_context
def tune(ctx: click.Context, target: float, queries: int, k: int) -> None:
    """Pick nprobe for a target recall@k against exact search on this corpus; store it in the manifest."""
    result = workspace(ctx).tune_index(target, queries=queries, k=k)
    if result.nprobe is None and result.recall == 1.0 and result.table[0]["nprobe"] is None:
        click.echo("the index is exact (flat): recall 1.0, nothing to tune")
        return
    for row in result.table:
        click.echo(f"nprobe {row['nprobe']:>5}  recall@{k} {row['recall']:.4f}  p50 {row['p50_ms']} ms  "
                   f"p99 {row['p99_ms']} ms")
    if result.nprobe is None:
        click.echo(f"no nprobe reaches recall {target}; stored the largest ({result.table[-1]['nprobe']})")
    else:
        click.echo(f"stored nprobe {result.nprobe} (recall@{k} {result.recall:.4f} >= {target}) in the manifest")
