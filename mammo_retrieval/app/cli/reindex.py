from __future__ import annotations


import click

from mammo_retrieval.app.cli._common import dumps, progress_bar, workspace


@click.command()
@click.option("--model", "model_path", type=click.Path(exists=True), default=None,
              help="Weights to re-embed with (a checkpoint from `mretrieve train`, PRIMER, MoCo/LeCL, state dict, "
                   "safetensors, or a Hugging Face folder for rad-dino). "
                   "They are copied into the index folder, so the file may be moved or overwritten afterwards.")
@click.option("--encoder", "encoder_name", default=None, metavar="NAME",
              help="Another encoder architecture (a registry name, e.g. mammo-simclr-v3 to move a home from "
                   "an older built-in); without --model, its shipped weights.")
@click.option("--rollback", is_flag=True, help="Switch back to the previous index version.")
@click.option("--allow-missing", is_flag=True,
              help="Switch even if some images could not be embedded (they are then missing from search).")
@click.option("--gate", "gate_labels", type=click.Path(exists=True, dir_okay=False), default=None,
              help="A labels CSV: measure the live and the new version on its images; refuse to switch "
                   "(exit 13) when the new one is worse by more than --tolerance.")
@click.option("--gate-metric", default=None, metavar="METRIC",
              help="<label column>:p@<k>, <label column>:map or contralateral@<k> (default: first column:p@10).")
@click.option("--tolerance", type=click.FloatRange(min=0), default=0.01, show_default=True,
              help="How much worse than live the new version may be and still switch.")
@click.option("--force", is_flag=True, help="Switch even if the gate fails (the comparison is still printed).")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
@click.pass_context
def reindex(ctx: click.Context, model_path: str | None, encoder_name: str | None, rollback: bool,
            allow_missing: bool, gate_labels: str | None, gate_metric: str | None, tolerance: float, force: bool, fmt: str,
            no_progress: bool) -> None:
    """Re-embed everything with a new model beside the live index, then switch atomically.

    It refuses to switch (exit 10) while any image fails to embed, listing each one; the vectors embedded
    so far are kept, so a rerun resumes.
    """
    if rollback and (model_path or encoder_name or allow_missing or gate_labels):
        raise click.UsageError("--rollback takes neither --model, --encoder, --allow-missing nor --gate")
    if (gate_metric or force) and not gate_labels:
        raise click.UsageError("--gate-metric and --force go with --gate LABELS_CSV")
    ws = workspace(ctx)
    if rollback:
        with progress_bar("image", disable=no_progress, desc="rollback") as progress:
            result = ws.rollback(on_progress=progress, reported=False)
        click.echo(dumps(result) if fmt == "json" else format_rollback(result))
        ws.rollback_reported(result["live"])  # only now: a rerun of one killed before this finds it done
        return
    with progress_bar("image", disable=no_progress, desc="reindex") as progress:
        result = ws.reindex(model_path, encoder_name=encoder_name, allow_missing=allow_missing,
                            gate_labels=gate_labels,
                            gate_metric=gate_metric, tolerance=tolerance, force=force, on_progress=progress)
    if fmt == "json":
        click.echo(dumps(result))
    else:
        click.echo(format_summary(result))
    if result["random_weights"]:
        from mammo_retrieval.app.status import RANDOM_WEIGHTS_WARNING
        click.secho(f"WARNING: {RANDOM_WEIGHTS_WARNING}", fg="yellow", err=True)


def format_rollback(result: dict) -> str:
    """The rollback result for a person: what is live, and the images it had to catch up with."""
    weights = "seeded random" if result["random_weights"] else (result["weights"] or "the encoder's own")
    lines = [f"live: {result['live']} (encoder {result['encoder']}, weights {weights})"]
    if result.get("unchanged"):
        lines += [f"unchanged: a rollback from {result['rolled_back_from']} had already switched to it (that run "
                  f"stopped before saying so); run --rollback again to switch back; index of {result['ntotal']} "
                  "vectors"]
        return "\n".join(lines)
    lines.append(f"embedded {result['embedded']} images ingested since it was live; index of {result['ntotal']} vectors")
    if result["failed"]:
        lines.append("missing from search (their files cannot be read any more):")
        lines += [f"  {f['sop_instance_uid']}  {f['path']}: {f['reason']}" for f in result["failed"]]
    return "\n".join(lines)


def format_summary(result: dict) -> str:
    """The reindex result for a person: what is live now, what was embedded, what is missing."""
    lines = [f"live: {result['live']}" + (f" (previous {result['previous']}, kept for --rollback)"
                                          if result["previous"] else " (unchanged)"),
             f"embedded {result['embedded']}, already embedded {result['already_embedded']}"
             + (f" ({result['mapped']} of them mapped through the adapter from stored vectors, nothing decoded)"
                if result.get("mapped") else "")
             + f", failed {len(result['failed'])} ({result['seconds']:.1f} s)",
             f"index {result['index_type']} with {result['ntotal']} vectors"]
    if result.get("weights"):
        lines.append(f"weights stored as {result['weights']}")
    if result.get("gate"):
        g = result["gate"]
        lines.append(f"gate {g['metric']} on {g['images']} labelled images: live {g['live']:.4f}, new {g['new']:.4f} "
                     f"({g['difference']:+.4f}; tolerance {g['tolerance']})"
                     + (" -> passed" if g["passed"] else " -> FAILED, switched with --force"))
    if result["failed"]:
        lines.append("missing from search (switched with --allow-missing):")
        lines += [f"  {f['sop_instance_uid']}  {f['path']}: {f['reason']}" for f in result["failed"]]
    return "\n".join(lines)
