"""Queries and writes used by ingest, query and status. Each function takes an open Session."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np
from sqlalchemy import delete, func, insert, select
from sqlalchemy.orm import Session

from mammo_retrieval.core.errors import NotFoundError, Remedy
from mammo_retrieval.dicom.header import HeaderFields
from mammo_retrieval.storage.catalog.models import (Embedding, Image, ModelVersion, QcDuplicate, QcRun, QcScore,
                                                   RejectedFile, Study)


@dataclass(frozen=True)
class ImageRecord:
    """What a query result shows about one image."""

    image_id: int
    vector_id: int
    sop_instance_uid: str
    accession_number: str | None
    study_key: str
    patient_id: str | None
    laterality: str | None
    view: str | None
    path: str


@dataclass(frozen=True)
class NewImage:
    header: HeaderFields
    path: str
    sha256: str
    frame_index: int
    vector: np.ndarray
    frames: tuple[int, ...] = ()  # the frames pooled into the vector (a tomosynthesis volume)


def get_or_create_model_version(session: Session, identity, preprocess_json: dict) -> ModelVersion:
    mv = session.scalar(select(ModelVersion).where(ModelVersion.key == identity.key))
    if mv is None:
        mv = ModelVersion(key=identity.key, encoder=identity.encoder, weights_sha256=identity.weights_sha256,
                          weights_path=identity.weights_path, random_weights=identity.random_weights,
                          preprocess_digest=identity.preprocess_digest,
                          preprocess_json=json.dumps(preprocess_json, sort_keys=True), dim=identity.dim)
        session.add(mv)
        session.flush()
    return mv


def model_version_id_by_key(session: Session, key: str) -> int | None:
    return session.scalar(select(ModelVersion.id).where(ModelVersion.key == key))


IN_CHUNK = 500  # values per SQL IN (...): well under SQLite's bound-parameter limit


def _chunks(values: list) -> Iterator[list]:
    for start in range(0, len(values), IN_CHUNK):
        yield values[start:start + IN_CHUNK]


def embedded_sops(session: Session, sop_uids: Iterable[str], model_version_id: int) -> set[str]:
    """Which of these SOPInstanceUIDs already have a vector from this model version."""
    found: set[str] = set()
    for chunk in _chunks(list(set(sop_uids))):
        found.update(session.scalars(
            select(Image.sop_instance_uid).join(Embedding, Embedding.image_id == Image.id)
            .where(Image.sop_instance_uid.in_(chunk), Embedding.model_version_id == model_version_id)))
    return found


def _insert_missing(session: Session, model, rows: list[dict], key: str) -> None:
    """INSERT ... ON CONFLICT (key) DO NOTHING, one statement for all rows: no per-row round trip, and two
    writers inserting the same study or image never fail or double it (the unique constraint decides)."""
    if not rows:
        return
    dialect = session.get_bind().dialect.name
    if dialect in ("sqlite", "postgresql"):
        from importlib import import_module
        insert_for = import_module(f"sqlalchemy.dialects.{dialect}").insert
        session.execute(insert_for(model).on_conflict_do_nothing(index_elements=[key]), rows)
        return
    column = getattr(model, key)
    present = set(session.scalars(select(column).where(column.in_([r[key] for r in rows]))))
    missing = [r for r in rows if r[key] not in present]
    if missing:
        session.execute(insert(model), missing)


def _ids_by(session: Session, model, key: str, values: list[str]) -> dict[str, int]:
    column = getattr(model, key)
    found: dict[str, int] = {}
    for start in range(0, len(values), 500):
        found.update(session.execute(select(column, model.id).where(column.in_(values[start:start + 500]))).all())
    return found


def write_images(session: Session, items: Sequence[NewImage], model_version_id: int) -> list[int]:
    """Insert images (or reuse one with the same SOPInstanceUID) and their vectors in bulk: one statement
    each for studies, images and vectors, whatever the batch size. Returns vector ids in ``items`` order."""
    if not items:
        return []
    studies: dict[str, dict] = {}
    for item in items:
        h = item.header
        studies.setdefault(h.study_key, {
            "study_key": h.study_key, "key_source": h.study_key_source, "accession_number": h.accession_number,
            "study_instance_uid": h.study_instance_uid or None, "patient_id": h.patient_id or None})
    _insert_missing(session, Study, list(studies.values()), "study_key")
    study_ids = _ids_by(session, Study, "study_key", list(studies))
    images: dict[str, dict] = {}
    for item in items:
        h = item.header
        images.setdefault(h.sop_instance_uid, {
            "sop_instance_uid": h.sop_instance_uid, "sop_class_uid": h.sop_class_uid or None,
            "series_instance_uid": h.series_instance_uid or None,
            "study_instance_uid": h.study_instance_uid or None, "study_id": study_ids[h.study_key],
            "patient_id": h.patient_id or None, "laterality": h.laterality,
            "laterality_source": h.laterality_source, "view": h.view, "view_source": h.view_source,
            "manufacturer": h.manufacturer, "path": item.path, "sha256": item.sha256, "rows": h.rows,
            "columns": h.columns, "number_of_frames": h.number_of_frames, "frame_index": item.frame_index,
            "frames_used": json.dumps(list(item.frames)) if len(item.frames) > 1 else None,
            "photometric": h.photometric, "transfer_syntax": h.transfer_syntax})
    _insert_missing(session, Image, list(images.values()), "sop_instance_uid")
    image_ids = _ids_by(session, Image, "sop_instance_uid", list(images))
    session.execute(insert(Embedding), [
        {"image_id": image_ids[item.header.sop_instance_uid], "model_version_id": model_version_id,
         "vector": np.ascontiguousarray(item.vector, dtype=np.float32).tobytes()} for item in items])
    # (image, model version) is unique, so one select maps the new vectors back (RETURNING with a kept
    # order would go row by row on SQLite)
    wanted = [image_ids[item.header.sop_instance_uid] for item in items]
    vector_of_image: dict[int, int] = {}
    for start in range(0, len(wanted), 500):
        vector_of_image.update(session.execute(
            select(Embedding.image_id, Embedding.id).where(Embedding.model_version_id == model_version_id,
                                                           Embedding.image_id.in_(wanted[start:start + 500]))).all())
    vector_ids = [vector_of_image[image_id] for image_id in wanted]
    session.execute(delete(RejectedFile).where(RejectedFile.path.in_([i.path for i in items])))
    return vector_ids


def add_embeddings(session: Session, rows: Iterable[tuple[int, np.ndarray]], model_version_id: int) -> list[int]:
    """Vectors of another model version for images already stored (reindex)."""
    embeddings = [Embedding(image_id=int(image_id), model_version_id=model_version_id,
                            vector=np.ascontiguousarray(vector, dtype=np.float32).tobytes())
                  for image_id, vector in rows]
    session.add_all(embeddings)
    session.flush()
    return [e.id for e in embeddings]


def record_rejections(session: Session, rejections: Iterable[tuple[str, str, str, str | None]]) -> None:
    """(path, code, reason, fingerprint or None); a file rejected again keeps one row with the latest, and
    ``repeats`` counts the rejections in a row with the same code and fingerprint."""
    for path, code, reason, fingerprint in rejections:
        row = session.scalar(select(RejectedFile).where(RejectedFile.path == path))
        if row is None:
            session.add(RejectedFile(path=path, code=code, reason=reason, fingerprint=fingerprint, repeats=1))
        else:
            same = fingerprint is not None and (row.code, row.fingerprint) == (code, fingerprint)
            row.repeats = (row.repeats or 1) + 1 if same else 1
            row.code, row.reason, row.fingerprint = code, reason, fingerprint


def rejection_fingerprints(session: Session, paths: list[str], code: str, min_repeats: int = 1) -> dict[str, str]:
    """path -> recorded fingerprint, for those of ``paths`` rejected with ``code`` and a fingerprint at least
    ``min_repeats`` times in a row. One cheap query first: a catalog with no such rejection (the usual
    case) is not searched path by path."""
    fingerprinted = (RejectedFile.code == code, RejectedFile.fingerprint.is_not(None),
                     RejectedFile.repeats >= min_repeats)
    if session.scalar(select(RejectedFile.id).where(*fingerprinted).limit(1)) is None:
        return {}
    found: dict[str, str] = {}
    for chunk in _chunks(paths):
        found.update(session.execute(select(RejectedFile.path, RejectedFile.fingerprint)
                                     .where(RejectedFile.path.in_(chunk), *fingerprinted)).all())
    return found


def clear_rejections(session: Session, paths: Iterable[str]) -> None:
    for chunk in _chunks(list(paths)):
        session.execute(delete(RejectedFile).where(RejectedFile.path.in_(chunk)))


def iter_vectors(session: Session, model_version_id: int, dim: int, after_id: int = 0,
                 chunk: int = 4096) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Stream (ids, vectors) of one model version in id order, a chunk at a time (bounded memory)."""
    last = after_id
    while True:
        rows = session.execute(
            select(Embedding.id, Embedding.vector).where(Embedding.model_version_id == model_version_id,
                                                         Embedding.id > last)
            .order_by(Embedding.id).limit(chunk)).all()
        if not rows:
            return
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        vectors = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), dim)
        yield ids, vectors
        last = int(ids[-1])


