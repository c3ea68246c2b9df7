"""File primitives shared by every store: content hashes and all-or-nothing writes."""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable


def sha256_file(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, read a block at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def file_fingerprint(path: str | os.PathLike) -> str | None:
    """"size:mtime_ns:inode:ctime_ns" of a file, or None when it cannot be stat'ed: cheap evidence that a
    file is the one seen before. A rewrite, a copy over it or a restore changes at least one; the change
    time also catches a rewrite in place whose modification time was set back (``touch -d``, ``cp -p``)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}:{st.st_ctime_ns}"


def fsync_path(path: Path) -> None:
    """Make a file's written data durable (including what was written through a shared mapping), or,
    for a directory, the renames in it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable."""
    fsync_path(directory)


def write_atomic(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write through ``write`` into a temp file beside ``path``, fsync, rename over it: all or nothing.
    A crash leaves either the old file or the new one, never a torn one."""
    path = Path(path)
    # a temp name of its own (not just the pid): two threads writing one path never share a temp file
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    try:
        with open(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    write_atomic(path, lambda fh: fh.write(data))
