"""The one-writer-per-index-folder lock, and the record of who holds it.

Why a POSIX record lock (``fcntl.lockf``) and not ``flock``: a flock lock belongs to the open file
description, which forked children share, so the ingest's forked workers kept the lock alive after the main
process was killed and every later writer was refused for good. A POSIX lock belongs to the process that took
it: children never hold it, and the kernel drops it the moment that process dies, however it dies.

POSIX locks do not exclude other threads of the same process, and closing *any* descriptor of the file in the
holding process drops the lock; so a process opens the file once per folder, keeps that descriptor while the
lock is held, and a per-folder re-entrant thread lock excludes other threads (the same thread may nest).
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from mammo_retrieval.core.errors import BusyError
from mammo_retrieval.core.private import make_private_dir

LOCK_NAME = ".write.lock"


@dataclass
class _Held:
    rlock: threading.RLock
    fd: int | None = None
    depth: int = 0


_HELD: dict[str, _Held] = {}
_GUARD = threading.Lock()


def holder_info(path: Path) -> dict:
    """What the lock file says about its last holder (pid, host, started_at, command); {} if unreadable."""
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def describe_holder(info: dict) -> str:
    pid, host = info.get("pid"), info.get("host")
    if not isinstance(pid, int):
        return "holder unknown"
    if host and host != socket.gethostname():
        return f"held by pid {pid} on host {host} (liveness unknown from here)"
    state = "alive" if _pid_alive(pid) else "no longer running"
    command = info.get("command") or "?"
    return f"held by pid {pid} ({state}) since {info.get('started_at', '?')}: {command}"


def _busy(folder: Path, info: dict) -> BusyError:
    return BusyError(f"another mretrieve process is writing to {folder}: {describe_holder(info)}",
                     hint="wait for it to finish, then run the command again (the lock is released the moment "
                          "its holder exits, so it can never be stale)")


@contextmanager
def write_lock(folder: Path) -> Iterator[None]:
    """Hold the folder's write lock, or raise BusyError at once naming the holder (never wait silently)."""
    make_private_dir(folder)  # the index folder: 0700 whatever the umask
    path = folder / LOCK_NAME
    key = os.path.realpath(path)
    with _GUARD:
        held = _HELD.setdefault(key, _Held(threading.RLock()))
    if not held.rlock.acquire(blocking=False):
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": "another thread of this process"}
        raise _busy(folder, info)
    try:
        if held.depth == 0:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EACCES, errno.EAGAIN):
                    raise _busy(folder, holder_info(path)) from None
                raise
            record = {"pid": os.getpid(), "host": socket.gethostname(),
                      "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                      "command": " ".join(sys.argv)[:500]}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(record).encode(), 0)
            held.fd = fd
        held.depth += 1
        try:
            yield
        finally:
            held.depth -= 1
            if held.depth == 0 and held.fd is not None:
                fd, held.fd = held.fd, None
                try:
                    os.ftruncate(fd, 0)  # no holder now; a reader of the file sees {}
                finally:
                    os.close(fd)  # drops the lock
    finally:
        held.rlock.release()
