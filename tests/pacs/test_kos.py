"""Results back as DICOM: `query --kos --stow` and `qc --kos --stow` send Key Object Selection documents
to a real Orthanc, which files them and gives them back; the service serves the same documents."""
from __future__ import annotations

import io
import shutil

import pydicom
import pytest
from click.testing import CliRunner
from dicomweb_client.api import DICOMwebClient
from fastapi.testclient import TestClient
from highdicom.ko import KeyObjectSelectionDocument

from mammo_retrieval.app.cli import cli
from mammo_retrieval.app.http.api import create_app
from mammo_retrieval.app.workspace import Workspace
from mammo_retrieval.pacs.kos import referenced_sops
from tests.conftest import make_config
from tests.pacs.test_dicomweb import TINY, _archive_files

KOS_CLASS = "1.2.840.10008.5.1.4.1.1.88.59"


@pytest.fixture(scope="module")
def archive(tmp_path_factory, cbis_files):
    """MIAS and CBIS mammograms of several patients, ingested from a folder with a small encoder."""
    root = tmp_path_factory.mktemp("kos")
    folder = root / "archive"
    files = _archive_files(cbis_files)
    for i, path in enumerate(files):
        (folder / str(i)).mkdir(parents=True)
        shutil.copy(path, folder / str(i) / path.name)
    home = root / "home"
    (root / "config.yaml").write_text("encoder: {name: resnet18, input_size: 64, batch_size: 4}\n")
    ws = Workspace(make_config(home, encoder=TINY))
    assert ws.ingest(folder, workers=1).ingested == len(files)
    return {"home": home, "config": root / "config.yaml", "files": sorted(folder.rglob("*.dcm"))}


def _run(archive, *args):
    result = CliRunner().invoke(cli, ["--config", str(archive["config"]), *map(str, args)],
                                env={"MRETRIEVE_HOME": str(archive["home"])})
    assert result.exit_code == 0, result.output
    return result


def _stored_kos(orthanc) -> list[pydicom.Dataset]:
    client = DICOMwebClient(orthanc.dicomweb)
    found = client.search_for_instances(search_filters={"Modality": "KO"})
    return [client.retrieve_instance(i["0020000D"]["Value"][0], i["0020000E"]["Value"][0], i["00080018"]["Value"][0])
            for i in found]


def test_query_kos_is_written_sent_by_stow_and_read_back(archive, orthanc, tmp_path):
    query = archive["files"][0]
    out = tmp_path / "similar.dcm"
    result = _run(archive, "query", "--dicom", query, "-k", 4, "--format", "json", "--kos", out,
                  "--stow", orthanc.dicomweb)
    import json
    hits = json.loads(result.stdout)[0]["hits"]
    written = pydicom.dcmread(out)
    header = pydicom.dcmread(query, stop_before_pixels=True)
    assert written.SOPClassUID == KOS_CLASS and written.Modality == "KO"
    assert written.StudyInstanceUID == header.StudyInstanceUID and written.PatientID == header.PatientID
    assert referenced_sops(written) == [header.SOPInstanceUID] + [h["sop_instance_uid"] for h in hits]
    document = KeyObjectSelectionDocument.from_dataset(written)
    assert document.ConceptNameCodeSequence[0].CodeValue == "113000"  # "Of Interest"
    text = next(i.TextValue for i in written.ContentSequence if i.ValueType == "TEXT")
    assert all(f"{h['rank']}. score {h['score']:.4f} {h['sop_instance_uid']}" in text for h in hits)
    # hits of other studies are evidence too (highdicom alone stops at two studies)
    evidence = {s.StudyInstanceUID for s in written.CurrentRequestedProcedureEvidenceSequence}
    assert evidence == {header.StudyInstanceUID} | {
        pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID
        for p in archive["files"] if pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID
        in {h["sop_instance_uid"] for h in hits}}
    [stored] = _stored_kos(orthanc)
    assert stored.SOPInstanceUID == written.SOPInstanceUID
    assert referenced_sops(stored) == referenced_sops(written)
    # a pull from that PACS skips our document unread, by its SOP class, and says so
    pulled = CliRunner().invoke(cli, ["--config", str(archive["config"]), "ingest", orthanc.dicomweb, "--modality", "",
                                      "--no-progress"], env={"MRETRIEVE_HOME": str(tmp_path / "pulled")})
    assert pulled.exit_code == 0, pulled.output
    assert "skipped 1 not images by SOP class" in pulled.output and "by extension" not in pulled.output


