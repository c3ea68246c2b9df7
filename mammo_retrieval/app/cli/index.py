from __future__ import annotations


import click

from mammo_retrieval.app.cli._common import progress_bar, workspace


@click.group()
def index() -> None:
    """Index maintenance."""


@index.command()
@click.option("--type", "index_type", type=click.Choice(["flat", "ivf_flat", "ivf_sq8", "ivf_pq"]),
              help="Index type (default: the config's index.type). Any layout option pins the layout: "
                   "ingest keeps it until a rebuild without layout options.")
@click.option("--nlist", type=click.IntRange(min=1), help="Inverted lists (default: the config's index.nlist).")
@click.option("--opq/--no-opq", default=None, help="An OPQ rotation before the product quantiser (ivf_pq).")
@click.option("--on-disk/--in-memory", "on_disk", default=None,
              help="Inverted lists in a memory-mapped file beside the index, built shard by shard.")
@click.option("--shards", type=click.IntRange(min=1),
              help="Build an on-disk index in this many shards (memory: one shard's codes at a time; "
                   "default: one shard per million vectors).")
@click.option("--force", is_flag=True,
              help="Rebuild even if the index would shrink (the database holds fewer vectors than the index).")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
@click.pass_context
def rebuild(ctx: click.Context, index_type: str | None, nlist: int | None, opq: bool | None,
            on_disk: bool | None, shards: int | None, force: bool, no_progress: bool) -> None:
    """Rebuild the configured model's index from the vectors in the database, in bounded memory.

    Refuses to shrink the index unless --force: a database with fewer vectors than the index was most likely
    truncated or replaced, and should be restored instead."""
    from mammo_retrieval.storage.index.lifecycle import LayoutRequest
    request = LayoutRequest(index_type, nlist, opq, on_disk, shards)
    ws = workspace(ctx)
    with progress_bar("vector", disable=no_progress) as progress:
        rebuilt = ws.rebuild_index(force=force, on_progress=progress, request=request)
    m = rebuilt.manifest
    click.echo(f"rebuilt {rebuilt.directory}: {rebuilt.layout.describe()}, ntotal {m.ntotal}"
               + (", layout pinned (a rebuild without layout options returns to the config's)"
                  if m.layout_source == "rebuild" else ""))


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
