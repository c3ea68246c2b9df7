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
