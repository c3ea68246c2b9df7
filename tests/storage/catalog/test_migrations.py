import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from mammo_retrieval.storage.catalog import Database
from mammo_retrieval.storage.catalog.models import Base
from mammo_retrieval.core.errors import DatabaseError


def test_upgrade_head_builds_exactly_the_models(database_url):
    db = Database(database_url)
    assert db.upgrade() == db.head_revision()
    with db.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    assert {"images", "studies", "embeddings", "rejected_files", "model_versions", "qc_duplicates"} <= set(
        inspect(db.engine).get_table_names())


def test_empty_database_sets_itself_up(tmp_path):
    db = Database(f"sqlite:///{tmp_path}/sub/dir/m.db")
    db.ensure_schema()
    assert db.current_revision() == db.head_revision()


def test_outdated_schema_is_refused_with_the_fix(database_url):
    url = database_url
    Database(url).upgrade()
    with Database(url).engine.begin() as conn:  # as if written by an older release
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = '0000'")
    with pytest.raises(DatabaseError, match="schema is at revision 0000") as info:
        Database(url).ensure_schema()
    assert [r.action for r in info.value.remedies] == ["db_upgrade"]


def test_foreign_database_is_refused(database_url):
    url = database_url
    db = Database(url)
    with db.engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE patients (id INTEGER)")
    with pytest.raises(DatabaseError, match="no alembic version"):
        Database(url).ensure_schema()


def test_a_catalog_at_0006_with_crash_records_upgrades_and_counts_from_one(database_url):
    """Migration 0007 adds rejected_files.repeats (NOT NULL) to a table that already has rows: they count
    one rejection each, so a crasher recorded under 0006 is decoded again once before it can be skipped."""
    from alembic import command
    from sqlalchemy import text

    from mammo_retrieval.storage.catalog import repository as repo
    from mammo_retrieval.storage.catalog.database import alembic_config
    db = Database(database_url)
    with db.engine.begin() as conn:
        cfg = alembic_config(database_url)
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0006")
        conn.execute(text("INSERT INTO rejected_files (path, code, reason, rejected_at, fingerprint) "
                          "VALUES ('/a/x.dcm', 'worker_died', 'died', CURRENT_TIMESTAMP, 'f0')"))
    assert db.upgrade() == db.head_revision()
    with db.session() as s:
        assert repo.rejection_fingerprints(s, ["/a/x.dcm"], "worker_died") == {"/a/x.dcm": "f0"}
        assert repo.rejection_fingerprints(s, ["/a/x.dcm"], "worker_died", min_repeats=2) == {}
        repo.record_rejections(s, [("/a/x.dcm", "worker_died", "died", "f0")])
    with db.session() as s:
        assert repo.rejection_fingerprints(s, ["/a/x.dcm"], "worker_died", min_repeats=2) == {"/a/x.dcm": "f0"}
