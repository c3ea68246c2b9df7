"""Issue #9, items 2 and 10: a rejected copy never hides a good copy with the same SOPInstanceUID, and a file
name that is not valid UTF-8 is refused by itself instead of crashing the ingest."""
import os
from pathlib import Path

import pytest

from mammo_retrieval.app.workspace import Workspace
from mammo_retrieval.storage.catalog import repository as repo
from mammo_retrieval.pipeline import runner
from tests.conftest import make_config
from tests.factory import make_dataset, make_file, write


@pytest.fixture
def ws(tmp_path):
    return Workspace(make_config(tmp_path / "state", encoder={"name": "resnet18", "batch_size": 4,
                                                             "input_size": 64}))


@pytest.mark.parametrize("chunk", [256, 1])  # the two copies in one header chunk, or in two
def test_a_corrupt_copy_read_first_does_not_hide_the_good_copy(tmp_path, ws, monkeypatch, chunk):
    monkeypatch.setattr(runner, "HEADER_CHUNK", chunk)
    archive = tmp_path / "archive"
    good = make_dataset(sop_uid="1.2.826.0.1.3680043.8.498.1")
    write(good, archive / "b_good.dcm")
    corrupt = make_dataset(sop_uid="1.2.826.0.1.3680043.8.498.1")
    corrupt.Rows = 500  # header passes, pixel data does not: size_mismatch at decode
    write(corrupt, archive / "a_corrupt.dcm")  # sorted first
    make_file(archive / "c_other.dcm")

    first = ws.ingest(archive, workers=1)
    assert first.ingested == 2 and first.already_present == 0
    assert [(r.path, r.code) for r in first.rejected] == [(str(archive / "a_corrupt.dcm"), "size_mismatch")]
    with ws.db.session() as s:
        assert repo.image_by_sop(s, "1.2.826.0.1.3680043.8.498.1").path.endswith("b_good.dcm")

    second = ws.ingest(archive, workers=1)  # once a copy is embedded, the others are already present
    assert second.ingested == 0 and second.already_present == 3 and not second.rejected


def test_two_corrupt_copies_then_a_good_one(tmp_path, ws):
    archive = tmp_path / "archive"
    for name in ("a.dcm", "b.dcm"):
        ds = make_dataset(sop_uid="1.2.826.0.1.3680043.8.498.2")
        ds.Columns = 7
        write(ds, archive / name)
    write(make_dataset(sop_uid="1.2.826.0.1.3680043.8.498.2"), archive / "c.dcm")
    write(make_dataset(sop_uid="1.2.826.0.1.3680043.8.498.2"), archive / "d.dcm")
    report = ws.ingest(archive, workers=0)
    assert report.ingested == 1 and report.already_present == 1
    assert sorted(os.path.basename(r.path) for r in report.rejected) == ["a.dcm", "b.dcm"]


def test_a_name_that_is_not_utf8_is_rejected_and_the_ingest_goes_on(tmp_path, ws):
    archive = tmp_path / "archive"
    make_file(archive / "good1.dcm")
    make_file(archive / "good2.dcm")
    bad = os.path.join(os.fsencode(archive), b"\xff\xfe.dcm")
    make_file(Path(os.fsdecode(bad)))  # a valid DICOM under a name that is not UTF-8
    assert os.path.exists(bad)

    report = ws.ingest(archive, workers=1)
    assert report.ingested == 2
    (rejected,) = report.rejected
    assert rejected.code == "unencodable_path"
    assert rejected.path.endswith("\\xff\\xfe.dcm") and "\\xff\\xfe.dcm" in rejected.reason
    with ws.db.session() as s:
        assert [(r.path, r.code) for r in repo.rejected_files(s)] == [(rejected.path, "unencodable_path")]
    assert ws.ingest(archive, workers=1).already_present == 2  # and every later run works too


def test_a_crash_fingerprint_changes_with_the_decoders_and_the_read_options(tmp_path, monkeypatch):
    """A crash recorded under other decoders (an upgrade) or other read options is no reason to skip a
    file: its fingerprint there differs. An instance pulled from a PACS (no file) has none."""
    import importlib.metadata

    from mammo_retrieval.core.config import load_config
    from mammo_retrieval.dicom.reader import InMemoryDicom
    from mammo_retrieval.pipeline.screen import crash_fingerprint, decoding_environment
    from mammo_retrieval.preprocess import PreprocessSettings
    path = tmp_path / "x.dcm"
    path.write_bytes(b"DICM" * 100)
    reader = load_config(env={}).reader
    job = runner.PrepareJob(reader, PreprocessSettings(), {"fast": True, "reduced_j2k": True})
    here = decoding_environment(job)
    assert decoding_environment(runner.PrepareJob(reader, PreprocessSettings(),
                                                  {"fast": True, "reduced_j2k": True})) == here
    assert decoding_environment(runner.PrepareJob(reader, PreprocessSettings(),
                                                  {"fast": True, "reduced_j2k": False})) != here
    real_version = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda name: "99.0" if name == "pylibjpeg-openjpeg" else real_version(name))
    upgraded = decoding_environment(job)
    assert upgraded != here
    assert crash_fingerprint(path, here) == crash_fingerprint(path, here) != crash_fingerprint(path, upgraded)
    assert len(crash_fingerprint(path, here)) == 40  # the catalog's column holds 80
    assert crash_fingerprint(InMemoryDicom("https://pacs/instances/1", b""), here) is None


def test_the_reader_source_digest_follows_the_decoding_code_and_nothing_else(tmp_path):
    """A fix to the reader (the package's version unchanged) must get crashers decoded again; a change
    elsewhere in the package need not."""
    import mammo_retrieval
    from mammo_retrieval.pipeline.screen import READER_SOURCES, reader_source_digest
    package = tmp_path / "mammo_retrieval"
    for folder in ("dicom", "preprocess", "pipeline", "app"):
        (package / folder).mkdir(parents=True)
    for name in ("dicom/reader.py", "preprocess/primer.py", "pipeline/prepare.py", "pipeline/worker.py",
                 "pipeline/runner.py", "app/workspace.py"):
        (package / name).write_text(f"# {name}\n")
    before = reader_source_digest(package)
    assert reader_source_digest(package) == before
    (package / "app" / "workspace.py").write_text("changed = True\n")
    (package / "pipeline" / "runner.py").write_text("changed = True\n")
    assert reader_source_digest(package) == before
    (package / "dicom" / "reader.py").write_text("# a fix\n")
    fixed = reader_source_digest(package)
    assert fixed != before
    (package / "preprocess" / "_kernels.py").write_text("")  # a new decoding module counts too
    assert reader_source_digest(package) != fixed
    installed = Path(mammo_retrieval.__file__).parent  # the package's own decoding sources are there
    assert all((installed / source).exists() for source in READER_SOURCES)
    assert reader_source_digest() == reader_source_digest(installed) != before
