from __future__ import annotations

import click

from mammo_retrieval.app.cli._common import dumps, format_csv, format_table, workspace, write_or_send_kos
from mammo_retrieval.search.filters import LATERALITIES, VIEW_FILTERS


class AnyCase(click.Choice):
    """Values taken in any case and shown as the README and the page write them (click 8.2 shows a
    case-insensitive choice lower-cased)."""

    def __init__(self, choices: tuple[str, ...]) -> None:
        super().__init__(choices, case_sensitive=False)

    def get_metavar(self, param: click.Parameter, ctx: click.Context) -> str:
        return f"[{'|'.join(self.choices)}]"

COLUMNS = ["rank", "score", "accession_number", "patient_id", "laterality", "view", "path"]
# what "score" means, printed under the table (the index is inner product on unit vectors)
SCORE_NOTE = "score: cosine similarity of the unit-length embeddings, -1..1 (1 = identical; higher = more similar)"


@click.command()
@click.option("--dicom", "dicom_paths", type=click.Path(exists=True, dir_okay=False), multiple=True,
              help="Query by a DICOM file (repeat for several views of one study with --level study).")
@click.option("--accession", help="Query by an indexed study (image level: one search per image of the study).")
@click.option("--level", type=click.Choice(["image", "study"]), default="image", show_default=True,
              help="study: the k most similar studies, fused view by view.")
@click.option("--rule", type=click.Choice(["mean_pooled", "view_best_mean"]), default="mean_pooled",
              show_default=True, help="With --level study: how image similarities make a study's score.")
@click.option("-k", "k", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table")
@click.option("--exclude-same-patient", is_flag=True, help="Drop the query patient's own images.")
@click.option("--view", type=AnyCase(VIEW_FILTERS))
@click.option("--laterality", type=AnyCase(LATERALITIES))
@click.option("--kos", "kos_path", type=click.Path(dir_okay=False), default=None,
              help="Also write the query and its hits as a DICOM Key Object Selection document (image level, one query).")
@click.option("--stow", "stow_url", metavar="URL", default=None,
              help="Send that document to a PACS by STOW-RS (a DICOMweb base URL; credentials as for ingest).")
@click.option("--timings", is_flag=True, help="Print the time of each stage to stderr (JSON).")
@click.pass_context
def query(ctx: click.Context, dicom_paths: tuple[str, ...], accession: str | None, level: str, rule: str, k: int,
          fmt: str, exclude_same_patient: bool, view: str | None, laterality: str | None, kos_path: str | None,
          stow_url: str | None, timings: bool) -> None:
    """Print the k most similar indexed images (or studies, with --level study).

    --kos FILE writes the result as a DICOM Key Object Selection document (title "Of Interest"; ranks and
    scores in its text) in the query image's study; --stow URL sends it to a PACS."""
    from mammo_retrieval.search.query import QueryFilters
    from mammo_retrieval.core.timing import Stopwatch
    watch = Stopwatch()
    if bool(dicom_paths) == bool(accession):
        raise click.UsageError("give exactly one of --dicom or --accession")
    if (kos_path or stow_url) and (level == "study" or len(dicom_paths) > 1 or accession):
        raise click.UsageError("--kos and --stow take one image query: a single --dicom, at image level")
    if level == "study":
        if view or laterality:
            raise click.UsageError("--view and --laterality filter images; a study query matches every view")
        with watch.stage("workspace_open"):
            ws = workspace(ctx)
        options = {"rule": rule, "exclude_same_patient": exclude_same_patient, "watch": watch}
        result = (ws.search.query_study_files(list(dicom_paths), k, **options) if dicom_paths
                  else ws.search.similar_studies(accession, k, **options))
        if timings:
            click.echo(dumps({"stages_ms": watch.as_ms()}), err=True)
        _print_studies(result, fmt)
        return
    filters = QueryFilters(view=view.upper() if view else None, laterality=laterality.upper() if laterality else None,
                           exclude_same_patient=exclude_same_patient)
    with watch.stage("workspace_open"):
        ws = workspace(ctx)
    if kos_path or stow_url:
        result, document = ws.similar_kos(dicom_paths[0], k, filters=filters)
        results = [result]
        write_or_send_kos([document], kos_path, stow_url, ws, folder=False)
    else:
        results = ([ws.query_dicom(path, k, filters, watch) for path in dicom_paths] if dicom_paths
                   else ws.query_accession(accession, k, filters, watch))
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


STUDY_COLUMNS = ["rank", "score", "accession_number", "patient_id", "views_matched", "images", "study_key"]


def _print_studies(result, fmt: str) -> None:
    if fmt == "json":
        click.echo(dumps(result.as_dict()))
        return
    if fmt == "csv":
        rows = [{"rank": h.rank, "score": h.score, "study_key": h.study_key, "accession_number": h.accession_number,
                 "patient_id": h.patient_id, "views_matched": ";".join(h.views_matched),
                 "sop_instance_uid": i.sop_instance_uid, "laterality": i.laterality, "view": i.view,
                 "image_score": i.score, "path": i.path} for h in result.hits for i in h.images]
        click.echo(format_csv(rows, ["rank", "score", "study_key", "accession_number", "patient_id", "views_matched",
                                     "sop_instance_uid", "laterality", "view", "image_score", "path"]))
        return
    q = result.query
    click.echo(f"query study {q['study_key']} ({q['accession_number'] or '-'}, {q['patient_id'] or '-'}): "
               + ", ".join(f"{i['laterality'] or '?'} {i['view'] or '?'}" for i in q["images"]))
    rows = [{"rank": h.rank, "score": h.score, "accession_number": h.accession_number, "patient_id": h.patient_id,
             "views_matched": ", ".join(h.views_matched) or "none (scored over any view)",
             "images": len(h.images), "study_key": h.study_key} for h in result.hits]
    click.echo(format_table(rows, STUDY_COLUMNS) if rows else "  (no hits)")
    click.echo(f"\nrule {result.rule}: " + ("mean over the shared views of each query view's best cosine"
                                          if result.rule == "view_best_mean"
                                          else "cosine of the study vectors mean-pooled over the views both "
                                               "studies have"))