def iter_image_vectors_missing_from(session: Session, source_mv_id: int, target_mv_id: int, dim: int,
                                    chunk: int = 4096) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Stream (image ids, vectors) of ``source_mv_id`` for images that have no vector of ``target_mv_id``
    yet (a reindex that maps stored vectors, resumable), in image id order."""
    last = 0
    while True:
        done = select(Embedding.image_id).where(Embedding.model_version_id == target_mv_id)
        rows = session.execute(
            select(Embedding.image_id, Embedding.vector).where(Embedding.model_version_id == source_mv_id,
                                                               Embedding.image_id > last,
                                                               Embedding.image_id.not_in(done))
            .order_by(Embedding.image_id).limit(chunk)).all()
        if not rows:
            return
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        yield ids, np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), dim)
        last = int(ids[-1])


def sample_vectors(session: Session, model_version_id: int, dim: int, n: int, seed: int = 0) -> np.ndarray:
    """A uniform sample of n vectors (for training IVF centroids) without loading all of them."""
    ids = np.array(session.scalars(select(Embedding.id).where(Embedding.model_version_id == model_version_id)).all())
    if len(ids) > n:
        ids = np.sort(np.random.default_rng(seed).choice(ids, size=n, replace=False))
    out = np.empty((len(ids), dim), dtype=np.float32)
    for start in range(0, len(ids), 4096):
        chunk = ids[start:start + 4096].tolist()
        rows = dict(session.execute(select(Embedding.id, Embedding.vector).where(Embedding.id.in_(chunk))).all())
        for i, vid in enumerate(chunk):
            out[start + i] = np.frombuffer(rows[vid], dtype=np.float32)
    return out


def vectors_by_ids(session: Session, model_version_id: int, vector_ids: np.ndarray,
                   dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids found, their vectors) of one model version, for re-scoring approximate candidates exactly."""
    ids = [int(v) for v in vector_ids]
    rows = []
    for start in range(0, len(ids), 4096):  # SQLite allows 32,766 parameters a statement
        rows += session.execute(select(Embedding.id, Embedding.vector).where(
            Embedding.model_version_id == model_version_id, Embedding.id.in_(ids[start:start + 4096]))).all()
    found = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
    vectors = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), dim)
    return found, vectors


