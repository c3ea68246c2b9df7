"""QC sweeps as Key Object Selection documents when some of the archive's files have gone away."""
from __future__ import annotations

import logging

import pydicom
from fastapi.testclient import TestClient
from pydicom.uid import generate_uid

from mammo_retrieval.analysis.qc import run_qc
from mammo_retrieval.app.http.api import create_app
from mammo_retrieval.app.workspace import Workspace
from mammo_retrieval.pacs.kos import referenced_sops
from tests.conftest import make_config
from tests.factory import breast_phantom, make_file

TINY = {"name": "resnet18", "input_size": 64, "batch_size": 4}


def _three_studies(folder):
    """Three studies (three patients) of two views each, every view in its study's StudyInstanceUID."""
    files = {}
    for s in range(3):
        study_uid = generate_uid()
        for side in "LR":
            path = make_file(folder / f"s{s}{side}.dcm", breast_phantom(128, 96, side=side, seed=2 * s + (side == "R")),
                             accession=f"ACC{s:04d}", patient_id=f"P{s:04d}", laterality=side, study_uid=study_uid)
            files[str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)] = path
    return files


def test_a_gone_flagged_image_is_left_out_and_the_other_documents_are_made(tmp_path, caplog):
    files = _three_studies(tmp_path / "archive")
    ws = Workspace(make_config(tmp_path / "state", encoder=TINY))
    assert ws.ingest(tmp_path / "archive", workers=0).ingested == 6
    run_qc(ws.corpus(), method="knn", k=2, header_checks=False, min_pixel_correlation=None)
    before = {d.StudyInstanceUID: referenced_sops(d) for d in ws.qc_kos(50)}  # every image is flagged
    assert len(before) == 3 and all(len(sops) == 2 for sops in before.values())
    (a, a_sops), (b, b_sops), (c, c_sops) = sorted(before.items())

    for sop in a_sops:  # study A: every file moved away
        files[sop].rename(tmp_path / f"moved-{sop}.dcm")
    gone = b_sops[0]  # study B: the file its document would take its header from
    files[gone].rename(tmp_path / "moved.dcm")

    with caplog.at_level(logging.WARNING, logger="mammo_retrieval.pacs.results"):
        after = {d.StudyInstanceUID: d for d in ws.qc_kos(50)}
    assert set(after) == {b, c}
    assert referenced_sops(after[b]) == b_sops[1:] and referenced_sops(after[c]) == c_sops
    assert after[b].PatientID == pydicom.dcmread(files[b_sops[1]], stop_before_pixels=True).PatientID
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert all(sop in warned for sop in [gone, *a_sops])

    with TestClient(create_app(ws, warm_up=False)) as client:
        listing = client.get("/api/v1/qc/kos", params={"top": 50})
        assert listing.status_code == 200, listing.text
        assert {d["study_instance_uid"]: d["images"] for d in listing.json()["documents"]} == {b: 1, c: 2}
        one = client.get(f"/api/v1/qc/kos/{b}", params={"top": 50})
        assert one.status_code == 200 and one.headers["content-type"] == "application/dicom"
        assert client.get(f"/api/v1/qc/kos/{a}", params={"top": 50}).status_code == 404
    ws.close()
