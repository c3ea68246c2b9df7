"""The home's state (database, cache, index) holds patient images and metadata: other users must not read it.

The CLI sets umask 0077 for everything it creates; the library cannot change process state, so the folders it
creates get an explicit 0700 here, which covers API users too.
"""
from __future__ import annotations

import os
from pathlib import Path

PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600


def make_private_dir(path: Path) -> Path:
    """Create ``path`` (and missing parents) as 0700: the home's state holds patient images, so it must not
    be readable by other users whatever the process umask is (the CLI also sets 0077; library users may not)."""
    path = Path(path)
    missing = []
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing.append(folder)
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=PRIVATE_DIR)
        except FileExistsError:
            continue
        os.chmod(folder, PRIVATE_DIR)  # mkdir's mode is masked by the umask; the chmod is not
    return path
