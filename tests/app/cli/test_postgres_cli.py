"""Every command on a real PostgreSQL server ($MRETRIEVE_DATABASE_URL=postgresql+psycopg://...), the service
included, and two writers at once: one wins, the other is told who holds the database, nothing doubles."""
import csv
import json
import os
import subprocess
import sys

from fastapi.testclient import TestClient

from mammo_retrieval.app.http.api import create_app
from mammo_retrieval.app.workspace import Workspace
from tests.conftest import REPO, make_config
from tests.pipeline.test_runner import synthetic_archive

CONFIG = "encoder: {name: resnet18, input_size: 64, batch_size: 4}\n"


def test_every_command_on_postgresql(run, tmp_path, monkeypatch, postgres_url):
    monkeypatch.setenv("MRETRIEVE_DATABASE_URL", postgres_url)
    (tmp_path / "config.yaml").write_text(CONFIG)
    monkeypatch.setenv("MRETRIEVE_CONFIG", str(tmp_path / "config.yaml"))
    files = synthetic_archive(tmp_path / "archive", 12)
    assert "ingested 12, already present 0, rejected 0" in run("ingest", tmp_path / "archive", "--no-progress").output
    assert "ingested 0, already present 12" in run("ingest", tmp_path / "archive", "--no-progress").output
    hits = json.loads(run("query", "--dicom", files[0], "-k", "3", "--format", "json").output)[0]["hits"]
    assert len(hits) == 3
    assert "ACC0001" in run("query", "--accession", "ACC0001", "-k", "2").output
    status = json.loads(run("status", "--format", "json").output)
    assert status["database"].startswith("postgresql+psycopg://") and status["counts"]["embeddings"] == 12
    run("qc", "--out", tmp_path / "qc", "--top", "3")
    run("export", "--out", tmp_path / "export")
    with open(tmp_path / "export" / "joined.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    with open(tmp_path / "labels.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, ["SOPInstanceUID", "laterality"])
        writer.writeheader()
        writer.writerows({"SOPInstanceUID": r["SOPInstanceUID"], "laterality": r["laterality"]} for r in rows)
    run("evaluate", "--labels", tmp_path / "labels.csv", "--k", "1,3", "--label-column", "laterality")
    run("train", "--epochs", "1", "--batch-size", "4", "--warmup-epochs", "0", "--device", "cpu",
        "--out", tmp_path / "ckpt.pt")
    run("reindex", "--model", tmp_path / "ckpt.pt", "--no-progress")
    assert len(json.loads(run("query", "--dicom", files[1], "-k", "2", "--format", "json").output)[0]["hits"]) == 2
    run("reindex", "--rollback")
    run("db", "upgrade")
    run("index", "rebuild")
    run("index", "tune", "--recall", "0.9", "--queries", "10", "-k", "2")

    ws = Workspace(make_config(tmp_path / "state", encoder={"name": "resnet18", "input_size": 64, "batch_size": 4},
                               paths={"database_url": postgres_url}))
    with TestClient(create_app(ws, warm_up=False)) as client:
        similar = client.get(f"/api/v1/images/{hits[0]['sop_instance_uid']}/similar?k=4")
        assert similar.status_code == 200 and len(similar.json()["hits"]) == 4
        assert client.get("/api/v1/qc/latest").json()["n_images"] == 12
    ws.close()


def test_two_writers_on_one_postgresql_database(tmp_path, postgres_url):
    """Two machines (two homes, two index folders) ingest the same archive into one database at once."""
    synthetic_archive(tmp_path / "archive", 24)
    (tmp_path / "config.yaml").write_text(CONFIG)
    base = {k: v for k, v in os.environ.items() if not k.startswith("MRETRIEVE_")}
    command = [sys.executable, "-c", "from mammo_retrieval.app.cli import main; main()", "ingest",
               str(tmp_path / "archive"), "--no-progress", "--workers", "0"]
    envs = [{**base, "MRETRIEVE_HOME": str(tmp_path / f"host{i}"), "MRETRIEVE_DATABASE_URL": postgres_url,
             "MRETRIEVE_CONFIG": str(tmp_path / "config.yaml")} for i in (1, 2)]
    procs = [subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for env in envs]
    outcomes = [(p.wait(300), *p.communicate()) for p in procs]
    codes = sorted(code for code, _, _ in outcomes)
    assert codes in ([0, 0], [0, 9]), outcomes
    for code, _, err in outcomes:
        if code == 9:
            assert "another mretrieve process is writing to postgresql+psycopg://" in err and "mretrieve pid" in err
    for env in envs:  # each host reruns until it is done; nothing is doubled
        done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
    from sqlalchemy import create_engine, text
    engine = create_engine(postgres_url)
    with engine.connect() as conn:
        images = conn.execute(text("SELECT count(*), count(DISTINCT sop_instance_uid) FROM images")).one()
        vectors = conn.execute(text("SELECT count(*), count(DISTINCT image_id) FROM embeddings")).one()
    engine.dispose()
    assert tuple(images) == (24, 24) and tuple(vectors) == (24, 24)
    for i in (1, 2):  # each host's index caught up with the shared catalog
        ws = Workspace(make_config(tmp_path / f"host{i}", encoder={"name": "resnet18", "input_size": 64,
                                                                    "batch_size": 4},
                                   paths={"database_url": postgres_url}))
        assert ws.searchable_index().ntotal == 24
        ws.close()


def test_a_second_writer_is_told_who_holds_the_database(tmp_path, postgres_url):
    import pytest

    from mammo_retrieval.core.errors import BusyError
    from mammo_retrieval.storage.catalog import Database
    synthetic_archive(tmp_path / "archive", 2)
    holder = Database(postgres_url)
    with holder.writer_lock(), holder.writer_lock():  # nests
        ws = Workspace(make_config(tmp_path / "other", encoder={"name": "resnet18", "input_size": 64},
                                   paths={"database_url": postgres_url}))
        with pytest.raises(BusyError, match=f"mretrieve pid {os.getpid()} on") as info:
            ws.ingest(tmp_path / "archive", workers=0)
        assert info.value.exit_code == 9
    assert ws.ingest(tmp_path / "archive", workers=0).ingested == 2  # released: the next writer goes ahead
    holder.dispose()
    ws.close()
