"""#9 item 13: a full disk under the home gives one clear error (no SIGBUS, no traceback), and a rerun after
freeing space loses and doubles nothing.

The home lives on a small filesystem of its own: a 40 MB tmpfs (we run as root in CI and the dev box), else a
loop-mounted ext4 image, else the test is skipped with the reason. Each command runs the real CLI in a
subprocess, so a SIGBUS shows as returncode -7 instead of killing pytest.
"""
from __future__ import annotations

import json
import re
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mammo_retrieval.core.errors import StorageFullError
from tests.factory import breast_phantom, make_file

CONFIG = "encoder:\n  name: resnet18\n  input_size: 224\n  batch_size: 8\n"


def _mount_small_filesystem(where: Path, scratch: Path) -> str:
    where.mkdir()
    tmpfs = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(where)],
                           capture_output=True, text=True)
    if tmpfs.returncode == 0:
        return "tmpfs"
    image = scratch / "small.ext4"
    with open(image, "wb") as fh:
        fh.truncate(40 << 20)
    steps = [["mkfs.ext4", "-q", "-F", str(image)], ["mount", "-o", "loop", str(image), str(where)]]
    for step in steps:
        try:
            done = subprocess.run(step, capture_output=True, text=True)
        except FileNotFoundError as exc:
            pytest.skip(f"cannot make a small filesystem: tmpfs mount failed ({tmpfs.stderr.strip()}), {exc}")
        if done.returncode != 0:
            pytest.skip("cannot make a small filesystem to fill: tmpfs mount failed "
                        f"({tmpfs.stderr.strip()}); {' '.join(step[:2])} failed ({done.stderr.strip()})")
    return "ext4 loop"


@pytest.fixture
def small_fs(tmp_path):
    where = tmp_path / "small"
    _mount_small_filesystem(where, tmp_path)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def _archive(folder: Path, count: int, first: int) -> None:
    for i in range(first, first + count):
        make_file(folder / f"img{i:03d}.dcm", breast_phantom(1024, 1024, seed=i), sop_uid=f"1.2.826.0.1.77.{i}",
                  accession=f"ACC{i:03d}")


def _cli(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from mammo_retrieval.app.cli import main; main()", *args],
                          env=env, capture_output=True, text=True, timeout=300)


def _fill(path: Path, leave: int) -> None:
    """A ballast file taking all but ``leave`` bytes of the filesystem."""
    free = shutil.disk_usage(path.parent).free
    with open(path, "wb") as fh:
        chunk = b"\0" * (1 << 20)
        remaining = max(0, free - leave)
        while remaining > 0:
            remaining -= fh.write(chunk[:min(len(chunk), remaining)])
        fh.flush()
        os.fsync(fh.fileno())


def test_a_full_disk_gives_one_clear_error_and_a_rerun_loses_and_doubles_nothing(tmp_path, small_fs):
    (tmp_path / "config.yaml").write_text(CONFIG)
    home = small_fs / "home"
    env = {**os.environ, "MRETRIEVE_HOME": str(home), "MRETRIEVE_CONFIG": str(tmp_path / "config.yaml")}
    for var in ("MRETRIEVE_DATABASE_URL", "MRETRIEVE_INDEX_DIR", "MRETRIEVE_CACHE_DIR", "MRETRIEVE_WEIGHTS"):
        env.pop(var, None)
    archive = tmp_path / "archive"  # the DICOMs stay on the big disk: only the home is squeezed
    _archive(archive / "first", 2, 0)
    _archive(archive / "second", 14, 2)
    ingest = ("ingest", str(archive), "--workers", "0", "--no-progress")

    first = _cli(env, "ingest", str(archive / "first"), "--workers", "0", "--no-progress")
    assert first.returncode == 0, first.stderr[-3000:]

    ballast = small_fs / "ballast"
    _fill(ballast, leave=600 << 10)  # 600 KiB: room for one batch of 8 cache images (49 KiB each), not 14
    full = _cli(env, *ingest)
    assert full.returncode != -7, "SIGBUS: the cache was written through a memory map"
    assert full.returncode == StorageFullError.exit_code, full.stderr[-3000:]
    assert "Traceback" not in full.stderr, full.stderr[-3000:]
    errors = [line for line in full.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no space left on the disk holding" in errors[0] and str(small_fs) in errors[0]
    assert "free space" in full.stderr and "rerun" in full.stderr

    ballast.unlink()
    rerun = _cli(env, *ingest)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    counted = re.search(r"ingested (\d+), already present (\d+)", rerun.stdout)
    assert counted and sum(map(int, counted.groups())) == 16, rerun.stdout  # each file once: none lost, none twice

    status = _cli(env, "status", "--format", "json")
    assert status.returncode == 0, status.stderr[-3000:]
    info = json.loads(status.stdout)
    [model] = info["model_versions"]
    (entries,) = list((home / "cache").glob("*/entries.sqlite"))
    with sqlite3.connect(entries) as cache:
        cached = cache.execute("SELECT COUNT(*), COUNT(DISTINCT sop), COUNT(DISTINCT slot) FROM entries").fetchone()
    assert info["counts"]["images"] == 16
    assert info["counts"]["embeddings"] == model["vectors"] == model["index"]["ntotal"] == 16
    assert cached == (16, 16, 16)
    from mammo_retrieval.storage.cache import ImageCache
    cache = ImageCache(entries.parent.parent, entries.parent.name, (224, 224))
    try:  # every cached image reads back and passes its checksum
        assert all(isinstance(cache.get(f"1.2.826.0.1.77.{i}"), np.ndarray) for i in range(16))
    finally:
        cache.close()


@pytest.mark.parametrize("raised", ["sqlalchemy", "sqlite", "oserror", "faiss"])
def test_every_form_of_a_full_disk_maps_to_the_one_error(tmp_path, monkeypatch, raised):
    """However the disk-full surfaces (SQLAlchemy wrapping sqlite3, an OSError, faiss's write error), the CLI
    says it once, names a path, exits with StorageFullError's code, and never echoes SQL parameters."""
    import errno

    import sqlalchemy.exc
    from click.testing import CliRunner

    from mammo_retrieval.app.workspace import Workspace
    from mammo_retrieval.app.cli import cli
    full = sqlite3.OperationalError("database or disk is full")
    error = {
        "sqlalchemy": sqlalchemy.exc.OperationalError("INSERT INTO images VALUES (?)", ("Doe^Jane",), full),
        "sqlite": full,
        "oserror": OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "state" / "x.tmp")),
        "faiss": RuntimeError("Error in faiss::write_index: 'ret == (n)' failed: write error in x.faiss: "
                              "0 != 1 (No space left on device)"),
    }[raised]

    def fail(*args, **kwargs):
        raise error
    monkeypatch.setenv("MRETRIEVE_HOME", str(tmp_path / "state"))
    monkeypatch.setattr(Workspace, "status", fail)
    (tmp_path / "state").mkdir()
    result = CliRunner().invoke(cli, ["status"])
    assert result.exit_code == StorageFullError.exit_code, (result.output, result.exception)
    assert result.output.startswith("error: no space left on the disk holding ")
    assert str(tmp_path / "state") in result.output and "Doe^Jane" not in result.output
    assert "Traceback" not in result.output
