from __future__ import annotations


import click

from mammo_retrieval.app.cli._common import dumps, progress_bar, workspace


@click.command()
@click.argument("archive_dir", type=click.Path(exists=True))
@click.option("--workers", type=int, default=None,
              help="Local: decode/preprocess processes (0: in this process). Dask: LocalCluster worker processes.")
@click.option("--executor", type=click.Choice(["local", "dask"]), default="local", show_default=True,
              help="dask: workers read, preprocess and embed; this process writes.")
@click.option("--scheduler", default=None, metavar="ADDRESS",
              help="With --executor dask: an existing cluster (tcp://host:8786); default: a LocalCluster.")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
@click.pass_context
def ingest(ctx: click.Context, archive_dir: str, workers: int | None, executor: str, scheduler: str | None,
           fmt: str, no_progress: bool) -> None:
    """Read, embed and index every mammogram under ARCHIVE_DIR (any file name, any depth).

    Paths are stored absolute. Files whose extension marks them as plainly not DICOM (.csv, .txt, .json,
    .png, .pdf, .db, ... see README) are skipped unread and counted as "skipped"; a folder that cannot be
    listed is recorded as a rejection (unreadable_folder). Exits 7 when ARCHIVE_DIR holds no candidate
    file at all, and 9 at once when another mretrieve process holds the write lock.
    """

    from mammo_retrieval.app.status import RANDOM_WEIGHTS_WARNING
    ws = workspace(ctx)
    with progress_bar("file", disable=no_progress) as progress:
        report = ws.ingest(archive_dir, workers=workers, executor=executor, scheduler=scheduler,
                           on_progress=progress)
    if fmt == "json":
        click.echo(dumps(report.as_dict()))
        return
    click.echo(f"ingested {report.ingested}, already present {report.already_present}, "
               f"rejected {len(report.rejected)} (of {report.files_seen} files, {report.seconds:.1f} s); "
               f"skipped {report.skipped} not DICOM by extension")
    click.echo(f"model {report.model_key}; index {report.index_type} with {report.index_ntotal} vectors")
    for r in report.rejected:
        click.echo(f"  rejected [{r.code}] {r.path}: {r.reason}")
    if report.random_weights:
        click.secho(f"WARNING: {RANDOM_WEIGHTS_WARNING}", fg="yellow", err=True)
