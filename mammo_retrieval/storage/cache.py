"""Preprocessed-image cache: the uint8 model-size image of every ingested DICOM, keyed by SOPInstanceUID.

Training, re-indexing, QC thumbnails and the classical baselines read it instead of decoding DICOM again.
Pixels live in fixed-size shard files written with plain ``pwrite`` at each slot's offset (never through a
writable memory map: on a full disk a write to a mapped page kills the process with SIGBUS, while
``pwrite`` raises ENOSPC, which becomes a StorageFullError). The key -> slot map and a CRC32 of each image
live in a small SQLite file beside them (the cache is derived data: it never goes in the main database).
One folder per preprocessing digest, so images made with other settings are never mixed.
"""
from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from mammo_retrieval.core.errors import MammoRetrievalError, Remedy, is_disk_full, storage_full
from mammo_retrieval.core.private import PRIVATE_FILE, make_private_dir

SHARD_CAPACITY = 4096


class CacheCorruptError(MammoRetrievalError):
    exit_code = 6


class ImageCache:
    def __init__(self, root: Path, digest: str, size: tuple[int, int]) -> None:
        self.directory = make_private_dir(Path(root) / digest)
        self.size = tuple(size)
        self._slot_bytes = self.size[0] * self.size[1]
        self.entries_path = self.directory / "entries.sqlite"
        self._fds: dict[int, int] = {}
        self._mutex = threading.RLock()  # a warm server reads (and rebuilds entries) from many threads
        # Set up under the folder's writer lock: two processes opening a new cache at once (an ingest's
        # workers, a server) otherwise race on switching to WAL ("database is locked", which SQLite's busy
        # timeout does not cover) and on writing the size row (a UNIQUE failure). CI caught the first.
        with self._writer(), self._guard():
            if not self.entries_path.exists():  # SQLite gives its -wal and -shm files the mode of this one
                os.close(os.open(self.entries_path, os.O_CREAT | os.O_WRONLY, PRIVATE_FILE))
            # one connection shared by a server's threads, each use under self._mutex
            self._db = sqlite3.connect(self.entries_path, timeout=30, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS entries (sop TEXT PRIMARY KEY, slot INTEGER NOT NULL "
                             "UNIQUE, crc32 INTEGER NOT NULL)")
            self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
            stored = self._db.execute("SELECT value FROM meta WHERE key='size'").fetchone()
            if stored is None:
                self._db.execute("INSERT INTO meta VALUES ('size', ?)", (f"{self.size[0]}x{self.size[1]}",))
                self._db.commit()
        if stored is not None and stored[0] != f"{self.size[0]}x{self.size[1]}":
            raise CacheCorruptError(f"{self.directory}: cache holds {stored[0]} images, expected "
                                    f"{self.size[0]}x{self.size[1]}", hint="delete the folder; ingest refills it")

    @contextmanager
    def _guard(self, path: Path | None = None) -> Iterator[None]:
        """SQLite and file errors of the cache as the package's errors, naming the cache's file: a garbage
        ``entries.sqlite`` must not surface as a traceback, nor be mistaken for the main database."""
        try:
            yield
        except MammoRetrievalError:
            raise
        except (OSError, sqlite3.Error) as exc:
            target = path or self.entries_path
            if is_disk_full(exc):
                raise storage_full(target, exc) from None
            if isinstance(exc, sqlite3.DatabaseError) and not isinstance(exc, sqlite3.OperationalError):
                raise CacheCorruptError(
                    f"{target}: the image cache is unreadable ({exc})",
                    remedies=[Remedy(f"deleting the cache folder {self.directory} is safe: it holds only derived "
                                     "images, which an ingest or reindex refills", "ingest")]) from None
            raise

    def _fd(self, shard: int) -> int:
        if shard not in self._fds:
            path = self._shard_path(shard)
            with self._guard(path):
                self._fds[shard] = os.open(path, os.O_RDWR | os.O_CREAT, PRIVATE_FILE)
        return self._fds[shard]

    def _shard_path(self, shard: int) -> Path:
        return self.directory / f"shard-{shard:05d}.u8"

    def _write_slot(self, slot: int, data: bytes) -> None:
        shard, offset = divmod(slot, SHARD_CAPACITY)
        fd, view, offset = self._fd(shard), memoryview(data), offset * self._slot_bytes
        with self._guard(self._shard_path(shard)):
            while view:  # a write that fills the disk may be short; the next one raises ENOSPC
                written = os.pwrite(fd, view, offset)
                view, offset = view[written:], offset + written

    def put_many(self, items: Iterable[tuple[str, np.ndarray]]) -> None:
        """Pixels first (fdatasync'd), then the entry rows in one transaction: a crash or a full disk leaves no
        bad entry, and a rerun reuses the slots of entries already committed."""
        items = list(items)
        if not items:
            return
        # the folder's lock first: waiting on another process's batch must not hold up this one's readers
        with self._writer(), self._mutex:
            self._put(items)

    @contextmanager
    def _writer(self) -> Iterator[None]:
        """Another process may write this cache at the same time (a server rebuilding an entry during an
        ingest): slots are handed out and filled under one lock on the folder, or both take the same slot
        and one entry is lost. The lock goes with its file descriptor, even on kill -9."""
        path = self.directory / "writer.lock"
        with self._guard(path):
            fd = os.open(path, os.O_RDWR | os.O_CREAT, PRIVATE_FILE)
        try:
            with self._guard(path):
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _put(self, items: list[tuple[str, np.ndarray]]) -> None:
        with self._guard():
            existing = dict(self._db.execute(
                f"SELECT sop, slot FROM entries WHERE sop IN ({','.join('?' * len(items))})",
                [sop for sop, _ in items]).fetchall())
            # COALESCE, not `or -1`: a max slot of 0 is falsy, and slot 0 would be handed out again
            next_slot = self._db.execute("SELECT COALESCE(MAX(slot), -1) + 1 FROM entries").fetchone()[0]
        rows, touched = [], set()
        for sop, image in items:
            if image.shape != self.size or image.dtype != np.uint8:
                raise ValueError(f"cache expects uint8 {self.size}, got {image.dtype} {image.shape}")
            slot = existing.get(sop)
            if slot is None:
                slot, next_slot = next_slot, next_slot + 1
                existing[sop] = slot
            data = np.ascontiguousarray(image).tobytes()
            self._write_slot(slot, data)
            touched.add(slot // SHARD_CAPACITY)
            rows.append((sop, slot, zlib.crc32(data)))
        for shard in touched:
            with self._guard(self._shard_path(shard)):
                os.fdatasync(self._fds[shard])
        with self._guard(), self._db:
            self._db.executemany("INSERT OR REPLACE INTO entries (sop, slot, crc32) VALUES (?, ?, ?)", rows)

    def get(self, sop: str) -> np.ndarray | None:
        """The cached image, or None if absent. Raises CacheCorruptError if its checksum fails."""
        with self._mutex:
            with self._guard():
                row = self._db.execute("SELECT slot, crc32 FROM entries WHERE sop=?", (sop,)).fetchone()
            if row is None:
                return None
            shard, offset = divmod(row[0], SHARD_CAPACITY)
            with self._guard(self._shard_path(shard)):
                data = os.pread(self._fd(shard), self._slot_bytes, offset * self._slot_bytes)
            if len(data) != self._slot_bytes or zlib.crc32(data) != row[1]:
                raise CacheCorruptError(f"cache entry for {sop} in {self.directory} fails its checksum",
                                        hint="it is rebuilt from its DICOM when next needed")
            return np.frombuffer(data, dtype=np.uint8).reshape(self.size).copy()

    def discard(self, sop: str) -> None:
        with self._mutex:
            with self._guard(), self._db:
                self._db.execute("DELETE FROM entries WHERE sop=?", (sop,))

    def __contains__(self, sop: str) -> bool:
        with self._mutex:
            with self._guard():
                return self._db.execute("SELECT 1 FROM entries WHERE sop=?", (sop,)).fetchone() is not None

    def __len__(self) -> int:
        with self._mutex:
            with self._guard():
                return self._db.execute("SELECT COUNT(*) FROM entries").fetchone()[0]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._db.close()