def test_qc_kos_one_document_per_study_and_stow(archive, orthanc, tmp_path):
    out = tmp_path / "kos"
    _run(archive, "qc", "--out", tmp_path / "qc", "--top", 3, "-k", 3, "--no-progress", "--kos", out,
         "--stow", orthanc.dicomweb)
    documents = [pydicom.dcmread(p) for p in sorted(out.glob("kos-*.dcm"))]
    ws = Workspace(make_config(archive["home"], encoder=TINY))
    with ws.db.session() as s:
        from mammo_retrieval.storage.catalog import repository as repo
        sweep = repo.latest_qc_sweep(s, 3)
    flagged = {r["sop_instance_uid"] for r in sweep.scores if r["rank"] <= 3 or r["flags"]}
    assert sorted(sop for d in documents for sop in referenced_sops(d)) == sorted(flagged)
    for document in documents:  # each in its own study, and of that study's patient only
        studies = {ws.header_of(sop).StudyInstanceUID for sop in referenced_sops(document)}
        assert studies == {document.StudyInstanceUID}
        assert "QC sweep" in next(i.TextValue for i in document.ContentSequence if i.ValueType == "TEXT")
    assert sorted(d.SOPInstanceUID for d in _stored_kos(orthanc)) == sorted(d.SOPInstanceUID for d in documents)


def test_the_service_serves_the_same_documents(archive):
    ws = Workspace(make_config(archive["home"], encoder=TINY))
    sop = pydicom.dcmread(archive["files"][1], stop_before_pixels=True).SOPInstanceUID
    with TestClient(create_app(ws, warm_up=False)) as client:
        response = client.get(f"/api/v1/images/{sop}/similar.kos", params={"k": 3})
        assert response.status_code == 200 and response.headers["content-type"] == "application/dicom"
        document = pydicom.dcmread(io.BytesIO(response.content))
        similar = client.get(f"/api/v1/images/{sop}/similar", params={"k": 3}).json()
        assert referenced_sops(document) == [sop] + [h["sop_instance_uid"] for h in similar["hits"]]
        assert client.get("/api/v1/images/1.2.3.404/similar.kos").status_code == 404
        listing = client.get("/api/v1/qc/kos", params={"top": 3})
        if listing.status_code == 404:  # no sweep in this module yet: run one through the library
            from mammo_retrieval.analysis.qc import run_qc
            run_qc(ws.corpus(), method="knn", k=3, header_checks=False, min_pixel_correlation=None)
            listing = client.get("/api/v1/qc/kos", params={"top": 3})
        assert listing.status_code == 200
        first = listing.json()["documents"][0]
        one = client.get(first["url"])
        assert one.status_code == 200
        assert len(referenced_sops(pydicom.dcmread(io.BytesIO(one.content)))) == first["images"]


