from __future__ import annotations

from pathlib import Path

import click

from mammo_retrieval.app.cli._common import StepProgress, no_progress_option, workspace, write_or_send_kos


@click.command()
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Folder for the outputs.")
@click.option("--method", type=click.Choice(["knn", "lof", "iforest"]), default="knn", show_default=True)
@click.option("--top", type=click.IntRange(min=1), default=50, show_default=True, help="Outliers in the report.")
@click.option("-k", "k", type=click.IntRange(min=1), default=10, show_default=True, help="Neighbours per image.")
@click.option("--dup-threshold", type=float, default=0.999, show_default=True,
              help="Cosine at or above which two different images are a near-duplicate pair.")
@click.option("--min-pixel-correlation", type=float, default=0.98, show_default=True,
              help="Also require this correlation of the cached images for a duplicate pair.")
@click.option("--no-pixel-checks", is_flag=True,
              help="Vectors only: skip the header checks and the duplicate pixel gate (no cached images needed).")
@click.option("--kos", "kos_dir", type=click.Path(file_okay=False), default=None,
              help="Also write the flagged images (the --top outliers and header-check flags) as DICOM Key Object "
                   "Selection documents, one per study, into this folder.")
@click.option("--stow", "stow_url", metavar="URL", default=None,
              help="Send those documents to a PACS by STOW-RS (a DICOMweb base URL).")
@no_progress_option
@click.pass_context
def qc(ctx: click.Context, out_dir: str, method: str, top: int, k: int, dup_threshold: float,
       min_pixel_correlation: float, no_pixel_checks: bool, kos_dir: str | None, stow_url: str | None,
       no_progress: bool) -> None:
    """Outlier sweep: scores.csv, duplicates.csv and report.html (thumbnails) in --out."""
    from mammo_retrieval.analysis.qc import run_qc, write_outputs
    ws = workspace(ctx)
    corpus = ws.corpus()
    with StepProgress("qc", enabled=not no_progress) as progress:
        result = run_qc(corpus, method=method, k=k, dup_threshold=dup_threshold,
                        min_pixel_correlation=None if no_pixel_checks else min_pixel_correlation,
                        header_checks=not no_pixel_checks, record=False, on_progress=progress)
        paths = write_outputs(ws.cached_image, result, Path(out_dir), top, on_progress=progress, record_in=corpus)
    flagged = int((result.scores["flags"] != "").sum())
    click.echo(f"scored {len(result.scores)} images ({method}, {result.neighbours_method}); "
               f"{len(result.duplicates)} near-duplicate pairs; {flagged} header-check flags")
    for r in result.scores.head(min(top, 10)).itertuples():
        click.echo(f"  #{r.rank} {r.score:.4f} {r.path}{'  [' + r.flags + ']' if r.flags else ''}")
    for name, path in paths.items():
        click.echo(f"{name}: {path}")
    if kos_dir or stow_url:
        write_or_send_kos(ws.qc_kos(top), kos_dir, stow_url, ws, folder=True)
