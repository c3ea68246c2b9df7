"""Bulk writes: one statement each for studies, images and vectors however large the batch, images reused
by SOPInstanceUID, vector ids returned in the batch's order."""
import dataclasses

import numpy as np
from sqlalchemy import event, func, select

from mammo_retrieval.core.identity import ModelIdentity
from mammo_retrieval.dicom.header import HeaderFields
from mammo_retrieval.storage.catalog import Database
from mammo_retrieval.storage.catalog import repository as repo
from mammo_retrieval.storage.catalog.models import Embedding, Image, Study

BASE = HeaderFields(sop_instance_uid="1", study_instance_uid="9.1", series_instance_uid="9.2", accession_number="A1",
                    study_key="A1", study_key_source="accession", patient_id="P1", laterality="L",
                    laterality_source="ImageLaterality", view="CC", view_source="ViewPosition", manufacturer=None,
                    modality="MG", rows=10, columns=10, number_of_frames=1, photometric="MONOCHROME2",
                    transfer_syntax="1.2.840.10008.1.2.1")


def item(sop: str, study: str, value: float) -> repo.NewImage:
    header = dataclasses.replace(BASE, sop_instance_uid=sop, study_key=study, accession_number=study)
    return repo.NewImage(header, f"/a/{sop}.dcm", "0" * 64, 0, np.full(4, value, np.float32))


def test_bulk_write_reuses_images_and_keeps_the_order(database_url):
    db = Database(database_url)
    db.ensure_schema()
    identity = ModelIdentity("resnet18", "a" * 64, "b" * 16, 4, False, None)
    other = ModelIdentity("resnet18", "c" * 64, "b" * 16, 4, False, None)
    with db.session() as s:
        mv = repo.get_or_create_model_version(s, identity, {}).id
        mv2 = repo.get_or_create_model_version(s, other, {}).id
    statements = []
    event.listen(db.engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    batch = [item(str(i), f"S{i // 3}", i) for i in range(30)]
    with db.session() as s:
        ids = repo.write_images(s, batch, mv)
    inserts = [q for q in statements if q.lstrip().upper().startswith("INSERT")]
    assert len(inserts) <= 3 * 2  # studies, images, vectors (a driver may split a large executemany once)
    with db.session() as s:
        assert s.scalar(select(func.count(Image.id))) == 30 and s.scalar(select(func.count(Study.id))) == 10
        stored = dict(s.execute(select(Embedding.id, Embedding.vector)).all())
    assert [np.frombuffer(stored[i], np.float32)[0] for i in ids] == list(range(30))
    # the same images under another model version: no new image or study rows, vectors in order again
    with db.session() as s:
        again = repo.write_images(s, list(reversed(batch[:5])), mv2)
        assert s.scalar(select(func.count(Image.id))) == 30 and s.scalar(select(func.count(Study.id))) == 10
        vectors = dict(s.execute(select(Embedding.id, Embedding.vector).where(Embedding.id.in_(again))).all())
    assert [np.frombuffer(vectors[i], np.float32)[0] for i in again] == [4, 3, 2, 1, 0]


def test_crash_records_count_repeats_and_are_found_across_in_list_chunks(database_url):
    """rejection_fingerprints: only the code asked for, only fingerprinted rows, only those rejected the
    same way at least ``min_repeats`` times in a row; 1,200 paths cross the 500-value IN chunks; nothing
    recorded answers {} (the early exit). On SQLite and PostgreSQL (the 40-character fingerprint column)."""
    db = Database(database_url)
    db.ensure_schema()
    paths = [f"/archive/{i:04d}.dcm" for i in range(1200)]
    with db.session() as s:
        assert repo.rejection_fingerprints(s, paths, "worker_died") == {}
    crashers = {p: f"{i:040x}" for i, p in enumerate(paths) if i % 250 == 7}  # in three different chunks
    rows = [(p, "worker_died", "died", f) for p, f in crashers.items()]
    rows += [(paths[8], "truncated_pixel_data", "short", None), (paths[9], "worker_died", "died", None)]
    with db.session() as s:
        repo.record_rejections(s, rows)
    with db.session() as s:
        assert repo.rejection_fingerprints(s, paths, "worker_died") == crashers
        assert repo.rejection_fingerprints(s, paths, "worker_died", min_repeats=2) == {}
        assert repo.rejection_fingerprints(s, paths, "truncated_pixel_data") == {}  # no fingerprint
    first, second = list(crashers)[:2]
    with db.session() as s:  # died again, unchanged; the second one changed before it died again
        repo.record_rejections(s, [(first, "worker_died", "died", crashers[first]),
                                   (second, "worker_died", "died", "f" * 40)])
    with db.session() as s:
        assert repo.rejection_fingerprints(s, paths, "worker_died", min_repeats=2) == {first: crashers[first]}
    with db.session() as s:  # rejected another way in between: the count starts again
        repo.record_rejections(s, [(first, "truncated_pixel_data", "short", None)])
        repo.record_rejections(s, [(first, "worker_died", "died", crashers[first])])
    with db.session() as s:
        assert repo.rejection_fingerprints(s, paths, "worker_died", min_repeats=2) == {}
        repo.clear_rejections(s, paths)
    with db.session() as s:
        assert repo.rejection_fingerprints(s, paths, "worker_died") == {}


def test_records_of_more_vectors_than_one_statement_may_bind(database_url):
    """A filtered query widens its fetch up to the whole index: 70,000 vector ids are more than a
    statement may bind on PostgreSQL (65,535) or an SQLite built with the default limit (32,766; Debian's
    allows 250,000), so they are looked up in chunks."""
    db = Database(database_url)
    db.ensure_schema()
    identity = ModelIdentity("resnet18", "a" * 64, "b" * 16, 4, False, None)
    with db.session() as s:
        mv = repo.get_or_create_model_version(s, identity, {}).id
        ids = repo.write_images(s, [item(str(i), f"S{i}", i) for i in range(3)], mv)
    asked = list(range(1, 70_001)) + [ids[2]]
    with db.session() as s:
        found = repo.records_by_vector_ids(s, asked)
    assert sorted(found) == sorted(ids) and found[ids[2]].sop_instance_uid == "2"