def embedding_stats(session: Session, model_version_id: int) -> tuple[int, int]:
    """(count, max id) of one model version's vectors."""
    count, max_id = session.execute(select(func.count(Embedding.id), func.max(Embedding.id))
                                    .where(Embedding.model_version_id == model_version_id)).one()
    return int(count or 0), int(max_id or 0)


def _record_query():
    return (select(Image.id, Embedding.id, Image.sop_instance_uid, Study.accession_number, Study.study_key,
                   Image.patient_id, Image.laterality, Image.view, Image.path)
            .join(Study, Study.id == Image.study_id).join(Embedding, Embedding.image_id == Image.id))


def records_by_vector_ids(session: Session, vector_ids: Sequence[int]) -> dict[int, ImageRecord]:
    ids = [int(v) for v in vector_ids]
    rows = [row for chunk in _chunks(ids) for row in session.execute(_record_query().where(Embedding.id.in_(chunk)))]
    return {r[1]: ImageRecord(*r) for r in rows}


def records_for_study(session: Session, study_key: str, model_version_id: int) -> list[ImageRecord]:
    rows = session.execute(_record_query().where(
        (Study.study_key == study_key) | (Study.accession_number == study_key),
        Embedding.model_version_id == model_version_id).order_by(Image.laterality, Image.view, Image.id)).all()
    return [ImageRecord(*r) for r in rows]


