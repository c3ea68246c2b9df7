"""Search and QC results as Key Object Selection documents (see ``pacs.kos``): what each references, and
the text that carries ranks and scores."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable, TypeVar

from mammo_retrieval.core.errors import CredentialsRefused, NotFoundError, PacsError
from mammo_retrieval.pacs.kos import Reference, key_object_selection
from mammo_retrieval.storage.catalog import repository as repo

if TYPE_CHECKING:
    from pydicom import Dataset

    from mammo_retrieval.search.query import QueryResult
    from mammo_retrieval.storage.catalog import Database

logger = logging.getLogger(__name__)

T = TypeVar("T")

HeaderOf = Callable[[str], "Dataset"]  # SOPInstanceUID -> its DICOM header (read from its stored path)
GONE = (NotFoundError, PacsError)  # what reading an indexed image's header raises when its source is gone
# (refused credentials are not: CredentialsRefused, a PacsError, stops the documents instead)


def reference_of_header(header: "Dataset") -> Reference:
    return Reference(str(header.SOPClassUID), str(header.SOPInstanceUID), str(header.SeriesInstanceUID),
                     str(header.StudyInstanceUID), int(header.get("Rows") or 0), int(header.get("Columns") or 0))


def stored_reference(db: "Database", sop: str, header_of: HeaderOf) -> Reference:
    """An indexed image's reference from the catalog; an image stored before its SOP class was recorded
    (migration 0005) has its header read once from its stored path instead."""
    with db.session() as s:
        row = repo.image_by_sop(s, sop)
    if row is None:
        raise NotFoundError(f"no indexed image with SOPInstanceUID {sop}")
    if row.sop_class_uid and row.series_instance_uid and row.study_instance_uid:
        return Reference(row.sop_class_uid, sop, row.series_instance_uid, row.study_instance_uid, row.rows,
                         row.columns)
    return reference_of_header(header_of(sop))


def stored_references(db: "Database", sops: list[str], header_of: HeaderOf) -> list[Reference]:
    return [stored_reference(db, sop, header_of) for sop in sops]


def similar_cases_document(db: "Database", query_header: "Dataset", result: "QueryResult", model_key: str,
                           header_of: HeaderOf) -> "Dataset":
    """One KOS in the query image's study: the query image, then its hits in rank order; the text lists
    rank, score, SOPInstanceUID, laterality and view of each."""
    hits = result.hits
    references = [reference_of_header(query_header)] + stored_references(
        db, [h.sop_instance_uid for h in hits], header_of)
    lines = [f"mammo_retrieval similar cases (model {model_key}): the {len(hits)} indexed images most similar "
             f"to {query_header.SOPInstanceUID}; score is the cosine similarity of the embeddings (1 = identical)."]
    lines += [f"{h.rank}. score {h.score:.4f} {h.sop_instance_uid} {h.laterality or '?'} {h.view or '?'}"
              for h in hits]
    return key_object_selection(query_header, references, "\n".join(lines))


def qc_documents(db: "Database", header_of: HeaderOf, *, top: int, study: str | None = None) -> list["Dataset"]:
    """One KOS per study with flagged images in the latest sweep (its ``top`` outliers and any image with a
    header-check flag), or only ``study``'s: a document belongs to one patient, so a sweep across patients
    is never one. An image is referenced by its catalogued UIDs, so only the header a document copies its
    patient and study from is read: that of the study's first flagged image whose source can still be read
    (a study none of whose sources can be read has no document). Flagged images found gone on the way
    (deleted, moved, their PACS down) are left out with a warning; one after it is not checked, and stays
    referenced by its UIDs, which is all a KOS holds. The other documents are made either way."""
    with db.session() as s:
        sweep = repo.required_qc_sweep(s, top)
    flagged = [row for row in sweep.scores if row["rank"] <= top or row["flags"]]
    by_study: dict[str, list[dict]] = {}
    references: dict[str, Reference] = {}
    for row in flagged:
        reference = _unless_gone(lambda sop: stored_reference(db, sop, header_of), row["sop_instance_uid"])
        if reference is None:
            continue
        references[row["sop_instance_uid"]] = reference
        by_study.setdefault(reference.study_instance_uid, []).append(row)
    documents = []
    for study_uid, rows in by_study.items():
        if study is not None and study_uid != study:
            continue
        header, rows = _study_header(rows, header_of)
        if header is None:
            continue
        refs = [references[r["sop_instance_uid"]] for r in rows]
        lines = [f"mammo_retrieval QC sweep {sweep.run_id} ({sweep.method}, model {sweep.model_key}, "
                 f"{sweep.created_at}): images of this study among the {top} most outlying of {sweep.n_images}, "
                 f"or flagged by a header check. Rank 1 is the most outlying."]
        lines += [f"rank {r['rank']} score {r['score']:.4f} {r['sop_instance_uid']}"
                  + (f" flags {';'.join(r['flags'])}" if r["flags"] else "") for r in rows]
        documents.append(key_object_selection(header, refs, "\n".join(lines)))
    return documents


def _study_header(rows: list[dict], header_of: HeaderOf) -> tuple["Dataset | None", list[dict]]:
    """The header of the first of a study's flagged images whose source can be read, and the rows from
    that image on; the images found gone before it are left out with a warning."""
    for i, row in enumerate(rows):
        header = _unless_gone(header_of, row["sop_instance_uid"])
        if header is not None:
            return header, rows[i:]
    return None, []


def _unless_gone(read: Callable[[str], T], sop_instance_uid: str) -> T | None:
    """What `read` gives for a flagged image, or None, with a warning, when its source is gone (the image is
    left out); refused credentials are no image's fault and stop the documents."""
    try:
        return read(sop_instance_uid)
    except CredentialsRefused:
        raise
    except GONE as exc:
        logger.warning("QC KOS: flagged image %s left out: %s", sop_instance_uid, exc.message)
        return None
