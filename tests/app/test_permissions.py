"""#9 item 18: the home's state and the reports hold patient data, so nothing the CLI creates may be readable by
other users (the database with its -wal/-shm, cache, index, QC report, export), whatever the caller's umask."""
from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

from tests.factory import breast_phantom, make_file

CONFIG = "encoder:\n  name: resnet18\n  input_size: 64\n  batch_size: 8\n"


def _cli(env: dict, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from mammo_retrieval.app.cli import main; main()", *map(str, args)],
                          env=env, capture_output=True, text=True, timeout=300,
                          preexec_fn=lambda: os.umask(0o022))  # the usual umask: files would be 0644


def _exposed(folder: Path) -> list[str]:
    return [f"{oct(stat.S_IMODE(p.lstat().st_mode))} {p}" for p in [folder, *folder.rglob("*")]
            if not p.is_symlink() and stat.S_IMODE(p.lstat().st_mode) & 0o077]


def test_the_cli_creates_nothing_other_users_can_read(tmp_path):
    for i in range(6):
        make_file(tmp_path / "archive" / f"{i}.dcm", breast_phantom(96, 64, seed=i, side="LR"[i % 2]),
                  laterality="LR"[i % 2], accession=f"ACC{i // 2}")
    (tmp_path / "config.yaml").write_text(CONFIG)
    home = tmp_path / "home"
    env = {**os.environ, "MRETRIEVE_HOME": str(home), "MRETRIEVE_CONFIG": str(tmp_path / "config.yaml")}
    for var in ("MRETRIEVE_DATABASE_URL", "MRETRIEVE_INDEX_DIR", "MRETRIEVE_CACHE_DIR", "MRETRIEVE_WEIGHTS"):
        env.pop(var, None)
    for args in [("ingest", tmp_path / "archive", "--workers", "0", "--no-progress"),
                 ("qc", "--out", tmp_path / "qc", "--no-progress"),
                 ("export", "--out", tmp_path / "export")]:
        done = _cli(env, *args)
        assert done.returncode == 0, (args, done.stderr[-3000:])
    names = {p.name for p in home.rglob("*")}
    assert {"mretrieve.db", "entries.sqlite", "live.json"} <= names, names
    assert any((tmp_path / "qc").iterdir()) and any((tmp_path / "export").iterdir())
    exposed = [line for folder in (home, tmp_path / "qc", tmp_path / "export") for line in _exposed(folder)]
    assert not exposed, "\n".join(exposed)


def test_the_library_keeps_its_state_folders_private_without_touching_the_umask(tmp_path):
    """API users get no umask from us (a library must not change process state), but the cache and index
    folders it creates are 0700, so the images and vectors inside cannot be read by other users."""
    from mammo_retrieval.app.workspace import Workspace
    from tests.conftest import make_config
    make_file(tmp_path / "archive" / "a.dcm", breast_phantom(96, 64))
    old = os.umask(0o022)
    try:
        ws = Workspace(make_config(tmp_path / "home", encoder={"name": "resnet18", "input_size": 64}))
        ws.ingest(tmp_path / "archive", workers=0)
        ws.close()
        assert os.umask(0o022) == 0o022  # unchanged by the library
    finally:
        os.umask(old)
    cfg = ws.config
    folders = [cfg.index_dir, cfg.cache_dir, *cfg.index_dir.iterdir(), *cfg.cache_dir.iterdir()]
    folders = [f for f in folders if f.is_dir()]
    assert len(folders) >= 4
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o700 for f in folders), [
        (str(f), oct(f.stat().st_mode)) for f in folders]