def studies_with_vectors(session: Session, keys: Sequence[str], model_version_id: int, dim: int) -> list[tuple]:
    """Every image of these studies (by study key, or AccessionNumber) that has a vector of this model:
    (study_key, accession, study UID, patient, SOPInstanceUID, laterality, view, path, vector), by study."""
    keys = list(dict.fromkeys(keys))
    rows: list[tuple] = []
    for start in range(0, len(keys), 500):
        chunk = keys[start:start + 500]
        rows += session.execute(
            select(Study.study_key, Study.accession_number, Study.study_instance_uid, Image.patient_id,
                   Image.sop_instance_uid, Image.laterality, Image.view, Image.path, Embedding.vector)
            .join(Image, Image.study_id == Study.id).join(Embedding, Embedding.image_id == Image.id)
            .where(Embedding.model_version_id == model_version_id,
                   Study.study_key.in_(chunk) | Study.accession_number.in_(chunk))
            .order_by(Study.study_key, Image.laterality, Image.view, Image.id)).all()
    return [(*r[:8], np.frombuffer(r[8], dtype=np.float32).reshape(dim)) for r in rows]


def record_by_sop(session: Session, sop_uid: str, model_version_id: int) -> ImageRecord | None:
    row = session.execute(_record_query().where(Image.sop_instance_uid == sop_uid,
                                                Embedding.model_version_id == model_version_id)).first()
    return ImageRecord(*row) if row else None


def vector_of(session: Session, vector_id: int, dim: int) -> np.ndarray:
    blob = session.scalar(select(Embedding.vector).where(Embedding.id == vector_id))
    return np.frombuffer(blob, dtype=np.float32).reshape(1, dim)


def image_by_sop(session: Session, sop_uid: str) -> Image | None:
    return session.scalar(select(Image).where(Image.sop_instance_uid == sop_uid))


def counts(session: Session) -> dict[str, int]:
    return {
        "images": session.scalar(select(func.count(Image.id))) or 0,
        "studies": session.scalar(select(func.count(Study.id))) or 0,
        "studies_keyed_by_study_uid": session.scalar(select(func.count(Study.id)).where(
            Study.key_source == "study_uid")) or 0,
        "embeddings": session.scalar(select(func.count(Embedding.id))) or 0,
        "rejected_files": session.scalar(select(func.count(RejectedFile.id))) or 0,
    }


def rejected_files(session: Session, limit: int | None = None) -> list[RejectedFile]:
    q = select(RejectedFile).order_by(RejectedFile.path)
    return list(session.scalars(q.limit(limit) if limit else q))


