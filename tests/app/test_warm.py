"""What a warm process (the coming server) needs from a Workspace: it sees what other processes ingest,
its lazy parts are built once whatever the threads, and its cache can be read from any thread."""
import json
import threading

import numpy as np
import pytest

from mammo_retrieval.app.workspace import Workspace
from mammo_retrieval.core.errors import IndexMismatchError
from mammo_retrieval.storage.index.manifest import MANIFEST_NAME, Manifest
from tests.conftest import make_config
from tests.pipeline.test_runner import synthetic_archive

TINY = {"name": "resnet18", "input_size": 64, "batch_size": 4}


def test_a_warm_workspace_sees_images_another_process_ingested(tmp_path):
    cfg = make_config(tmp_path / "state", encoder=TINY)
    files = synthetic_archive(tmp_path / "first", 4)
    Workspace(cfg).ingest(tmp_path / "first", workers=0)
    warm = Workspace(cfg)
    assert warm.searchable_index().ntotal == 4
    synthetic_archive(tmp_path / "second", 6)
    Workspace(cfg).ingest(tmp_path / "second", workers=0)  # another writer, as another process would be
    assert warm.searchable_index().ntotal == 10
    hits = warm.query_dicom(files[0], k=20).hits
    assert len(hits) == 9  # every other image, the new ones included


def test_lazy_parts_are_built_once_across_threads(tmp_path, monkeypatch):
    cfg = make_config(tmp_path / "state", encoder=TINY)
    ws = Workspace(cfg)
    built = []
    real = Workspace.build_encoder

    def counting(self, encoder_cfg):
        built.append(1)
        return real(self, encoder_cfg)

    monkeypatch.setattr(Workspace, "build_encoder", counting)
    threads = [threading.Thread(target=lambda: ws.encoder) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(built) == 1


def test_the_cache_serves_any_thread(tmp_path):
    ws = Workspace(make_config(tmp_path / "state", encoder=TINY))
    cache = ws.cache_for(ws.encoder.settings)
    image = np.arange(64 * 64, dtype=np.uint8).reshape(64, 64)
    cache.put_many([("1.2.3", image)])
    errors, seen = [], []

    def read_and_write(i):
        try:
            cache.put_many([(f"2.{i}", image)])
            seen.append(cache.get("1.2.3") is not None and f"2.{i}" in cache)
        except Exception as exc:  # sqlite3.ProgrammingError across threads before the fix
            errors.append(exc)

    threads = [threading.Thread(target=read_and_write, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and seen == [True] * 8 and len(cache) == 9


def test_a_manifest_from_a_newer_version_is_refused(tmp_path):
    cfg = make_config(tmp_path / "state", encoder=TINY)
    synthetic_archive(tmp_path / "a", 2)
    ws = Workspace(cfg)
    ws.ingest(tmp_path / "a", workers=0)
    path = ws.index_directory() / MANIFEST_NAME
    data = json.loads(path.read_text())
    data["format_version"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(IndexMismatchError, match="manifest format 99"):
        Manifest.read(path.parent)


def test_an_upload_is_read_from_memory_as_a_file_would_be(tmp_path):
    """A server's upload never touches the disk: the same hits and rejections as from the file."""
    from mammo_retrieval.core.errors import DicomRejected
    from mammo_retrieval.dicom.reader import InMemoryDicom
    cfg = make_config(tmp_path / "state", encoder=TINY)
    files = synthetic_archive(tmp_path / "archive", 6)
    ws = Workspace(cfg)
    ws.ingest(tmp_path / "archive", workers=0)
    for path in files[:3]:  # RLE, JPEG 2000, explicit little endian
        upload = InMemoryDicom("upload.dcm", path.read_bytes())
        from_memory, from_file = ws.query_dicom(upload, k=4), ws.query_dicom(path, k=4)
        assert [h.sop_instance_uid for h in from_memory.hits] == [h.sop_instance_uid for h in from_file.hits]
        assert [h.score for h in from_memory.hits] == [h.score for h in from_file.hits]
        assert from_memory.query.path == "upload.dcm"
    truncated = InMemoryDicom("cut.dcm", files[1].read_bytes()[:3000])
    with pytest.raises(DicomRejected) as info:
        ws.query_dicom(truncated, k=4)
    assert info.value.path == "cut.dcm"
    with pytest.raises(DicomRejected, match="not a DICOM"):
        ws.query_dicom(InMemoryDicom("photo.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 200), k=4)
