"""The archive walk: sidecars skipped unread, the home's state left out, unreadable folders reported."""
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from mammo_retrieval.pipeline import source as walker
from mammo_retrieval.core.errors import NotFoundError
from mammo_retrieval.pipeline.source import (BROKEN_LINK, UNREADABLE_FOLDER, WalkError, absolute_root, nothing_to_ingest,
                                             plainly_not_dicom, walk)


def touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_sidecars_are_skipped_and_state_left_out(tmp_path):
    root = tmp_path / "archive"
    keep = [touch(root / "P1" / "1.2.840.113619.2.55.3.604688119.969.1268071029.320"),  # UID-like name
            touch(root / "P1" / "IM-0001-0001"), touch(root / "P1" / "a.dcm"), touch(root / "P1" / "b.DCM")]
    sidecars = [touch(root / name) for name in ("labels.csv", "LICENCE-MIAS.txt", "README.md", "notes.json",
                                               "photo.PNG", "scan.jpeg", "report.pdf", "old.db-wal",
                                               "export.zip", "x.sqlite3")]
    touch(root / "DICOMDIR")
    touch(root / ".DS_Store")
    home = root / "home"  # a home inside the archive: its database and folders are not the archive's
    state = [touch(home / "mretrieve.db"), touch(home / "mretrieve.db-wal"), touch(home / "mretrieve.db-shm"),
             touch(home / "index" / "mv1" / "vectors.faiss"), touch(home / "cache" / "shard0")]
    touch(home / "catalog")  # a database named without extension is left out by path, not by name
    exclude = (home / "index", home / "cache", home / "mretrieve.db", home / "mretrieve.db-wal",
               home / "mretrieve.db-shm", home / "catalog")
    found = walk(root, exclude=exclude)
    assert sorted(found.files) == sorted(keep)
    assert sorted(found.skipped) == sorted(sidecars)
    assert not found.errors and not set(state) & set(found.files + found.skipped)
    assert plainly_not_dicom("mretrieve.db-journal") and not plainly_not_dicom("image.dcm")


def test_a_single_file_root(tmp_path):
    assert walk(touch(tmp_path / "one")).files == [tmp_path / "one"]
    assert walk(touch(tmp_path / "one.txt")).skipped == [tmp_path / "one.txt"]


def test_unreadable_folder_is_reported_not_swallowed(tmp_path, monkeypatch):
    """We run as root, where chmod 000 blocks nothing: make listing one folder fail as it would for a user."""
    root = tmp_path / "archive"
    ok = touch(root / "ok" / "a.dcm")
    touch(root / "locked" / "b.dcm")
    real_scandir = os.scandir

    def scandir(path="."):
        if Path(path) == root / "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)
    monkeypatch.setattr(os, "scandir", scandir)
    found = walk(root)
    assert found.files == [ok]
    assert found.errors == [WalkError(str(root / "locked"), "cannot list this folder: Permission denied")]
    assert found.errors[0].code == UNREADABLE_FOLDER
    assert root / "locked" not in found.folders and root / "ok" in found.folders


@pytest.mark.skipif(not hasattr(os, "setuid"), reason="needs POSIX users")
def test_unreadable_folder_for_an_unprivileged_user():
    """The real thing: chmod 000, walked by a process that dropped root (uid/gid 65534) after importing.

    tmp_path sits under a 0700 folder that nobody cannot enter, so this builds its own 0755 folder in /tmp.
    """
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        root.chmod(0o755)
        touch(root / "ok" / "a.dcm")
        touch(root / "locked" / "b.dcm")
        (root / "ok").chmod(0o755)
        (root / "ok" / "a.dcm").chmod(0o644)
        (root / "locked").chmod(0o000)
        try:
            script = ("import json, os, sys\n"
                      "from mammo_retrieval.pipeline.source import walk\n"
                      "if os.geteuid() == 0:\n"
                      "    os.setgid(65534); os.setuid(65534)\n"
                      "found = walk(sys.argv[1])\n"
                      "print(json.dumps({'files': [str(p) for p in found.files],"
                      " 'errors': [[e.path, e.code, e.reason] for e in found.errors]}))\n")
            done = subprocess.run([sys.executable, "-c", script, str(root)], capture_output=True, text=True,
                                  timeout=60, cwd=Path(walker.__file__).parents[2])
        finally:
            (root / "locked").chmod(0o755)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["files"] == [str(root / "ok" / "a.dcm")]
    assert out["errors"] == [[str(root / "locked"), UNREADABLE_FOLDER, "cannot list this folder: Permission denied"]]


