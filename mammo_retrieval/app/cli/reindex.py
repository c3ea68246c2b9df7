from __future__ import annotations


import click

from mammo_retrieval.app.cli._common import dumps, progress_bar, workspace


@click.command()
@click.option("--model", "model_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Weights to re-embed with (a checkpoint from `mretrieve train`, PRIMER, state dict, safetensors). "
                   "They are copied into the index folder, so the file may be moved or overwritten afterwards.")
@click.option("--rollback", is_flag=True, help="Switch back to the previous index version.")
@click.option("--allow-missing", is_flag=True,
              help="Switch even if some images could not be embedded (they are then missing from search).")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
@click.pass_context
def reindex(ctx: click.Context, model_path: str | None, rollback: bool, allow_missing: bool, fmt: str,
            no_progress: bool) -> None:
    """Re-embed everything with a new model beside the live index, then switch atomically.

    It refuses to switch (exit 10) while any image fails to embed, listing each one; the vectors embedded
    so far are kept, so a rerun resumes.
    """
    if rollback and (model_path or allow_missing):
        raise click.UsageError("--rollback takes neither --model nor --allow-missing")
    ws = workspace(ctx)
    if rollback:
        result = ws.rollback()
        if fmt == "json":
            click.echo(dumps(result))
        else:
            click.echo(f"live: {result['live']} (encoder {result['encoder']}, "
                       f"weights {result['weights'] or 'seeded random'})")
        return
    with progress_bar("image", disable=no_progress, desc="reindex") as progress:
        result = ws.reindex(model_path, allow_missing=allow_missing, on_progress=progress)
    if fmt == "json":
        click.echo(dumps(result))
    else:
        click.echo(format_summary(result))
    if result["random_weights"]:
        from mammo_retrieval.app.status import RANDOM_WEIGHTS_WARNING
        click.secho(f"WARNING: {RANDOM_WEIGHTS_WARNING}", fg="yellow", err=True)


def format_summary(result: dict) -> str:
    """The reindex result for a person: what is live now, what was embedded, what is missing."""
    lines = [f"live: {result['live']}" + (f" (previous {result['previous']}, kept for --rollback)"
                                          if result["previous"] else " (unchanged)"),
             f"embedded {result['embedded']}, already embedded {result['already_embedded']}, "
             f"failed {len(result['failed'])} ({result['seconds']:.1f} s)",
             f"index {result['index_type']} with {result['ntotal']} vectors"]
    if result.get("weights"):
        lines.append(f"weights stored as {result['weights']}")
    if result["failed"]:
        lines.append("missing from search (switched with --allow-missing):")
        lines += [f"  {f['sop_instance_uid']}  {f['path']}: {f['reason']}" for f in result["failed"]]
    return "\n".join(lines)
