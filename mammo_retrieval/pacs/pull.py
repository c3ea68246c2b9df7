"""Ingest from a DICOMweb PACS: QIDO-RS finds the studies and their instances, instances already embedded
are skipped before any retrieval (identity is the SOPInstanceUID), the rest are retrieved with WADO-RS a
few at a time, in parallel, and go down the same pipeline as files of a folder (the header screen, prepare,
embed, write), so a pull and a folder ingest of the same files store the same vectors. Only
``fetch_batch`` instances are ever held in memory; nothing is written to disk but the cache.

A study whose instance list, or an instance whose retrieval, keeps failing after the retries is recorded
as a rejection (``transfer_failed``, its URL as the path) and the pull goes on; a rerun tries it again.
"""
from __future__ import annotations

import logging
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import TYPE_CHECKING, Callable

from mammo_retrieval.core.errors import RejectionCode
from mammo_retrieval.pacs.dicomweb import DicomWebClient, RemoteInstance, TransferFailed
from mammo_retrieval.pipeline.prepare import Rejected
from mammo_retrieval.pipeline.runner import CatalogSink, IngestReport, PrepareJob, run_pipeline
from mammo_retrieval.storage.catalog import repository as repo

if TYPE_CHECKING:
    from mammo_retrieval.encoders import Encoder
    from mammo_retrieval.pipeline.threads import EncoderThreads

logger = logging.getLogger(__name__)


def _not_embedded(sink: CatalogSink, instances: list[RemoteInstance]) -> list[RemoteInstance]:
    with sink.db.session() as s:
        known = repo.embedded_sops(s, (i.sop_uid for i in instances), sink.model_version_id)
    return [i for i in instances if i.sop_uid not in known]


def _retrieve_all(client: DicomWebClient, pool: ThreadPoolExecutor, chunk: list[RemoteInstance],
                  report: IngestReport) -> tuple[list, list[Rejected]]:
    fetched, failed = [], []
    for instance, future in [(i, pool.submit(client.retrieve, i)) for i in chunk]:
        try:
            fetched.append(future.result())
        except TransferFailed as exc:
            failed.append(Rejected.of(instance.url, RejectionCode.TRANSFER_FAILED, exc.reason))
    report.fetched += len(fetched)
    return fetched, failed


def pull(client: DicomWebClient, studies: list[str], job: PrepareJob, executor: Executor, encoder: "Encoder",
         sink: CatalogSink, threads: "EncoderThreads", report: IngestReport, *, batch_size: int, workers: int,
         on_progress: Callable[[int, int], None] | None = None) -> None:
    """Ingest every instance of ``studies`` (StudyInstanceUIDs) from ``client``'s PACS into ``sink``."""
    cfg = client.cfg
    done_studies = 0
    with ThreadPoolExecutor(max(1, cfg.fetch_connections), thread_name_prefix="wado") as connections:
        for study in studies:
            try:
                instances = client.search_instances(study)
            except TransferFailed as exc:
                failure = Rejected.of(client.study_url(study), RejectionCode.TRANSFER_FAILED, exc.reason)
                report.rejected.append(failure)
                sink.reject([failure])
                logger.warning("study %s skipped: %s", client.study_url(study), exc.reason)
                continue
            sink.clear_rejections([client.study_url(study)])  # it lists again
            not_images = [i for i in instances if not i.is_image]  # reports, KOS (ours too), presentation states
            report.skipped += len(not_images)
            instances = [i for i in instances if i.is_image]
            report.files_seen += len(instances)
            todo = _not_embedded(sink, instances)
            waiting = {i.sop_uid for i in todo}
            present = [i.url for i in instances if i.sop_uid not in waiting]
            report.already_present += len(present)
            sink.clear_rejections(present)
            for start in range(0, len(todo), max(1, cfg.fetch_batch)):
                fetched, failed = _retrieve_all(client, connections, todo[start:start + cfg.fetch_batch], report)
                report.rejected.extend(failed)
                if fetched:
                    run_pipeline(fetched, job, executor, encoder, sink, threads, report, batch_size=batch_size,
                                 workers=workers, preceding=failed)
                else:
                    sink.reject(failed)
            done_studies += 1
            if on_progress:
                on_progress(done_studies, len(studies))