def test_absolute_root_keeps_symlinks(tmp_path, monkeypatch):
    real = tmp_path / "nas" / "archive"
    real.mkdir(parents=True)
    (tmp_path / "work").mkdir()
    os.symlink(real, tmp_path / "work" / "archive")
    monkeypatch.chdir(tmp_path / "work")
    assert absolute_root("archive") == tmp_path / "work" / "archive"  # the link, not its target
    assert absolute_root("../work/./archive") == tmp_path / "work" / "archive"
    os.symlink(real, tmp_path / "work" / "link")
    (tmp_path / "nas" / "other").mkdir()
    (tmp_path / "work" / "other").mkdir()
    # link/.. is nas, not work: folding ".." lexically would name another folder, so it is kept
    assert absolute_root("link/../other") == tmp_path / "work" / "link" / ".." / "other"


def walk_in_child(root: Path, timeout: float = 60) -> dict:
    """``walk`` in a child process with a deadline: a walk that loops fails the test instead of hanging it."""
    script = ("import json, sys\n"
              "from mammo_retrieval.pipeline.source import walk\n"
              "found = walk(sys.argv[1])\n"
              "print(json.dumps({'files': [str(p) for p in found.files], 'skipped': [str(p) for p in found.skipped],"
              " 'folders': [str(p) for p in found.folders],"
              " 'errors': [[e.path, e.code, e.reason] for e in found.errors]}))\n")
    done = subprocess.run([sys.executable, "-c", script, str(root)], capture_output=True, text=True,
                          timeout=timeout, cwd=Path(walker.__file__).parents[2])
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_symlinked_folders_followed_once_and_broken_links_reported(tmp_path):
    """Issue: broken and looping links vanished without a word, and symlinked folders were not entered."""
    root = tmp_path / "archive"
    own = touch(root / "own" / "a.dcm")
    elsewhere = tmp_path / "nas" / "2019"  # a folder outside the archive, linked in
    touch(elsewhere / "b.dcm")
    touch(elsewhere / "deeper" / "IM-0001")
    os.symlink(elsewhere, root / "linked")
    os.symlink(elsewhere, root / "own" / "same_again")  # a second link to a folder already walked
    os.symlink(root, root / "own" / "up")  # a loop back to the archive itself
    os.symlink(root / "own", root / "a_link_to_own")  # sorts before "own", but "own" itself keeps its path
    os.symlink(tmp_path / "gone.dcm", root / "dangling.dcm")
    os.symlink(root / "own" / "self", root / "own" / "self")  # a link to itself
    os.symlink(tmp_path / "gone.csv", root / "labels.csv")  # a dangling sidecar is still just a sidecar
    os.symlink(elsewhere / "b.dcm", root / "file_link.dcm")  # a link to a file: a file, as before

    out = walk_in_child(root)
    assert sorted(out["files"]) == sorted(map(str, [own, root / "linked" / "b.dcm", root / "linked" / "deeper" / "IM-0001",
                                                    root / "file_link.dcm"]))  # paths as reached, not resolved
    assert out["skipped"] == [str(root / "labels.csv")]
    assert sorted(out["errors"]) == [
        [str(root / "dangling.dcm"), BROKEN_LINK, f"broken or looping symbolic link (to {tmp_path / 'gone.dcm'})"],
        [str(root / "own" / "self"), BROKEN_LINK, f"broken or looping symbolic link (to {root / 'own' / 'self'})"]]
    assert sorted(out["folders"]) == sorted(map(str, [root, root / "linked", root / "linked" / "deeper", root / "own"]))
    assert walk(root).errors[0].code == BROKEN_LINK  # in this process too


def test_a_folder_of_links_only_to_nothing_says_so(tmp_path):
    root = tmp_path / "archive"
    root.mkdir()
    os.symlink(tmp_path / "gone", root / "image")
    os.symlink(root / "loop", root / "loop")
    found = walk(root)
    assert not found.files and [e.code for e in found.errors] == [BROKEN_LINK, BROKEN_LINK]
    error = nothing_to_ingest(root, found)
    assert isinstance(error, NotFoundError)
    assert "2 broken or looping link(s), e.g. " + str(root / "image") in error.message
    assert "unreadable" not in error.message
    assert walk(root / "image").errors == [WalkError(str(root / "image"),
                                                     f"broken or looping symbolic link (to {tmp_path / 'gone'})",
                                                     BROKEN_LINK)]