def test_a_header_with_values_highdicom_refuses_still_gets_its_document(cbis_files, caplog):
    """Ingest keeps an image whose birth date, study date, sex or character set is malformed, or whose
    name has two values; its document leaves those fields empty (UTF-8 for the character set), keeps the
    patient's identity, and the warning names the fields, never their values."""
    import warnings

    from pydicom.multival import MultiValue
    from pydicom.valuerep import PersonName

    from mammo_retrieval.pacs.kos import Reference, key_object_selection
    header = pydicom.dcmread(cbis_files[0], stop_before_pixels=True)
    header.PatientBirthDate, header.StudyDate, header.StudyTime = "19xx0101", "20230101-20230202", "99:99"
    header.PatientSex, header.SpecificCharacterSet = "<script>", "ISO_IR 999"
    header.PatientName = MultiValue(PersonName, ["ZQNAME^First", "ZQNAME^Second"])
    header.PatientID = "ZQPID-" + "7" * 70  # over-long: copied, it files the document with its patient
    ref = Reference(header.SOPClassUID, header.SOPInstanceUID, header.SeriesInstanceUID, header.StudyInstanceUID)
    caplog.clear()  # pydicom's own warnings on setting those values above quote them: not ours
    with caplog.at_level("WARNING"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        document = key_object_selection(header, [ref], "similar cases")
    buffer = io.BytesIO()
    document.save_as(buffer, enforce_file_format=True)
    back = pydicom.dcmread(io.BytesIO(buffer.getvalue()))
    assert (back.PatientBirthDate, back.StudyDate, back.StudyTime, back.PatientSex) == ("", "", "", "")
    assert back.SpecificCharacterSet == "ISO_IR 192"
    assert str(back.PatientName) == "ZQNAME^First" and back.PatientID == header.PatientID
    assert back.StudyInstanceUID == header.StudyInstanceUID and referenced_sops(back) == [header.SOPInstanceUID]
    logged = caplog.text + "\n".join(str(w.message) for w in caught)  # pydicom's warnings quote values
    for field in ("PatientBirthDate", "StudyDate", "StudyTime", "PatientSex"):
        assert field in logged
    for value in ("19xx", "20230101", "99:99", "<script>", "ISO_IR 999", "ZQNAME", "ZQPID"):
        assert value not in logged


def test_a_study_uid_that_is_not_plain_names_no_path_in_a_kos_folder(cbis_files, tmp_path):
    """`qc --kos DIR` names each document by its study; ingest keeps a hand-made "<script>.../x" UID."""
    from mammo_retrieval.app.cli._common import write_or_send_kos
    from mammo_retrieval.pacs.kos import Reference, key_object_selection
    documents = []
    for path, study in zip(cbis_files, ("1.2/../../escaped", "<script>alert(4)</script>", "1.2.3.4")):
        header = pydicom.dcmread(path, stop_before_pixels=True)
        header.StudyInstanceUID = study
        ref = Reference(header.SOPClassUID, header.SOPInstanceUID, header.SeriesInstanceUID, study)
        documents.append(key_object_selection(header, [ref], "flagged"))
    out = tmp_path / "kos"
    write_or_send_kos(documents, str(out), None, None, folder=True)
    written = sorted(p.name for p in tmp_path.rglob("*.dcm"))
    assert len(written) == 3 and all((out / name).is_file() for name in written)
    assert "kos-1.2.3.4.dcm" in written
    assert {pydicom.dcmread(out / n).StudyInstanceUID for n in written} == {
        "1.2/../../escaped", "<script>alert(4)</script>", "1.2.3.4"}


@pytest.mark.parametrize("charset", ["ISO_IR 100", "ISO_IR 6", "ISO 2022 IR 100", ["ISO_IR 100", "ISO_IR 192"],
                                     ["ISO 2022 IR 87", "ISO 2022 IR 6"], ["", "ISO 2022 IR 87"]])
def test_a_document_is_written_in_utf8_whatever_its_source_declares(cbis_files, charset):
    """highdicom refuses some declared character sets (a lone code extension, a mixed list) and a Latin-1
    document cannot hold an Omega: values arrive decoded, so every document is UTF-8."""
    from mammo_retrieval.pacs.kos import Reference, key_object_selection
    header = pydicom.dcmread(cbis_files[0], stop_before_pixels=True)
    header.SpecificCharacterSet = charset
    header.PatientName = "Ωmega^Zoë"
    ref = Reference(header.SOPClassUID, header.SOPInstanceUID, header.SeriesInstanceUID, header.StudyInstanceUID)
    document = key_object_selection(header, [ref], "similar cases: Ω " + "x" * 20000)  # cut with an ellipsis
    buffer = io.BytesIO()
    document.save_as(buffer, enforce_file_format=True)
    back = pydicom.dcmread(io.BytesIO(buffer.getvalue()))
    assert back.SpecificCharacterSet == "ISO_IR 192" and str(back.PatientName) == "Ωmega^Zoë"
    text = next(i.TextValue for i in back.ContentSequence if i.ValueType == "TEXT")
    assert text.startswith("similar cases: Ω") and text.endswith("…")
