"""End to end through the console entry point: ingest, query, re-ingest adds nothing, status."""
import csv
import io
import json

import pytest

from tests.factory import make_file


@pytest.mark.slow
def test_ingest_query_reingest_status(run, cbis_files, tmp_path):
    archive = cbis_files[0].parents[1]
    out = run("ingest", archive, "--no-progress", "--workers", "1").output
    assert "ingested 8, already present 0, rejected 0" in out
    assert "RANDOM" not in out  # the built-in encoder is the default

    table = run("query", "--dicom", cbis_files[0], "-k", "3").output.splitlines()
    assert table[1].split()[:2] == ["rank", "score"] and len([l for l in table if l[:1].isdigit()]) == 3
    hits = json.loads(run("query", "--dicom", cbis_files[0], "-k", "7", "--format", "json").output)[0]["hits"]
    assert len(hits) == 7 and str(cbis_files[0]) not in {h["path"] for h in hits}
    assert {"accession_number", "patient_id", "laterality", "view", "score", "path"} <= set(hits[0])
    rows = list(csv.DictReader(io.StringIO(run("query", "--dicom", cbis_files[0], "--format", "csv",
                                               "--view", "CC").output)))
    assert rows and all(r["view"] == "CC" for r in rows)

    assert "ingested 0, already present 8, rejected 0" in run("ingest", archive, "--no-progress").output
    status = json.loads(run("status", "--format", "json").output)
    assert status["counts"]["images"] == 8 and status["counts"]["embeddings"] == 8
    model = status["model_versions"][0]
    assert (model["encoder"], model["dim"], model["random_weights"]) == ("mammo-simclr-v3", 704, False)
    assert model["index"]["ntotal"] == 8 and model["index"]["metric"] == "inner_product"
    text = run("status").output
    assert "images 8" in text and "LIVE model mammo-simclr-v3" in text


def test_random_weights_are_flagged_loudly(run, tmp_path, cbis_files):
    config = tmp_path / "random.yaml"
    config.write_text("encoder:\n  name: resnet18\n")
    out = run("--config", config, "ingest", cbis_files[0].parent, "--no-progress", "--workers", "0").output
    assert "WARNING: RANDOM WEIGHTS" in out
    assert "RANDOM" in run("--config", config, "status").output


def test_bad_query_file_exits_with_its_reason(run, tmp_path):
    bad = make_file(tmp_path / "ct.dcm", modality="CT")
    result = run("--config", tmp_path / "missing.yaml", "status", code=2)
    assert "config file not found" in result.output
    good = make_file(tmp_path / "good.dcm")
    result = run("query", "--dicom", good, code=7)  # nothing indexed yet
    assert "mretrieve ingest" in result.output
    make_file(tmp_path / "archive" / "ok.dcm")
    run("ingest", tmp_path / "archive", "--no-progress", "--workers", "0")
    result = run("query", "--dicom", bad, code=3)
    assert str(bad) in result.output and "Modality is 'CT'" in result.output


def test_usage_errors(run, tmp_path):
    assert "exactly one of --dicom or --accession" in run("query", code=2).output


def test_db_upgrade(run):
    assert "database at revision 0007 (was empty)" in run("db", "upgrade").output
    assert "(was 0007)" in run("db", "upgrade").output


def test_index_rebuild_refuses_a_layout_the_catalog_cannot_train(run):
    run("db", "upgrade")
    out = run("index", "rebuild", "--type", "ivf_pq", "--nlist", "64", "--force", code=2).output
    assert "ivf_pq index of 64 lists needs at least 2496 vectors" in out and "holds 0" in out
    out = run("index", "rebuild", "--type", "ivf_flat", "--nlist", "1", "--opq", "--force", code=2).output
    assert "OPQ rotates vectors for product quantisation; it does not apply to ivf_flat" in out
    assert "--type ivf_pq --opq" in out
    out = run("index", "rebuild", "--type", "flat", "--opq", "--force", code=2).output
    assert "it does not apply to flat" in out


def test_errors_render_remedies_as_commands():
    from mammo_retrieval.app.cli._common import render_error
    from mammo_retrieval.core.errors import IndexCorruptError, Remedy
    exc = IndexCorruptError("the index is short of the database",
                            remedies=[Remedy("rebuild it from the database", "index_rebuild"), Remedy("or wait")])
    assert render_error(exc).splitlines() == [
        "error: the index is short of the database",
        "  hint: rebuild it from the database: run `mretrieve index rebuild`",
        "  hint: or wait"]
    assert exc.as_dict() == {"error": "index_corrupt", "message": "the index is short of the database",
                             "hint": "rebuild it from the database; or wait",
                             "remedies": [{"text": "rebuild it from the database", "action": "index_rebuild"},
                                          {"text": "or wait", "action": None}]}


def test_a_scheduler_without_the_dask_executor_is_a_usage_error(run, tmp_path):
    """--scheduler alone used to be ignored: the ingest ran locally and said nothing."""
    (tmp_path / "archive").mkdir()
    out = run("ingest", tmp_path / "archive", "--scheduler", "tcp://127.0.0.1:9", code=2).output
    assert "add --executor dask" in out and not (tmp_path / "state" / "mretrieve.db").exists()
