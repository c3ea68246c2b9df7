from __future__ import annotations


from pathlib import Path

import click

from mammo_retrieval.app.cli._common import dumps, progress_bar, workspace


@click.command()
@click.argument("source")
@click.option("--workers", type=int, default=None,
              help="Local: decode/preprocess processes (0: in this process). Dask: LocalCluster worker processes.")
@click.option("--executor", type=click.Choice(["local", "dask"]), default="local", show_default=True,
              help="dask: workers read, preprocess and embed; this process writes.")
@click.option("--scheduler", default=None, metavar="ADDRESS",
              help="With --executor dask: an existing cluster (tcp://host:8786); default: a LocalCluster.")
@click.option("--study", "studies", multiple=True, metavar="UID",
              help="DICOMweb: only this StudyInstanceUID (repeatable).")
@click.option("--since", metavar="YYYYMMDD", help="DICOMweb: only studies from this StudyDate on.")
@click.option("--modality", default="MG", show_default=True,
              help="DICOMweb: studies with this modality among ModalitiesInStudy ('' for any).")
@click.option("--retry-rejected", is_flag=True,
              help="Decode again the files whose decoding process died on two earlier runs (skipped while unchanged).")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
@click.pass_context
def ingest(ctx: click.Context, source: str, workers: int | None, executor: str, scheduler: str | None,
           studies: tuple[str, ...], since: str | None, modality: str, retry_rejected: bool, fmt: str,
           no_progress: bool) -> None:
    """Read, embed and index every mammogram under SOURCE: a folder (any file name, any depth) or a
    DICOMweb base URL (http://host:8042/dicom-web), whose studies QIDO-RS finds and WADO-RS retrieves.

    A PACS's credentials come from the config or $MRETRIEVE_DICOMWEB_USERNAME/PASSWORD or _TOKEN, never
    from the command line. Instances already embedded are not retrieved again; one that keeps failing
    is recorded as a rejection (transfer_failed) and the pull goes on.

    Paths are stored absolute. Files whose extension marks them as plainly not DICOM (.csv, .txt, .json,
    .png, .pdf, .db, ... see README) are skipped unread and counted as "skipped"; a folder that cannot be
    listed is recorded as a rejection (unreadable_folder), and so is a broken or looping symbolic link
    (broken_link); linked folders are followed, each real folder walked once. A file whose decoding
    process dies (a decoder crash, out of memory) is retried alone and then rejected (worker_died); the
    run goes on. Once it has died on two runs, later runs reject it again without decoding while it is
    unchanged (size, modification and change times, inode; decoders' versions and read options) unless
    --retry-rejected (folders only). Exits 7 when SOURCE holds no candidate
    file (or study) at all, 9 at once when another mretrieve process holds the write lock, 12 when the
    PACS's search fails.
    """

    from mammo_retrieval.app.status import RANDOM_WEIGHTS_WARNING
    ws = workspace(ctx)
    from mammo_retrieval.pacs.dicomweb import is_dicomweb_url
    remote = is_dicomweb_url(source)
    if scheduler and executor != "dask":
        raise click.UsageError("--scheduler names a Dask cluster: add --executor dask")
    if not remote and not Path(source).exists():
        raise click.BadParameter(f"{source!r}: no such folder or file (nor an http(s):// DICOMweb URL)",
                                 param_hint="SOURCE")
    with progress_bar("study" if remote else "file", disable=no_progress) as progress:
        report = ws.ingest(source, workers=workers, executor=executor, scheduler=scheduler, studies=studies,
                           since=since, modality=modality or None, retry_rejected=retry_rejected,
                           on_progress=progress)
    if fmt == "json":
        click.echo(dumps(report.as_dict()))
        return
    click.echo(f"ingested {report.ingested}, already present {report.already_present}, "
               f"rejected {len(report.rejected)} (of {report.files_seen} files, {report.seconds:.1f} s); "
               + (f"skipped {report.skipped} not images by SOP class (reports, KOS, presentation states)" if remote
                  else f"skipped {report.skipped} not DICOM by extension")
               + (f"; retrieved {report.fetched} by WADO-RS" if remote else ""))
    click.echo(f"model {report.model_key}; index {report.index_type} with {report.index_ntotal} vectors")
    for r in report.rejected:
        click.echo(f"  rejected [{r.code}] {r.path}: {r.reason}")
    if report.random_weights:
        click.secho(f"WARNING: {RANDOM_WEIGHTS_WARNING}", fg="yellow", err=True)