def model_versions(session: Session) -> list[tuple[ModelVersion, int]]:
    rows = session.execute(select(ModelVersion, func.count(Embedding.id))
                           .outerjoin(Embedding, Embedding.model_version_id == ModelVersion.id)
                           .group_by(ModelVersion.id).order_by(ModelVersion.id)).all()
    return [(mv, int(n)) for mv, n in rows]


# --- reads and writes of the analyses, training and reindex (all SQL stays in this module) -------------
EMBEDDING_TABLE_COLUMNS = ["vector_id", "image_id", "sop_instance_uid", "accession_number", "study_key",
                           "study_instance_uid", "series_instance_uid", "patient_id", "laterality", "view",
                           "manufacturer", "path", "rows", "columns", "photometric", "transfer_syntax"]


def embedding_table_rows(session: Session, model_version_id: int) -> list[tuple]:
    """One row per vector of this model version (EMBEDDING_TABLE_COLUMNS), in vector-id order."""
    return list(session.execute(
        select(Embedding.id, Image.id, Image.sop_instance_uid, Study.accession_number, Study.study_key,
               Image.study_instance_uid, Image.series_instance_uid, Image.patient_id, Image.laterality,
               Image.view, Image.manufacturer, Image.path, Image.rows, Image.columns, Image.photometric,
               Image.transfer_syntax)
        .join(Image, Image.id == Embedding.image_id).join(Study, Study.id == Image.study_id)
        .where(Embedding.model_version_id == model_version_id).order_by(Embedding.id)).all())


def images_with_patients(session: Session) -> list[tuple[int, str, str | None]]:
    """(image id, SOPInstanceUID, PatientID) of every stored image, in id order."""
    return [tuple(r) for r in session.execute(
        select(Image.id, Image.sop_instance_uid, Image.patient_id).order_by(Image.id)).all()]


def previous_qc_ranks(session: Session, model_version_id: int | None, method: str
                      ) -> tuple[int | None, dict[int, int]]:
    """The newest stored sweep of this model and method: (its run id, its rank of each image id), or
    (None, {})."""
    previous = session.scalar(select(QcRun).where(QcRun.model_version_id == model_version_id,
                                                  QcRun.method == method).order_by(QcRun.id.desc()).limit(1))
    if previous is None:
        return None, {}
    return previous.id, dict(session.execute(select(QcScore.image_id, QcScore.rank)
                                             .where(QcScore.run_id == previous.id)).all())


def record_qc_run(session: Session, model_version_id: int | None, method: str, params_json: str,
                  scores: Iterable[tuple[int, float, int, str | None]],
                  duplicates: Iterable[tuple[int, int, float, float | None]] = ()
                  ) -> tuple[int, int | None, dict[int, int]]:
    """Store a sweep's (image id, score, rank, flags) and its near-duplicate pairs (image id a, image id b,
    cosine, pixel correlation); returns (run id, previous run id, previous ranks)."""
    previous_id, previous_ranks = previous_qc_ranks(session, model_version_id, method)
    rows = list(scores)
    run = QcRun(model_version_id=model_version_id, method=method, params_json=params_json, n_images=len(rows))
    session.add(run)
    session.flush()
    session.execute(insert(QcScore), [{"run_id": run.id, "image_id": image_id, "score": score, "rank": rank,
                                       "flags": flags} for image_id, score, rank, flags in rows])
    pairs = {(min(a, b), max(a, b)): (sim, corr) for a, b, sim, corr in duplicates}
    if pairs:
        session.execute(insert(QcDuplicate), [{"run_id": run.id, "image_a_id": a, "image_b_id": b, "similarity": sim,
                                               "pixel_correlation": corr} for (a, b), (sim, corr) in pairs.items()])
    return run.id, previous_id, previous_ranks


@dataclass(frozen=True)
class QcSweep:
    """The latest sweep of one model, as a server shows it."""
    run_id: int
    previous_run_id: int | None
    model_key: str
    method: str
    params: dict
    n_images: int
    created_at: str
    scores: list[dict]      # best first: rank, score, flags, previous_rank, and the image's record fields
    duplicates: list[dict]  # similarity, pixel_correlation, a and b (record fields)


