import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from pydicom.encaps import encapsulate

from mammo_retrieval.app.workspace import Workspace
from mammo_retrieval.core.errors import IndexCorruptError, IndexMismatchError, NotFoundError
from mammo_retrieval.storage.index import VectorIndex
from mammo_retrieval.search.query import QueryFilters
from tests.conftest import make_config
from tests.factory import MG_FOR_PROCESSING, breast_phantom, make_dataset, make_file, write


def broken_and_foreign(folder: Path, mias_file: Path) -> dict[str, str]:
    """One file per rejection reason; returns {path: expected code}."""
    folder.mkdir(parents=True)
    expected = {}

    def add(name, code):
        expected[str(folder / name)] = code
        return folder / name

    add("empty.dcm", "empty_file").write_bytes(b"")
    # no extension: read, and rejected by pydicom (a .txt or .png would be skipped unread, by extension)
    add("README", "not_dicom").write_text("scanner export notes\n" * 10)
    add("photo", "not_dicom").write_bytes(cv2.imencode(".png", np.zeros((32, 32), np.uint8))[1].tobytes())
    data = mias_file.read_bytes()
    add("truncated_copy", "truncated_pixel_data").write_bytes(data[: len(data) * 3 // 4])
    make_file(add("chest_ct.dcm", "wrong_modality"), modality="CT")
    ds = make_dataset()
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = np.zeros((96, 64, 3), np.uint8).tobytes()
    write(ds, add("colour.dcm", "colour_image"))
    ds = make_dataset()
    del ds.PixelData
    write(ds, add("header_only.dcm", "no_pixel_data"))
    make_file(add("raw.dcm", "for_processing"), sop_class=MG_FOR_PROCESSING)
    ds = make_dataset(np.zeros((3, 32, 32), np.uint16), frames=3)
    ds.NumberOfFrames = 100000  # an absurd frame count: over reader.max_frames
    write(ds, add("tomo_absurd.dcm", "too_large"))
    ds = make_dataset(np.zeros((3, 32, 32), np.uint16), frames=3)
    ds.NumberOfFrames = 1000  # a plausible frame count that the pixel data (3 frames) does not hold
    write(ds, add("tomo_short.dcm", "size_mismatch"))
    ds = make_dataset(np.zeros((3, 32, 32), np.uint16), frames=3, syntax="rle")
    ds.NumberOfFrames = 5  # frames missing from the encapsulated data
    write(ds, add("tomo_truncated.dcm", "undecodable_pixel_data"))
    ds = make_dataset()
    ds.Rows = 500
    write(ds, add("lying_header.dcm", "size_mismatch"))
    ds = make_dataset(syntax="jpeg2000")
    ds.PixelData = encapsulate([b"\x00" * 64])
    write(ds, add("garbled.dcm", "undecodable_pixel_data"))
    return expected


@pytest.mark.slow
def test_mias_mixed_with_broken_files(tmp_path, mias_dir, mias_labels):
    archive = tmp_path / "archive"
    files = sorted({row["file"] for row in mias_labels})
    for i, rel in enumerate(files):  # links, not copies: the corpus stays in ../shared
        link = archive / "mias" / (rel if i % 3 else rel.removesuffix(".dcm"))  # any file name counts
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(mias_dir / rel, link)
    expected = broken_and_foreign(archive / "incoming" / "bad", mias_dir / files[1])
    shutil.copy(mias_dir / files[0], archive / "incoming" / "same_image_other_path.dcm")
    os.symlink(mias_dir / "labels.csv", archive / "labels.csv")  # sidecars: skipped, not rejected
    (archive / "incoming" / "LICENCE.txt").write_text("research only\n")

    ws = Workspace(make_config(tmp_path / "state", encoder={"name": "resnet18", "batch_size": 16}))
    report = ws.ingest(archive, workers=1)
    assert report.files_seen == 200 + len(expected) + 1
    assert report.skipped == 2
    assert report.ingested == 200
    assert report.already_present == 1
    assert {r.path: r.code for r in report.rejected} == expected
    assert all(r.reason for r in report.rejected)
    status = ws.status()
    assert status["counts"]["images"] == 200 and status["counts"]["embeddings"] == 200
    assert status["counts"]["studies"] == 100
    assert status["counts"]["studies_keyed_by_study_uid"] == len({r["PatientID"] for r in mias_labels
                                                                   if not r["AccessionNumber"]})
    assert {r["path"]: r["code"] for r in status["rejected"]} == expected
    assert status["model_versions"][0]["index"]["ntotal"] == 200
    assert status["warnings"]  # random weights are flagged

    again = ws.ingest(archive, workers=0)
    assert (again.ingested, again.already_present, len(again.rejected)) == (0, 201, len(expected))
    assert ws.status()["counts"]["rejected_files"] == len(expected)

    # query by file: never its own hit, filters honoured
    query_file = mias_dir / files[10]
    own_sop = next(r["SOPInstanceUID"] for r in mias_labels if r["file"] == files[10])
    own_patient = next(r["PatientID"] for r in mias_labels if r["file"] == files[10])
    result = ws.query_dicom(query_file, k=10)
    assert len(result.hits) == 10 and own_sop not in {h.sop_instance_uid for h in result.hits}
    assert [h.rank for h in result.hits] == list(range(1, 11))
    assert all(a.score >= b.score for a, b in zip(result.hits, result.hits[1:]))
    others = ws.query_dicom(query_file, k=10, filters=QueryFilters(exclude_same_patient=True, laterality="L"))
    assert all(h.patient_id != own_patient and h.laterality == "L" for h in others.hits)
    study = ws.query_accession("MIAS0003", k=5)
    assert [r.query.laterality for r in study] == ["L", "R"]


def synthetic_archive(folder: Path, n: int) -> list[Path]:
    return [make_file(folder / f"img{i:03d}.dcm", breast_phantom(128, 96, side="LR"[i % 2], seed=i),
                      accession=f"ACC{i // 2:04d}", patient_id=f"P{i // 2:04d}", laterality="LR"[i % 2],
                      syntax=("rle", "jpeg2000", "explicit")[i % 3]) for i in range(n)]


def test_crash_between_database_commit_and_index_save(tmp_path, monkeypatch):
    files = synthetic_archive(tmp_path / "archive", 12)
    cfg = make_config(tmp_path / "state", encoder={"name": "resnet18", "batch_size": 4})

    def crash(self):
        raise OSError("killed before the index was saved")
    monkeypatch.setattr(VectorIndex, "save", crash)
    with pytest.raises(OSError):
        Workspace(cfg).ingest(tmp_path / "archive", workers=0)
    monkeypatch.undo()

    ws = Workspace(cfg)
    assert ws.status()["counts"]["embeddings"] == 12  # the database kept every committed batch
    with pytest.raises(IndexCorruptError, match="database holds 12 vectors") as info:
        ws.query_dicom(files[0], k=20)
    assert "index_rebuild" in [r.action for r in info.value.remedies]
    report = ws.ingest(tmp_path / "archive", workers=0)  # re-running repairs the index from the database
    assert (report.ingested, report.already_present, report.index_ntotal) == (0, 12, 12)
    assert len(ws.query_dicom(files[0], k=20).hits) == 11


def test_index_behind_database_catches_up(tmp_path, monkeypatch):
    """A crash after a mid-run save: the saved index lags the database and is topped up on open."""
    files = synthetic_archive(tmp_path / "archive", 12)
    cfg = make_config(tmp_path / "state", encoder={"name": "resnet18", "batch_size": 4},
                      index={"save_every_batches": 1})
    saves = []
    real_save = VectorIndex.save

    def save_twice_then_crash(self):
        if len(saves) == 2:
            raise OSError("killed")
        saves.append(self.ntotal)
        real_save(self)
    monkeypatch.setattr(VectorIndex, "save", save_twice_then_crash)
    with pytest.raises(OSError):
        Workspace(cfg).ingest(tmp_path / "archive", workers=0)
    monkeypatch.undo()
    assert saves == [4, 8]
    ws = Workspace(cfg)
    assert ws.status()["model_versions"][0]["index"]["ntotal"] == 8
    assert len(ws.query_dicom(files[0], k=20).hits) == 11  # all 12 searchable, itself excluded


def test_exact_search_moves_to_ivf_as_the_corpus_grows(tmp_path):
    synthetic_archive(tmp_path / "a1", 30)
    cfg = make_config(tmp_path / "state", encoder={"name": "resnet18", "batch_size": 8},
                      index={"nlist": 4, "min_points_per_list": 10})
    ws = Workspace(cfg)
    assert ws.ingest(tmp_path / "a1", workers=0).index_type == "flat"
    more = [make_file(tmp_path / "a2" / f"x{i}.dcm", breast_phantom(128, 96, seed=100 + i)) for i in range(12)]
    report = ws.ingest(tmp_path / "a2", workers=0)
    assert (report.index_type, report.index_ntotal) == ("ivf_flat", 42)
    manifest = ws.status()["model_versions"][0]["index"]
    assert (manifest["type"], manifest["nlist"], manifest["nprobe"]) == ("ivf_flat", 4, 4)  # nprobe <= nlist
    assert len(ws.query_dicom(more[0], k=5).hits) == 5


def test_lost_index_is_rebuilt_from_the_database(tmp_path):
    files = synthetic_archive(tmp_path / "archive", 6)
    cfg = make_config(tmp_path / "state", encoder={"name": "resnet18"})
    ws = Workspace(cfg)
    ws.ingest(tmp_path / "archive", workers=0)
    before = ws.query_dicom(files[0], k=3)
    shutil.rmtree(cfg.index_dir)
    with pytest.raises(IndexCorruptError, match="database holds 6 vectors"):
        Workspace(cfg).query_dicom(files[0], k=3)
    ws = Workspace(cfg)
    assert ws.rebuild_index().ntotal == 6
    assert ws.query_dicom(files[0], k=3).hits == before.hits


def test_query_with_another_preprocessing_is_refused(tmp_path):
    files = synthetic_archive(tmp_path / "archive", 4)
    Workspace(make_config(tmp_path / "state", encoder={"name": "resnet18"})).ingest(tmp_path / "archive", workers=0)
    other = make_config(tmp_path / "state", encoder={"name": "resnet18"}, preprocess={"flip_to_side": "L"})
    with pytest.raises(IndexMismatchError, match="preprocessing"):
        Workspace(other).query_dicom(files[0])


def test_query_before_any_ingest(tmp_path):
    files = synthetic_archive(tmp_path / "archive", 1)
    with pytest.raises(NotFoundError, match="no database at") as info:
        Workspace(make_config(tmp_path / "state", encoder={"name": "resnet18"})).query_dicom(files[0])
    assert [r.action for r in info.value.remedies] == ["ingest"]


def stored_paths(ws: Workspace) -> list[str]:
    from sqlalchemy import select

    from mammo_retrieval.storage.catalog.models import Image
    with ws.db.session() as s:
        return sorted(s.scalars(select(Image.path)))


def test_sidecars_skipped_home_left_out_unreadable_folder_recorded(tmp_path, monkeypatch):
    """Issue #9: sidecars and the home's own database were listed as rejections; a folder without read
    permission vanished without a word."""
    archive = tmp_path / "archive"
    files = synthetic_archive(archive / "ok", 3)
    make_file(archive / "locked" / "hidden.dcm")
    (archive / "labels.csv").write_text("file,label\n")
    (archive / "LICENCE-MIAS.txt").write_text("research only\n")
    cfg = make_config(archive / "home", encoder={"name": "resnet18"})  # a home inside the archive
    ws = Workspace(cfg)
    real_scandir = os.scandir

    def scandir(path="."):
        if Path(path) == archive / "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)
    monkeypatch.setattr(os, "scandir", scandir)
    report = ws.ingest(archive, workers=0)
    assert (report.ingested, report.skipped, report.files_seen) == (3, 2, 3)
    assert [(r.path, r.code) for r in report.rejected] == [(str(archive / "locked"), "unreadable_folder")]
    assert "Permission denied" in report.rejected[0].reason
    assert report.as_dict()["skipped"] == 2
    assert [(r["path"], r["code"]) for r in ws.status()["rejected"]] == [(str(archive / "locked"),
                                                                          "unreadable_folder")]
    monkeypatch.setattr(os, "scandir", real_scandir)  # the folder is readable again
    again = ws.ingest(archive, workers=0)  # the home now holds mretrieve.db, -wal, index/, cache/
    assert (again.ingested, again.already_present, again.skipped, again.rejected) == (1, 3, 2, [])
    assert ws.status()["rejected"] == []
    assert sorted(stored_paths(ws)) == sorted(map(str, files + [archive / "locked" / "hidden.dcm"]))


def test_empty_archive_is_an_error_and_touches_nothing(tmp_path):
    cfg = make_config(tmp_path / "state", encoder={"name": "resnet18"})
    ws = Workspace(cfg)
    (tmp_path / "empty").mkdir()
    with pytest.raises(NotFoundError) as info:
        ws.ingest(tmp_path / "empty", workers=0)
    assert info.value.message == f"no file to ingest under {tmp_path / 'empty'}"
    (tmp_path / "sidecars").mkdir()
    (tmp_path / "sidecars" / "labels.csv").write_text("file,label\n")
    with pytest.raises(NotFoundError, match="1 file.s. skipped as not DICOM by extension"):
        ws.ingest(tmp_path / "sidecars", workers=0)
    assert not (tmp_path / "state" / "mretrieve.db").exists()  # no database, so no model version or rejection
    with pytest.raises(NotFoundError, match="no database"):
        ws.status()
    assert not (cfg.index_dir / ".write.lock").exists()  # not even the lock was taken


def test_paths_are_stored_absolute(tmp_path, monkeypatch):
    """Issue #9: a relative ARCHIVE_DIR was stored as typed, so thumbnails broke from another directory."""
    synthetic_archive(tmp_path / "here" / "archive", 2)
    ws = Workspace(make_config(tmp_path / "state", encoder={"name": "resnet18"}))
    monkeypatch.chdir(tmp_path / "here")
    report = ws.ingest("archive", workers=0)
    assert report.root == str(tmp_path / "here" / "archive")
    monkeypatch.chdir(tmp_path)
    paths = stored_paths(ws)
    assert len(paths) == 2 and all(os.path.isabs(p) and os.path.exists(p) for p in paths)


def test_cli_ingest_skipped_empty_and_busy(tmp_path, monkeypatch):
    """Exit 7 for an empty folder; exit 9 at once, naming the index folder, while another writer holds the lock."""
    from click.testing import CliRunner

    from mammo_retrieval.app.cli import cli
    monkeypatch.setenv("MRETRIEVE_HOME", str(tmp_path / "state"))
    monkeypatch.delenv("MRETRIEVE_CONFIG", raising=False)
    config = tmp_path / "small.yaml"
    config.write_text("encoder:\n  name: resnet18\n")
    runner = CliRunner()

    def run(*args):
        return runner.invoke(cli, ["--config", str(config), *map(str, args)], catch_exceptions=False)
    (tmp_path / "empty").mkdir()
    result = run("ingest", tmp_path / "empty", "--no-progress")
    assert result.exit_code == 7 and f"no file to ingest under {tmp_path / 'empty'}" in result.output

    archive = tmp_path / "archive"
    synthetic_archive(archive, 1)
    (archive / "labels.csv").write_text("file,label\n")
    import threading
    ws = Workspace(make_config(tmp_path / "state", encoder={"name": "resnet18"}))
    holding, release = threading.Event(), threading.Event()

    def writer() -> None:  # another writer (a thread here: the lock refuses other threads as other processes)
        with ws.write_lock():
            holding.set()
            release.wait(30)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        assert holding.wait(30)
        result = run("ingest", archive, "--no-progress", "--workers", "0")
    finally:
        release.set()
        thread.join()
    assert result.exit_code == 9, result.output
    assert f"another mretrieve process is writing to {tmp_path / 'state' / 'index'}" in result.output

    result = run("ingest", archive, "--no-progress", "--workers", "0")
    assert result.exit_code == 0, result.output
    assert "ingested 1, already present 0, rejected 0" in result.output
    assert "skipped 1 not DICOM by extension" in result.output


def test_symlinked_folder_ingested_broken_links_rejected_loop_walked_once(tmp_path, cbis_files):
    """The README's "any depth ... symlinks kept": real files reached through a linked folder are ingested
    under the linked path; a dangling and a looping link are rejections naming them; a link back up ends."""
    archive = tmp_path / "archive"
    archive.mkdir()
    cases = cbis_files[0].parents[1]  # the package's folder of CBIS-DDSM cases, linked in, never copied
    os.symlink(cases, archive / "cbis")
    os.symlink(archive, archive / "back_up")  # a loop: the archive inside itself
    os.symlink(tmp_path / "moved_away.dcm", archive / "dangling.dcm")
    os.symlink(archive / "self", archive / "self")
    ws = Workspace(make_config(tmp_path / "state", encoder={"name": "resnet18"}))

    report = ws.ingest(archive, workers=0)
    assert (report.files_seen, report.ingested) == (8, 8)
    assert sorted(stored_paths(ws)) == sorted(str(archive / "cbis" / f.relative_to(cases)) for f in cbis_files)
    expected = {str(archive / "dangling.dcm"): f"broken or looping symbolic link (to {tmp_path / 'moved_away.dcm'})",
                str(archive / "self"): f"broken or looping symbolic link (to {archive / 'self'})"}
    assert {r.path: r.reason for r in report.rejected} == expected
    assert {r.code for r in report.rejected} == {"broken_link"}
    assert {r["path"]: r["code"] for r in ws.status()["rejected"]} == dict.fromkeys(expected, "broken_link")

    again = ws.ingest(archive, workers=0)  # nothing doubled, the links still reported
    assert (again.ingested, again.already_present, len(again.rejected)) == (0, 8, 2)
    counts = ws.status()["counts"]
    assert (counts["images"], counts["embeddings"], counts["rejected_files"]) == (8, 8, 2)
