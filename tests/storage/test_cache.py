import numpy as np
import pytest

from mammo_retrieval.app.workspace import Workspace
from mammo_retrieval.storage.cache import CacheCorruptError, ImageCache
from tests.conftest import make_config
from tests.factory import breast_phantom, make_file


def test_round_trip_and_checksum(tmp_path):
    cache = ImageCache(tmp_path, "d1", (8, 6))
    images = {f"1.2.{i}": np.full((8, 6), i, np.uint8) for i in range(5)}
    cache.put_many(images.items())
    assert len(cache) == 5 and "1.2.3" in cache and cache.get("9.9") is None
    np.testing.assert_array_equal(cache.get("1.2.3"), images["1.2.3"])
    cache.put_many([("1.2.3", np.full((8, 6), 77, np.uint8))])  # overwrite keeps the slot
    assert len(cache) == 5 and cache.get("1.2.3")[0, 0] == 77
    cache.close()
    reopened = ImageCache(tmp_path, "d1", (8, 6))
    np.testing.assert_array_equal(reopened.get("1.2.4"), images["1.2.4"])
    with open(tmp_path / "d1" / "shard-00000.u8", "r+b") as fh:  # flip bytes of slot 4
        fh.seek(4 * 48)
        fh.write(b"\xff\xff")
    with pytest.raises(CacheCorruptError, match="checksum"):
        ImageCache(tmp_path, "d1", (8, 6)).get("1.2.4")


def test_size_is_checked(tmp_path):
    ImageCache(tmp_path, "d1", (8, 6)).close()
    with pytest.raises(CacheCorruptError, match="expected 4x4"):
        ImageCache(tmp_path, "d1", (4, 4))


def test_ingest_fills_the_cache_and_a_lost_entry_is_rebuilt(tmp_path):
    make_file(tmp_path / "a" / "x.dcm", breast_phantom(128, 96), sop_uid="1.2.826.0.1.5")
    ws = Workspace(make_config(tmp_path / "state", encoder={"name": "resnet18"}))
    ws.ingest(tmp_path / "a", workers=0)
    original = ws.image_cache.get("1.2.826.0.1.5")
    assert original.shape == (224, 224) and original.dtype == np.uint8
    ws.image_cache.discard("1.2.826.0.1.5")
    np.testing.assert_array_equal(ws.cached_image("1.2.826.0.1.5"), original)
    assert "1.2.826.0.1.5" in ws.image_cache


def test_a_garbage_entries_file_names_the_file_and_the_fix(tmp_path):
    ImageCache(tmp_path, "d1", (8, 6)).close()
    entries = tmp_path / "d1" / "entries.sqlite"
    for stale in entries.parent.glob("entries.sqlite-*"):
        stale.unlink()
    entries.write_bytes(b"\x00garbage" * 500)
    with pytest.raises(CacheCorruptError) as caught:
        ImageCache(tmp_path, "d1", (8, 6))
    assert str(entries) in str(caught.value) and "deleting the cache folder" in caught.value.hint


def test_a_full_disk_is_a_clear_error_and_commits_no_entry(tmp_path, monkeypatch):
    import errno
    import os

    from mammo_retrieval.core.errors import StorageFullError
    cache = ImageCache(tmp_path, "d1", (8, 6))
    cache.put_many([("1.2.0", np.full((8, 6), 5, np.uint8))])
    real_pwrite, calls = os.pwrite, []

    def short_then_full(fd, data, offset):  # a write that fills the disk is short; the next one fails
        calls.append(len(data))
        if len(calls) == 1:
            return real_pwrite(fd, bytes(data)[:10], offset)
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "pwrite", short_then_full)
    with pytest.raises(StorageFullError, match="shard-00000.u8") as caught:
        cache.put_many([("1.2.1", np.full((8, 6), 6, np.uint8))])
    assert calls == [48, 38] and "free space" in caught.value.hint
    monkeypatch.setattr(os, "pwrite", real_pwrite)
    assert "1.2.1" not in cache and len(cache) == 1  # no entry points at half-written pixels
    cache.put_many([("1.2.1", np.full((8, 6), 6, np.uint8))])  # the rerun after freeing space
    assert len(cache) == 2 and cache.get("1.2.1")[0, 0] == 6 and cache.get("1.2.0")[0, 0] == 5


def test_the_cache_is_private_whatever_the_umask(tmp_path):
    import os
    import stat
    old = os.umask(0o022)
    try:
        cache = ImageCache(tmp_path / "cache", "d1", (8, 6))
        cache.put_many([("1.2.0", np.zeros((8, 6), np.uint8))])
    finally:
        os.umask(old)
    for path in [tmp_path / "cache", *(tmp_path / "cache").rglob("*")]:
        assert not stat.S_IMODE(path.stat().st_mode) & 0o077, path
    cache.close()


COUNT = 400
_WRITER = """
import sys
from pathlib import Path
import numpy as np
from mammo_retrieval.storage.cache import ImageCache
root, prefix, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
cache = ImageCache(Path(root), "d", (32, 32))
for start in range(0, count, 4):
    cache.put_many([(f"{prefix}{i}", np.full((32, 32), (i * 7 + len(prefix)) % 251, np.uint8))
                    for i in range(start, start + 4)])
cache.close()
"""


def test_two_processes_writing_at_once_lose_no_entry(tmp_path):
    """A server rebuilding entries while an ingest writes: both handed out the same free slot, and one
    entry was replaced by the other's (found by an audit). Slots are now taken under a lock on the folder.
    The writers are fresh interpreters, not forks of the test process (a fork of a threaded process can
    hang)."""
    import subprocess
    import sys
    writers = [subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path), prefix, str(COUNT)])
               for prefix in ("a", "bb")]
    for w in writers:
        assert w.wait(timeout=120) == 0
    cache = ImageCache(tmp_path, "d", (32, 32))
    for prefix in ("a", "bb"):
        for i in range(COUNT):
            image = cache.get(f"{prefix}{i}")  # raises CacheCorruptError for a slot the other overwrote
            assert image is not None and image[0, 0] == (i * 7 + len(prefix)) % 251, (prefix, i)
    cache.close()


_OPENER = """
import sys, time
from pathlib import Path
from mammo_retrieval.storage.cache import ImageCache
root, me = Path(sys.argv[1]), sys.argv[2]
(root / f"ready-{me}").touch()
while not (root / "go").exists():  # all start together: the race is in the first milliseconds
    time.sleep(0.001)
ImageCache(root / "cache", "d", (32, 32)).close()
"""


def test_processes_opening_a_new_cache_at_once_all_succeed(tmp_path):
    """An ingest's workers and a server opening a cache that does not exist yet: two of them switched the
    new file to WAL at once ("database is locked", which SQLite's busy timeout does not cover) or both wrote
    its size row (a UNIQUE failure). CI caught one in about 1 run in 10; set-up is now under the folder's lock."""
    import subprocess
    import sys
    import time
    for trial in range(6):
        root = tmp_path / str(trial)
        root.mkdir()
        openers = [subprocess.Popen([sys.executable, "-c", _OPENER, str(root), str(k)], stderr=subprocess.PIPE)
                   for k in range(6)]
        deadline = time.monotonic() + 60
        while len(list(root.glob("ready-*"))) < len(openers) and time.monotonic() < deadline:
            time.sleep(0.01)
        (root / "go").touch()
        for opener in openers:
            _, err = opener.communicate(timeout=60)
            assert opener.returncode == 0, err.decode()[-500:]
