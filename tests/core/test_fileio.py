"""One hasher and one atomic writer for every store: a failed write leaves the old file whole."""
import hashlib

import pytest

from mammo_retrieval.core.fileio import sha256_file, write_atomic, write_bytes_atomic


def test_sha256_of_a_file(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(b"mammogram" * 1_000_000)
    assert sha256_file(path) == hashlib.sha256(b"mammogram" * 1_000_000).hexdigest()


def test_a_write_that_fails_leaves_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "manifest.json"
    write_bytes_atomic(path, b"old")

    def half_then_fail(fh):
        fh.write(b"ne")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        write_atomic(path, half_then_fail)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]
    write_bytes_atomic(path, b"new")
    assert path.read_bytes() == b"new"


def test_threads_writing_one_path_never_mix_their_bytes(tmp_path):
    """Two C-STORE associations may spool the same SOPInstanceUID at once: the file is always one whole
    write or the other, and no temp file is left."""
    import threading
    path = tmp_path / "same.dcm"
    payloads = [bytes([i]) * 2_000_000 for i in (1, 2)]
    errors = []

    def writer(data):
        try:
            for _ in range(20):
                write_bytes_atomic(path, data)
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(p,)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert path.read_bytes() in payloads
    assert [p.name for p in tmp_path.iterdir()] == ["same.dcm"]
