from __future__ import annotations

import click

from mammo_retrieval.app.cli._common import dumps, format_csv, format_table, workspace

COLUMNS = ["rank", "score", "accession_number", "patient_id", "laterality", "view", "path"]
# what "score" means, printed under the table (the index is inner product on unit vectors)
SCORE_NOTE = "score: cosine similarity of the unit-length embeddings, -1..1 (1 = identical; higher = more similar)"


@click.command()
@click.option("--dicom", "dicom_path", type=click.Path(exists=True, dir_okay=False), help="Query by a DICOM file.")
@click.option("--accession", help="Query by an indexed study (one search per image of the study).")
@click.option("-k", "k", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table")
@click.option("--exclude-same-patient", is_flag=True, help="Drop the query patient's own images.")
@click.option("--view", type=click.Choice(["CC", "MLO", "ML", "LM", "XCCL"], case_sensitive=False))
@click.option("--laterality", type=click.Choice(["L", "R"], case_sensitive=False))
@click.option("--timings", is_flag=True, help="Print the time of each stage to stderr (JSON).")
@click.pass_context
def query(ctx: click.Context, dicom_path: str | None, accession: str | None, k: int, fmt: str,
          exclude_same_patient: bool, view: str | None, laterality: str | None, timings: bool) -> None:
    """Print the k most similar indexed images."""
    from mammo_retrieval.search.query import QueryFilters
    from mammo_retrieval.core.timing import Stopwatch
    watch = Stopwatch()
    if bool(dicom_path) == bool(accession):
        raise click.UsageError("give exactly one of --dicom or --accession")
    filters = QueryFilters(view=view.upper() if view else None, laterality=laterality.upper() if laterality else None,
                           exclude_same_patient=exclude_same_patient)
    with watch.stage("workspace_open"):
        ws = workspace(ctx)
    results = ([ws.query_dicom(dicom_path, k, filters, watch)] if dicom_path
               else ws.query_accession(accession, k, filters))
    if timings:
        click.echo(dumps({"stages_ms": watch.as_ms()}), err=True)
    if fmt == "json":
        click.echo(dumps([r.as_dict() for r in results]))
        return
    if fmt == "csv":
        rows = [{"query_sop_instance_uid": r.query.sop_instance_uid, **h.__dict__} for r in results for h in r.hits]
        click.echo(format_csv(rows, ["query_sop_instance_uid", *COLUMNS, "sop_instance_uid"]))
        return
    for r in results:
        q = r.query
        click.echo(f"query {q.accession_number or '-'} {q.patient_id or '-'} {q.laterality or '?'} {q.view or '?'}"
                   f"  {q.path}")
        click.echo(format_table([h.__dict__ for h in r.hits], COLUMNS) if r.hits else "  (no hits)")
        click.echo("")
    click.echo(SCORE_NOTE)
