"""#9 item 14 and "status looks healthy with a corrupt index file": damaged state gives one clear line through
the CLI (exit code, the file, the fix), never a traceback, and `status` still reports what it can."""
from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner

from mammo_retrieval.app.workspace import Workspace
from mammo_retrieval.storage.cache import CacheCorruptError
from mammo_retrieval.app.cli import cli
from mammo_retrieval.core.errors import DatabaseError, IndexCorruptError
from tests.conftest import make_config
from tests.factory import breast_phantom, make_file

CONFIG = "encoder:\n  name: resnet18\n  input_size: 64\n  batch_size: 8\n"


@pytest.fixture(scope="module")
def ingested(tmp_path_factory) -> Path:
    """A home holding 3 images, built once; each test corrupts its own copy."""
    root = tmp_path_factory.mktemp("status")
    for i in range(3):
        make_file(root / "archive" / f"{i}.dcm", breast_phantom(96, 64, seed=i), sop_uid=f"1.2.826.0.1.9.{i}")
    ws = Workspace(make_config(root / "state", encoder={"name": "resnet18", "input_size": 64}))
    ws.ingest(root / "archive", workers=0)
    ws.close()
    ws.db.dispose()
    with sqlite3.connect(root / "state" / "mretrieve.db") as db:  # fold the WAL in: the file alone is the state
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    (root / "config.yaml").write_text(CONFIG)
    return root


@pytest.fixture
def home(ingested, tmp_path, monkeypatch) -> Path:
    home = tmp_path / "state"
    shutil.copytree(ingested / "state", home)
    monkeypatch.setenv("MRETRIEVE_HOME", str(home))
    monkeypatch.setenv("MRETRIEVE_CONFIG", str(ingested / "config.yaml"))
    for var in ("MRETRIEVE_DATABASE_URL", "MRETRIEVE_INDEX_DIR", "MRETRIEVE_CACHE_DIR", "MRETRIEVE_WEIGHTS"):
        monkeypatch.delenv(var, raising=False)
    return home


def invoke(*args) -> "object":
    return CliRunner().invoke(cli, [str(a) for a in args])


def one_error(result, code: int) -> str:
    """The command failed with ``code`` and said so in one error line (plus its hint), no traceback."""
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    return result.output


def test_a_healthy_home_has_no_errors(home):
    result = invoke("status", "--format", "json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["errors"] == [] and info["model_versions"][0]["index"]["ntotal"] == 3


def test_a_corrupt_live_pointer_does_not_block_status(home):
    (home / "indexes" / "live.json").write_text("{not json")
    result = invoke("status", "--format", "json")
    assert result.exit_code == IndexCorruptError.exit_code, result.output
    info = json.loads(result.stdout)
    assert info["counts"]["images"] == 3 and info["model_versions"][0]["vectors"] == 3
    [error] = info["errors"]
    assert "live.json" in error and "unreadable live pointer" in error
    text = invoke("status")
    assert text.exit_code == IndexCorruptError.exit_code and "images 3" in text.output
    assert "ERROR:" in text.output and "live.json" in text.output


def test_status_reports_an_index_an_ingest_never_saved(home):
    """A first ingest killed after its first commit and before its first index save leaves vectors in the
    database and no index: `query` refuses, and `status` now says so too (it exited 0, silent)."""
    [directory] = [d for d in (home / "indexes").iterdir() if d.is_dir() and (d / "manifest.json").exists()]
    shutil.rmtree(directory)
    result = invoke("status", "--format", "json")
    assert result.exit_code == IndexCorruptError.exit_code, result.output
    [model] = json.loads(result.stdout)["model_versions"]
    assert f"no index in {directory}, but the database holds 3 vectors" in model["index_error"]
    assert "index rebuild" in model["index_error"]
    assert invoke("index", "rebuild").exit_code == 0
    assert invoke("status").exit_code == 0


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "missing"])
def test_status_reports_a_damaged_index_file(home, damage):
    [directory] = [d for d in (home / "indexes").iterdir() if d.is_dir() and (d / "manifest.json").exists()]
    path = directory / json.loads((directory / "manifest.json").read_text())["index_file"]
    data = path.read_bytes()
    if damage == "missing":
        path.unlink()
    else:
        path.write_bytes({"garbage": b"garbage!" * 100, "truncated": data[:len(data) // 2], "empty": b""}[damage])
    result = invoke("status", "--format", "json")
    assert result.exit_code == IndexCorruptError.exit_code, result.output
    [model] = json.loads(result.stdout)["model_versions"]
    assert str(path) in model["index_error"]
    assert {"garbage": "cannot read index", "truncated": "cannot read index", "empty": "empty",
            "missing": "missing"}[damage] in model["index_error"]
    text = invoke("status")
    assert "index ERROR:" in text.output and str(path) in text.output


def test_a_garbage_cache_database_names_the_file_and_the_fix(home, ingested):
    [entries] = (home / "cache").glob("*/entries.sqlite")
    for stale in entries.parent.glob("entries.sqlite-*"):
        stale.unlink()
    entries.write_bytes(b"this is not an sqlite file " * 200)
    make_file(ingested / "more" / "new.dcm", breast_phantom(96, 64, seed=9), sop_uid="1.2.826.0.1.9.99")
    out = one_error(invoke("ingest", ingested / "more", "--workers", "0", "--no-progress"),
                    CacheCorruptError.exit_code)
    assert str(entries) in out and "image cache is unreadable" in out
    assert f"deleting the cache folder {entries.parent} is safe" in out
    shutil.rmtree(entries.parent)  # the advertised fix works
    result = invoke("ingest", ingested / "more", "--workers", "0", "--no-progress")
    assert result.exit_code == 0 and "ingested 1" in result.output, result.output


def _damage_database(path: Path, offset: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(b"\xa5" * 512)


@pytest.mark.parametrize("where", ["page", "header"])
def test_a_damaged_database_names_the_file_and_the_fix(home, where):
    database = home / "mretrieve.db"
    with sqlite3.connect(database) as db:
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
        roots = [r for (r,) in db.execute("SELECT rootpage FROM sqlite_master WHERE rootpage > 1")]
    if where == "page":  # the root page of every table and index: the schema (page 1) still reads
        for root in roots:
            _damage_database(database, page_size * (root - 1))
    else:
        _damage_database(database, 0)
    out = one_error(invoke("status"), DatabaseError.exit_code)
    assert str(database) in out and "damaged" in out
    assert f"sqlite3 {database} '.recover'" in out and "backup" in out
