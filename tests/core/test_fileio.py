"""One hasher and one atomic writer for every store: a failed write leaves the old file whole."""
import hashlib
import os
import time

import pytest

from mammo_retrieval.core.fileio import file_fingerprint, sha256_file, write_atomic, write_bytes_atomic


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


def test_a_fingerprint_stays_while_the_file_is_untouched_and_changes_on_a_rewrite_that_hides_itself(tmp_path):
    """An in-place rewrite of the same size whose modification time is set back (``cp -p``, ``touch -d``)
    still changes the fingerprint (its change time), so a skipped crasher gets decoded again."""
    path = tmp_path / "x.dcm"
    path.write_bytes(b"a" * 1000)
    before = file_fingerprint(path)
    path.read_bytes()
    assert file_fingerprint(path) == before
    st = os.stat(path)
    time.sleep(0.05)  # past the kernel's coarse timestamp tick
    with open(path, "r+b") as fh:
        fh.write(b"b" * 1000)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (os.stat(path).st_size, os.stat(path).st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    assert file_fingerprint(path) != before
    assert file_fingerprint(tmp_path / "gone.dcm") is None
