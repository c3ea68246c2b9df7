"""`query --level study` in its three formats, and GET /api/v1/studies/{key}/similar."""
import csv
import io
import json

from fastapi.testclient import TestClient

from mammo_retrieval.app.http.api import create_app
from mammo_retrieval.app.workspace import Workspace
from tests.factory import breast_phantom, make_file

VIEWS = [("L", "CC"), ("R", "CC"), ("L", "MLO"), ("R", "MLO")]


def archive(folder):
    files = {}
    for s in range(4):
        for j, (lat, view) in enumerate(VIEWS):
            pixels = breast_phantom(128, 96, side=lat, seed=10 * s + j)
            files[(s, j)] = make_file(folder / f"s{s}_{j}.dcm", pixels, accession=f"ST{s}", patient_id=f"P{s}",
                                      laterality=lat, view=view)
            if s == 1:
                make_file(folder / f"copy_{j}.dcm", pixels, accession="COPY1", patient_id="P1", laterality=lat,
                          view=view)
    return files


def test_study_queries_in_every_format(run, tmp_path, monkeypatch):
    (tmp_path / "config.yaml").write_text("encoder: {name: resnet18, input_size: 64, batch_size: 8}\n")
    monkeypatch.setenv("MRETRIEVE_CONFIG", str(tmp_path / "config.yaml"))
    files = archive(tmp_path / "archive")
    run("ingest", tmp_path / "archive", "--no-progress")
    table = run("query", "--accession", "ST1", "--level", "study", "-k", "2").output
    assert "query study ST1" in table and table.splitlines()[3].split()[2] == "COPY1"
    body = json.loads(run("query", "--accession", "ST1", "--level", "study", "-k", "2", "--format", "json").output)
    assert body["hits"][0]["accession_number"] == "COPY1" and body["hits"][0]["score"] > 0.9999
    assert set(body["hits"][0]) == {"rank", "score", "study_key", "accession_number", "study_instance_uid",
                                    "patient_id", "views_matched", "images"}
    # the same patient's other study goes with --exclude-same-patient
    excluded = json.loads(run("query", "--accession", "ST1", "--level", "study", "-k", "5", "--format", "json",
                              "--exclude-same-patient").output)
    assert "COPY1" not in [h["accession_number"] for h in excluded["hits"]] and len(excluded["hits"]) == 3
    rows = list(csv.DictReader(io.StringIO(run("query", "--dicom", files[(1, 0)], "--dicom", files[(1, 2)],
                                               "--level", "study", "-k", "1", "--format", "csv").output)))
    assert {r["accession_number"] for r in rows} == {"COPY1"} and len(rows) == 4  # the hit study's 4 images
    assert rows[0]["views_matched"] == "L CC;L MLO"
    pooled = json.loads(run("query", "--accession", "ST1", "--level", "study", "--rule", "mean_pooled", "-k", "1",
                            "--format", "json").output)
    assert pooled["rule"] == "mean_pooled" and pooled["hits"][0]["accession_number"] == "COPY1"
    run("query", "--accession", "ST1", "--level", "study", "--view", "CC", code=2)

    from tests.conftest import make_config
    ws = Workspace(make_config(tmp_path / "state", encoder={"name": "resnet18", "input_size": 64, "batch_size": 8}))
    with TestClient(create_app(ws, warm_up=False)) as client:
        http = client.get("/api/v1/studies/ST1/similar?k=2").json()
        assert http["hits"][0]["accession_number"] == "COPY1" and http == body
        assert client.get("/api/v1/studies/NOPE/similar").status_code == 404
        assert client.get("/api/v1/studies/ST1/similar?rule=max").status_code == 422
    ws.close()
