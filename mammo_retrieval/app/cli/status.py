from __future__ import annotations

import click

from mammo_retrieval.core.errors import IndexCorruptError
from mammo_retrieval.app.cli._common import dumps, workspace


@click.command()
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")
@click.option("--rejected-limit", type=int, default=50, show_default=True, help="Rejected files to list (text).")
@click.pass_context
def status(ctx: click.Context, fmt: str, rejected_limit: int) -> None:
    """What the index and database hold: counts, model versions, index parameters, rejected files."""
    ws = workspace(ctx)
    info = ws.status(rejected_limit=None if fmt == "json" else rejected_limit)
    if fmt == "json":
        click.echo(dumps(info))
        _exit_if_unhealthy(info)
        return
    c = info["counts"]
    click.echo(f"database   {info['database']}")
    click.echo(f"index dir  {info['index_dir']}")
    click.echo(f"images {c['images']}  studies {c['studies']} ({c['studies_keyed_by_study_uid']} keyed by "
               f"StudyInstanceUID: no AccessionNumber)  vectors {c['embeddings']}  rejected {c['rejected_files']}")
    for m in info["model_versions"]:
        weights = "RANDOM (seeded)" if m["random_weights"] else (m["weights_path"] or "?")
        role = "LIVE " if m["live"] else ("kept " if m["kept_for_rollback"] else "")
        click.echo(f"{role}model {m['key']}: {m['encoder']} dim {m['dim']}, weights {weights} "
                   f"sha256 {m['weights_sha256'][:16]}, preprocess {m['preprocess_digest']}, {m['vectors']} vectors")
        idx = m.get("index")
        if idx:
            click.echo(f"  index {'OPQ + ' if idx['opq'] else ''}{idx['type']} metric {idx['metric']} "
                       f"nlist {idx['nlist']} nprobe {idx['nprobe']} ntotal {idx['ntotal']}"
                       f"{', lists on disk' if idx['on_disk'] else ''}"
                       f"{', layout pinned by index rebuild' if idx['layout_source'] == 'rebuild' else ''}"
                       f" ({idx['path']})")
        if m.get("index_error"):
            click.echo(f"  index ERROR: {m['index_error']}")
    if info["rejected"]:
        click.echo(f"rejected files (first {len(info['rejected'])} of {c['rejected_files']}):")
        for r in info["rejected"]:
            click.echo(f"  [{r['code']}] {r['path']}: {r['reason']}")
    for e in info.get("errors", []):
        click.secho(f"ERROR: {e}", fg="red", err=True)
    for w in info["warnings"]:
        click.secho(f"WARNING: {w}", fg="yellow", err=True)
    _exit_if_unhealthy(info)


def _exit_if_unhealthy(info: dict) -> None:
    """Everything is printed first; then a broken live pointer or index file fails the command, so a health
    check that runs `mretrieve status` sees it (exit code of IndexCorruptError)."""
    if info.get("errors"):
        ctx = click.get_current_context()
        ctx.exit(IndexCorruptError.exit_code)
