"""Find candidate files: any name, any depth, with or without .dcm."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

SKIP_NAMES = {"DICOMDIR"}  # a directory record, not an image


def iter_files(root: str | os.PathLike, exclude: tuple[Path, ...] = ()) -> Iterator[Path]:
    """Every regular file under root (or root itself), in sorted order; symlinked folders are not followed."""
    root = Path(root)
    if root.is_file():
        yield root
        return
    excluded = {p.resolve() for p in exclude}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if (here / d).resolve() not in excluded)
        for name in sorted(filenames):
            path = here / name
            if name in SKIP_NAMES or name.startswith(".") or not path.is_file():
                continue
            yield path