def _image_fields(session: Session, image_ids: set[int]) -> dict[int, dict]:
    if not image_ids:
        return {}
    rows = session.execute(select(Image.id, Image.sop_instance_uid, Study.accession_number, Image.patient_id,
                                  Image.laterality, Image.view, Image.path)
                           .join(Study, Study.id == Image.study_id).where(Image.id.in_(image_ids))).all()
    return {r[0]: {"sop_instance_uid": r[1], "accession_number": r[2], "patient_id": r[3], "laterality": r[4],
                   "view": r[5], "path": r[6]} for r in rows}


def latest_qc_sweep(session: Session, top: int | None = None) -> QcSweep | None:
    """The newest sweep (of whichever model ran it), its ``top`` scores and flagged images, all its duplicate
    pairs, and the ranks of the previous sweep of the same model and method."""
    run = session.scalar(select(QcRun).order_by(QcRun.id.desc()).limit(1))
    if run is None:
        return None
    model_version_id = run.model_version_id
    previous = session.scalar(select(QcRun.id).where(QcRun.model_version_id == model_version_id,
                                                     QcRun.method == run.method, QcRun.id < run.id)
                              .order_by(QcRun.id.desc()).limit(1))
    query = select(QcScore.image_id, QcScore.score, QcScore.rank, QcScore.flags).where(
        QcScore.run_id == run.id).order_by(QcScore.rank)
    scores = session.execute(query.limit(top) if top else query).all()
    flagged = session.execute(select(QcScore.image_id, QcScore.score, QcScore.rank, QcScore.flags).where(
        QcScore.run_id == run.id, QcScore.flags.is_not(None), QcScore.flags != "").order_by(QcScore.rank)).all()
    seen = {r[0] for r in scores}
    scores = list(scores) + [r for r in flagged if r[0] not in seen]
    pairs = session.execute(select(QcDuplicate.image_a_id, QcDuplicate.image_b_id, QcDuplicate.similarity,
                                   QcDuplicate.pixel_correlation).where(QcDuplicate.run_id == run.id)
                            .order_by(QcDuplicate.similarity.desc())).all()
    previous_ranks = dict(session.execute(select(QcScore.image_id, QcScore.rank).where(
        QcScore.run_id == previous, QcScore.image_id.in_([r[0] for r in scores]))).all()) if previous else {}
    fields = _image_fields(session, {r[0] for r in scores} | {p[0] for p in pairs} | {p[1] for p in pairs})
    return QcSweep(
        run_id=run.id, previous_run_id=previous,
        model_key=session.scalar(select(ModelVersion.key).where(ModelVersion.id == model_version_id)) or "",
        method=run.method, params=json.loads(run.params_json),
        n_images=run.n_images, created_at=run.created_at.isoformat(),
        scores=[{"rank": rank, "score": score, "flags": [f for f in (flags or "").split(";") if f],
                 "previous_rank": previous_ranks.get(image_id), **fields.get(image_id, {})}
                for image_id, score, rank, flags in scores],
        duplicates=[{"similarity": sim, "pixel_correlation": corr, "a": fields.get(a, {}), "b": fields.get(b, {})}
                    for a, b, sim, corr in pairs])


def required_qc_sweep(session: Session, top: int | None = None) -> QcSweep:
    """``latest_qc_sweep``, or a NotFoundError whose remedy is the QC operation (one wording for every caller)."""
    sweep = latest_qc_sweep(session, top)
    if sweep is None:
        raise NotFoundError("no QC sweep yet", remedies=[Remedy("run a QC sweep", "qc")])
    return sweep


def images_with_paths(session: Session) -> list[tuple[int, str, str]]:
    """(image id, SOPInstanceUID, path) of every stored image, in id order."""
    return [tuple(r) for r in session.execute(
        select(Image.id, Image.sop_instance_uid, Image.path).order_by(Image.id)).all()]
